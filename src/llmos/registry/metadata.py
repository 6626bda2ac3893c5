"""OpenAI's metadata: the key/value pairs a caller may attach to a job or a stored completion."""

from __future__ import annotations

from typing import Any

from llmos.errors import InvalidRequestError

METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str] | None:
    """At most 16 string pairs, keys of 1 to 64 characters, values of at most 512; None stays None."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequestError(f"{param} must be an object of string keys and values", param=param)
    if len(metadata) > METADATA_PAIRS:
        raise InvalidRequestError(f"{param} holds at most {METADATA_PAIRS} pairs", param=param)
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= METADATA_KEY_CHARS:
            raise InvalidRequestError(
                f"{param} keys must be strings of 1 to {METADATA_KEY_CHARS} characters", param=param
            )
        if not isinstance(value, str) or len(value) > METADATA_VALUE_CHARS:
            raise InvalidRequestError(
                f"{param} value of {key!r} must be a string of at most {METADATA_VALUE_CHARS} characters",
                param=f"{param}.{key}",
            )
    return dict(metadata)
