"""LLM OS: a self-hosted operating system for language models."""

from llmos.config import Settings, get_settings
from llmos.errors import LLMOSError

__version__ = "0.1.0"

__all__ = ["LLMOSError", "Settings", "__version__", "get_settings"]
