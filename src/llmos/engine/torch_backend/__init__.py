"""PyTorch/transformers backend: batched causal generation and sentence-embedding encoders."""

from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.encoder import EncoderRunner

__all__ = ["CausalRunner", "EncoderRunner"]
