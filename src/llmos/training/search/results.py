"""A finished search's result files: the trials as a CSV table and Optuna's plots as PNG images
(optimisation history, parameter importances, parallel coordinates), stored as the tenant's
``fine-tune-results`` files."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in a server; set before pyplot is imported (below, through Optuna)

import matplotlib.pyplot as plt
from optuna.exceptions import ExperimentalWarning
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as plots

from llmos.errors import LLMOSError
from llmos.registry.files import FileStore
from llmos.training.search import study as studies
from llmos.training.search.store import Search

log = logging.getLogger(__name__)
PURPOSE = "fine-tune-results"
PLOTS: dict[str, tuple[Callable[..., Any], int]] = {
    "optimization_history.png": (plots.plot_optimization_history, 1),
    "param_importances.png": (plots.plot_param_importances, 2),
    "parallel_coordinate.png": (plots.plot_parallel_coordinate, 2),
}
"""Each plot and the complete trials it needs (importances compare trials; one is no comparison)."""


def trials_csv(trials: list[FrozenTrial]) -> bytes:
    """One row per trial: its number, state, value, every parameter, its job and model, a note."""
    names = sorted({name for t in trials for name in t.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", *names, "fine_tuning_job_id", "fine_tuned_model", "note"])
    for t in trials:
        row = studies.public_trial(t)
        writer.writerow(
            [
                t.number,
                row["state"],
                "" if row["value"] is None else row["value"],
                *(t.params.get(name, "") for name in names),
                row["fine_tuning_job_id"] or "",
                row["fine_tuned_model"] or "",
                row["note"] or "",
            ]
        )
    return out.getvalue().encode()


def render(study: Study, plot: Callable[..., Any]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ax = plot(study)
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure  # one axes, or a grid of them
    try:
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(figure)


def write_results(files: FileStore, search: Search, study: Study, trials: list[FrozenTrial]) -> list[str]:
    """Store the table and the plots the trials allow; their file ids. A plot that cannot be
    drawn, or a spent storage quota, leaves that file out (and says so in the log), not the search."""
    outputs: list[tuple[str, bytes]] = [("trials.csv", trials_csv(trials))] if trials else []
    complete = sum(t.state is TrialState.COMPLETE for t in trials)
    for name, (plot, needs) in PLOTS.items():
        if complete < needs:
            continue
        try:
            outputs.append((name, render(study, plot)))
        except Exception as exc:  # a plot Optuna cannot draw for these trials must not fail the search
            log.warning("search %s: %s not drawn: %s", search.id, name, exc)
    ids = []
    for name, data in outputs:
        try:
            record, _ = files.create(
                tenant=search.tenant,
                purpose=PURPOSE,
                filename=f"{search.id}-{name}",
                chunks=[data],
                max_bytes=len(data),
                generated=True,
            )
        except LLMOSError as exc:
            log.warning("search %s: %s not stored: %s", search.id, name, exc.message)
            continue
        ids.append(record.id)
    return ids
