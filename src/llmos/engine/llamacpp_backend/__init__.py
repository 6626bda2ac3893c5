"""The llama.cpp backend: chat models kept as GGUF, served with continuous batching on the CPU."""

from llmos.engine.llamacpp_backend.runner import LlamaCppRunner

__all__ = ["LlamaCppRunner"]
