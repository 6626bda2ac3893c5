"""The vLLM backend: chat and completion models on an NVIDIA GPU (``pip install "llmos[vllm]"``),
chosen per model by ``capability.choose`` (docs/adr/0037). vllm is imported only to serve a model
(and to list the architectures it implements, once a GPU is seen), so the platform runs and type
checks without it."""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.engine.backends import LOAD_OVERHEAD_BYTES, Backend, Runner, register
from llmos.engine.vllm_backend.capability import (
    GENERATING_TASKS,
    VLLM_EXTRA,
    Choice,
    GpuOffer,
    choose,
    machine_refusal,
)
from llmos.engine.vllm_backend.runner import VLLM_ROWS, VllmApi, VllmRunner
from llmos.errors import ModelLoadError, NotInstalledError
from llmos.kernel.devices import detect_gpus
from llmos.registry.adapters import ADAPTER_FORMAT
from llmos.registry.formats import read_json

if TYPE_CHECKING:
    import torch

    from llmos.engine.config import EngineConfig
    from llmos.registry import ModelRecord, ModelRegistry

log = logging.getLogger(__name__)
_VLLM_DTYPE = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16"}
"""``dtype`` in vLLM's terms: ``auto`` is the model's own dtype (CPU speed does not matter on a GPU)."""


def probe_offer() -> GpuOffer:
    """What this machine offers vLLM now: vllm's version (from its metadata, without importing
    it), the GPUs, and, when both are there, the architectures vllm implements."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return GpuOffer(None, (), frozenset())
    gpus = tuple(detect_gpus())
    if not gpus:
        return GpuOffer(version, (), frozenset())
    try:
        from vllm import ModelRegistry

        architectures = frozenset(ModelRegistry.get_supported_archs())
    except Exception:  # an install that does not import (a torch it was not built for) serves nothing
        log.warning("vllm %s is installed but does not import; models stay on the CPU backends", version, exc_info=True)
        return GpuOffer(None, gpus, frozenset())
    return GpuOffer(version, gpus, architectures)


@register
class VllmBackend(Backend):
    name = "vllm"
    priority = 20  # asked before llama.cpp and torch: where it can serve a model, the GPU should
    scores_prompts = True

    def __init__(
        self,
        registry: ModelRegistry,
        config: EngineConfig,
        dtype: torch.dtype,
        *,
        offer: Callable[[], GpuOffer] | None = None,
    ) -> None:
        """``offer`` reads the machine (default ``probe_offer``; tests fake the inventory). With
        ``gpu_backend = "vllm"`` a machine vLLM cannot use refuses the engine's start."""
        super().__init__(registry, config, dtype)
        self._offer = offer if offer is not None else probe_offer
        self._lock = threading.Lock()
        self._choices: dict[str, Choice] = {}  # model id -> the choice made at its first request
        if config.gpu_backend == "vllm":
            refusal = machine_refusal(self._offer(), config.vllm_gpu_memory_utilization)
            if refusal is not None:
                raise NotInstalledError(f"gpu_backend is 'vllm', but {refusal}; set gpu_backend to auto or torch")

    def choice(self, record: ModelRecord) -> Choice:
        """Whether vLLM serves ``record``, decided at its first request and kept for this process's
        life: the GPU memory its own engine then takes must not send it elsewhere later."""
        with self._lock:
            made = self._choices.get(record.id)
        if made is not None:
            return made
        offer, fraction = self._offer(), self.config.vllm_gpu_memory_utilization
        architectures: list[str] = []
        if machine_refusal(offer, fraction) is None:  # only then is the model's own config worth reading
            architectures = list(read_json(self.registry.model_dir(record) / "config.json").get("architectures") or [])
        made = choose(self.config.gpu_backend, record.task, offer, architectures, record.size_bytes, fraction)
        log.log(logging.INFO if made.vllm else logging.DEBUG, "%s on vLLM: %s, %s", record.name, made.vllm, made.reason)
        with self._lock:
            return self._choices.setdefault(record.id, made)

    def serves(self, record: ModelRecord) -> bool:
        if record.task not in GENERATING_TASKS or self.config.gpu_backend == "torch":
            return False
        if self.config.gguf_backend == "llama.cpp" and "gguf_file" in record.extra:
            return False  # the settings ask llama.cpp for it
        return self.config.gpu_backend == "vllm" or self.choice(record).vllm

    def applies(self, adapter: ModelRecord) -> bool:
        """LoRA adapters, through vLLM's own; prefix- and prompt-tuning ones run on torch beside it."""
        return adapter.format == ADAPTER_FORMAT

    def estimate_bytes(self, record: ModelRecord) -> int:
        """What it takes of this process's memory: the weights and the cache live in the GPU's,
        which ``vllm_gpu_memory_utilization`` bounds, and vLLM's engine core is a process of its own."""
        return LOAD_OVERHEAD_BYTES

    def load(self, record: ModelRecord) -> Runner:
        made = self.choice(record)
        if not made.vllm:  # only a forced gpu_backend = "vllm" gets here
            raise ModelLoadError(f"gpu_backend is 'vllm', but vLLM cannot serve {record.name}: {made.reason}")
        try:
            import vllm
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind
        except ImportError as exc:
            raise NotInstalledError(f"the vLLM backend needs vllm ({VLLM_EXTRA}): {exc}") from exc
        from llmos.engine.torch_backend.loader import load_tokenizer

        model_dir = self.registry.model_dir(record)
        args = vllm.EngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=_VLLM_DTYPE[self.config.dtype],
            gpu_memory_utilization=self.config.vllm_gpu_memory_utilization,
            max_model_len=self.context_length(record),
            max_num_seqs=VLLM_ROWS,
            enable_prefix_caching=self.config.prefix_cache_bytes > 0,
            enable_lora=True,
            max_lora_rank=self.config.vllm_max_lora_rank,
            disable_log_stats=not self.config.metrics,  # its vllm:* metrics join /metrics (one registry)
            seed=0,
        )
        try:
            engine = vllm.LLMEngine.from_engine_args(args)
        except Exception as exc:
            raise ModelLoadError(f"vLLM could not load {record.name}: {type(exc).__name__}: {exc}") from exc
        return VllmRunner(
            engine,
            VllmApi(vllm.SamplingParams, LoRARequest, RequestOutputKind.DELTA),
            load_tokenizer(model_dir),
            name=record.name,
            config=self.config,
            context_length=self.context_length(record),
            adapter_dir=self._adapter_dir,
        )

    def _adapter_dir(self, adapter_id: str) -> Path:
        return self.registry.model_dir(self.registry.get(adapter_id))
