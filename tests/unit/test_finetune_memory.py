"""A fine-tuning job's memory estimate (what a Ray cluster reserves for its worker): it grows with
the base model and the method, falls back (None) where the model's shapes cannot be read, is the
pre-training formula with fewer parameters trained, and is stored with the job when it is created."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from llmos.cluster.view import NodeView
from llmos.platform import Platform
from llmos.registry.files import FileRecord
from llmos.registry.service import Lineage
from llmos.training.finetune_memory import WORKER_RUNTIME_BYTES, fine_tuning_memory, model_shapes
from llmos.training.model_presets import PRESETS, estimate_memory
from llmos.training.spec import TrainingSpec
from tests.conftest import ADMIN_KEY
from tests.unit.test_adapters import make_lora

SMALL = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
LARGE = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2}


def _model(tmp_path: Path, name: str, shapes: dict[str, int], intermediate: int, vocab: int) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    config = {**shapes, "intermediate_size": intermediate, "vocab_size": vocab, "model_type": "llama"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _estimate(model: Path, parameters: int, adapter: str, task: str = "chat", dropout: float = 0.05) -> int:
    spec = TrainingSpec(batch_size=4, max_seq_length=256, adapter=adapter, lora_dropout=dropout)
    estimate = fine_tuning_memory(model, parameters, spec, task, data_bytes=1 << 20)
    assert estimate is not None
    return estimate


def test_the_estimate_grows_with_the_model_and_the_method(tmp_path: Path) -> None:
    small = _model(tmp_path, "small", SMALL, 1536, 49152)
    large = _model(tmp_path, "large", LARGE, 4864, 151936)
    small_params, large_params = 134_515_008, 494_032_768
    methods = ("full", "lora", "adalora", "ia3", "prefix_tuning", "prompt_tuning")
    for adapter in methods:
        assert _estimate(large, large_params, adapter) > _estimate(small, small_params, adapter), adapter
    full, lora = _estimate(small, small_params, "full"), _estimate(small, small_params, "lora", dropout=0.0)
    # A full fine-tune keeps a gradient and AdamW's two moments (fp32) for every parameter; LoRA for its own.
    assert full - lora > small_params * 11
    assert full > _estimate(small, small_params, "lora") > lora  # LoRA's dropout saves copies of its inputs
    assert lora > _estimate(small, small_params, "ia3") > WORKER_RUNTIME_BYTES + small_params * 6
    assert _estimate(small, small_params, "lora", "dpo") > lora  # both sides of a pair in one batch


def test_unreadable_shapes_give_no_estimate(tmp_path: Path) -> None:
    spec = TrainingSpec()
    assert fine_tuning_memory(tmp_path, 1000, spec, "chat", data_bytes=0) is None  # no config.json
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"n_embd": 768, "n_layer": 12, "vocab_size": 50257}))
    assert model_shapes(gpt2) is None
    (gpt2 / "config.json").write_text("[1, 2]")
    assert model_shapes(gpt2) is None


def test_pre_training_is_the_same_formula_with_every_parameter_trained() -> None:
    dims, vocab = PRESETS["tiny"], 8000
    everything = estimate_memory(dims, vocab, batch_size=8, context=256, corpus_bytes=1 << 20)
    assert everything.model == dims.parameters(vocab) * 18  # fp32 weight, bf16 copy, gradient, two moments
    assert everything.checkpoint == 0  # pre-training's refusal counts the steps alone, as it always did
    # A fine-tuning worker's checkpoint: the trained weights and moments serialised, their servable copy.
    written = estimate_memory(dims, vocab, batch_size=8, context=256, corpus_bytes=1 << 20, checkpointed=True)
    assert written.checkpoint == dims.parameters(vocab) * 16
    explicit = estimate_memory(
        dims, vocab, batch_size=8, context=256, corpus_bytes=1 << 20, trainable=dims.parameters(vocab)
    )
    assert explicit == everything
    adapter = estimate_memory(
        dims, vocab, batch_size=8, context=256, corpus_bytes=1 << 20, trainable=1000, checkpointed=True
    )
    assert adapter.model == dims.parameters(vocab) * 6 + 1000 * 12 and adapter.activations == everything.activations
    assert adapter.checkpoint == 1000 * 16


def test_fine_tuning_attention_grows_with_tokens_not_with_the_context_squared() -> None:
    dims, vocab = PRESETS["tiny"], 8000

    def activations(context: int, rows: int, **kwargs: int) -> int:
        return estimate_memory(dims, vocab, batch_size=rows, context=context, corpus_bytes=0, **kwargs).activations

    fixed = {"attention_per_head_token": 3072}
    # Four times the context in a quarter of the rows: the same tokens, the same memory.
    assert activations(1024, 2, **fixed) == activations(256, 8, **fixed)
    assert activations(1024, 2) > activations(256, 8)  # pre-training's score matrices do grow with the square


def _chat_file(p: Platform) -> FileRecord:
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
    record, _ = p.files.create(
        tenant="default",
        purpose="fine-tune",
        filename="t.jsonl",
        chunks=["\n".join(json.dumps(r) for r in rows).encode()],
        max_bytes=1 << 20,
    )
    return record


def test_a_created_job_carries_its_estimate(loaded_platform: Platform) -> None:
    p = loaded_platform
    record = _chat_file(p)
    body = {"model": "tiny-chat", "training_file": record.id}
    lora = p.jobs.create(tenant="default", body=body)
    full = p.jobs.create(
        tenant="default", body={**body, "method": {"type": "supervised", "supervised": {"adapter": {"type": "full"}}}}
    )
    base = p.registry.get("tiny-chat")
    for job in (lora, full):
        spec = TrainingSpec(**job.method["resolved"])
        expected = fine_tuning_memory(
            p.registry.model_dir(base), base.parameter_count, spec, "chat", data_bytes=record.bytes
        )
        assert job.method["memory_bytes"] == expected and expected > WORKER_RUNTIME_BYTES
    assert lora.method["memory_bytes"] != full.method["memory_bytes"]
    assert "memory_bytes" not in json.dumps(full.public())  # the platform's own figure, not OpenAI's object


def test_a_job_larger_than_every_live_node_is_refused_in_cluster_mode(
    loaded_platform: Platform, quiet_http: TestClient
) -> None:
    p = loaded_platform
    body = {"model": "tiny-chat", "training_file": _chat_file(p).id}
    estimate = p.jobs.create(tenant="default", body=body).method["memory_bytes"]  # not in cluster mode: queued
    small = estimate // 2
    nodes = [
        NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": float(small)}, {"CPU": 4.0, "memory": 0.0}),
        NodeView("gone", "10.0.0.2", False, {"CPU": 8.0, "memory": float(4 * estimate)}, None),  # dead: no room
    ]
    p.jobs.cluster_nodes = lambda: nodes
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    refused = quiet_http.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "exceeds_cluster_memory"
    assert f"about {estimate >> 20} MiB" in error["message"] and f"has {small >> 20} MiB in all" in error["message"]
    assert error["param"] == "method.supervised.hyperparameters.batch_size"  # the tiny model's activations lead
    assert len(p.jobs.list("default", limit=100)[0]) == 1  # nothing queued
    # A live node as large as the estimate takes it, however busy it is now (the job waits its turn).
    nodes.append(NodeView("big", "10.0.0.3", True, {"CPU": 1.0, "memory": float(estimate)}, {"CPU": 0.0}))
    assert quiet_http.post("/v1/fine_tuning/jobs", json=body, headers=headers).status_code == 200
    assert not p.jobs.list("default", limit=100)[1]


def test_a_job_on_an_adapter_is_estimated_on_the_model_it_runs_on(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    p = loaded_platform
    base = p.registry.get("tiny-chat")
    made = make_lora(tiny_chat_dir, tmp_path / "adapter", seed=1)
    adapter = p.registry.pull(f"file:{made}", name="tiny-adapter", lineage=Lineage(parent_id=base.id))
    assert not (p.registry.model_dir(adapter) / "config.json").exists() and adapter.parameter_count
    training = _chat_file(p).id
    # Methods whose result is merged into plain weights (a LoRA of an adapter is refused: test_adapters).
    for kind in ("ia3", "full"):
        method = {"type": "supervised", "supervised": {"adapter": {"type": kind}}}
        on_base, on_adapter = (
            p.jobs.create(tenant="default", body={"model": model, "training_file": training, "method": method})
            for model in ("tiny-chat", "tiny-adapter")
        )
        # Not the fixed fallback (no estimate): the base's, with the adapter's weights loaded beside it
        # (at most 34 bytes a parameter: fp32 and bf16 copies, gradient, two moments, checkpoint).
        extra = on_adapter.method["memory_bytes"] - on_base.method["memory_bytes"]
        assert 0 < extra <= 34 * adapter.parameter_count, kind


MEASURED = Path(__file__).parents[2] / "benchmarks/results/job_memory-20261207-094612-cf622c85.json"


def test_the_estimate_is_above_every_measured_peak(tmp_path: Path) -> None:
    """SmolLM2-135M's runs in docs/scaling.md, full and LoRA at 256 and 1,024 tokens: the LoRA run
    at 1,024 tokens, which holds more than the full one, is the closest (its dropout's copies count)."""
    measured = json.loads(MEASURED.read_text())
    model = _model(tmp_path, "smollm2", SMALL, 1536, 49152)
    for row in measured["rows"]:
        spec = TrainingSpec(batch_size=row["batch_size"], max_seq_length=row["max_seq_length"], adapter=row["method"])
        estimate = fine_tuning_memory(model, measured["parameter_count"], spec, "chat", data_bytes=0)
        assert estimate is not None and estimate > row["peak_rss_mb"] * 2**20, row
