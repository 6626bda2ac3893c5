"""The in-process runner that ``benchmarks/decode_profile.py`` and ``benchmarks/replica_scaling.py``
measure: one setup, the server's settings but the prefix cache off."""

from __future__ import annotations

import threading

from benchmarks import harness

from llmos.config import Settings
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.platform import Platform


def test_the_runner_has_the_server_settings_but_no_prefix_cache_and_decodes(
    loaded_platform: Platform, settings: Settings
) -> None:
    loaded = harness.load_runner(settings.home, "tiny-chat", dtype="float32")
    try:
        assert loaded.dtype == "float32"
        server = EngineConfig.from_settings(Settings(home=settings.home, dtype="float32"))
        assert vars(loaded.config) == {**vars(server), "prefix_cache_bytes": 0}
        assert loaded.runner.prefix_cache.budget_bytes == 0  # every row computes its own prompt
        prompt = loaded.prompt()
        assert 0 < len(prompt) <= harness.PROMPT_TOKENS
        ended = threading.Event()
        tokens: list[int] = []

        def on_delta(delta: GenerationDelta) -> None:
            tokens.extend(delta.token_ids)
            if delta.finish_reason is not None:
                ended.set()

        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        loaded.runner.submit(GenerationRequest("bench-0", "tiny-chat", prompt, params), on_delta)
        assert ended.wait(timeout=60)
        assert len(tokens) == 3
    finally:
        loaded.runner.close()
