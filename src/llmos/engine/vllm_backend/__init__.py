"""The vLLM backend: chat and completion models on NVIDIA GPUs, chosen by capability (ADR 0037)."""

from llmos.engine.vllm_backend.runner import VllmRunner

__all__ = ["VllmRunner"]
