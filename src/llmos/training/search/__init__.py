"""Hyperparameter search: a study over a fine-tuning recipe whose trials are ordinary
fine-tuning jobs (docs/adr/0024-hyperparameter-search.md). Optuna and matplotlib come with the
``search`` extra; without them the platform runs, and its search routes answer 501."""

from importlib.util import find_spec

EXTRA = "search"


def available() -> bool:
    """Whether Optuna and matplotlib are installed (``pip install 'llmos[search]'``)."""
    return find_spec("optuna") is not None and find_spec("matplotlib") is not None
