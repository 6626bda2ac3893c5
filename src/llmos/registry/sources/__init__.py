"""Model sources, chosen by URI scheme (``pypi:``, ``file:``, ``hf:``). Each registers itself."""

from llmos.registry.sources import file, hf, pypi
from llmos.registry.sources.base import (
    ModelSource,
    NullProgress,
    Progress,
    get_source,
    register_source,
)

__all__ = ["ModelSource", "NullProgress", "Progress", "file", "get_source", "hf", "pypi", "register_source"]
