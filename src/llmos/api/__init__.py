"""System calls of LLM OS: the HTTP API (OpenAI-compatible under /v1, native extras beside it)."""

from llmos.api.app import create_app

__all__ = ["create_app"]
