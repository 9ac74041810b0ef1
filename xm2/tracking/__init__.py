"""Tracking: the one home of everything xm2 tells MLflow.

- :mod:`xm2.tracking.logger`: ``Xm2MLFlowLogger``, the logger every recipe names; it owns the
  run's labelled parameters, parameters on resume, git tags, run identity and the outage guard.
- :mod:`xm2.tracking.record`: how callbacks hand metrics, figures and tables to a trainer's loggers.
- :mod:`xm2.tracking.runs`: ``TrackedRun``, a run addressed by id, for studies (a parent run
  with child runs) and evaluations.
- :mod:`xm2.tracking.lineage`: resumes, decay branches and evaluations of a checkpoint: which
  run they log into and how they are tagged; ``xm2 branches``.
- :mod:`xm2.tracking.guard`: the outage guard and its backlog; ``xm2 tracking-sync``.
- :mod:`xm2.tracking.store`: ``open_store``, the one way xm2 opens a store: a new local SQLite
  store is created once, under a lock, however many processes start on it together.

This module imports nothing heavy (no Lightning, no MLflow): ``xm2 --help`` imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from xm2.errors import TrackingError, chain

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""The local SQLite store in the working directory, where every command logs by default."""

LOGGER_CLASS_PATH = "xm2.tracking.logger.Xm2MLFlowLogger"
"""The logger a config names for a run tracked as ``xm2 fit`` tracks it (the recipes name it)."""

# Tags of a decay branch's run (see xm2.tracking.lineage and ``xm2 branches``).
PARENT_RUN_TAG, SOURCE_STEP_TAG = "xm2.parent_run_id", "xm2.source_step"
SOURCE_TOKENS_TAG, DECAY_STEPS_TAG = "xm2.source_tokens", "xm2.decay_steps"

# What a run is, set on every run the xm2 logger opens (xm2.tracking.logger): "training" (an
# `xm2 fit` of a recipe, resumes included), "branch" (a decay branch: it carries PARENT_RUN_TAG),
# "study" (a study's child run: a wind-tunnel trial, a sweep point, a coordinate-check fit),
# "validate" or "test" (an evaluation of a checkpoint). RECIPE_TAG is the stem of the run's first
# --config file ("nano" for config/nano.yaml). Notebooks pick "the recipe's run" by these two.
KIND_TAG, RECIPE_TAG = "xm2.kind", "xm2.recipe"
RUN_KINDS = ("training", "branch", "study", "validate", "test")

# A dead server must be noticed in seconds, not after MLflow's default 7 retries with backoff.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def use_quick_http_failures() -> None:
    """Make MLflow HTTP calls fail within seconds unless the user chose otherwise."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def run_identity(logger: Any) -> dict:
    """Experiment and run of a Lightning logger, as recorded in checkpoints."""
    if logger is None:
        return {}
    if hasattr(logger, "identity"):  # Xm2MLFlowLogger
        return logger.identity()
    return {"run_id": None if logger.version is None else str(logger.version),
            "experiment_name": logger.name}


def git_tags() -> dict[str, str]:
    """``xm2.git_commit`` and ``xm2.git_dirty`` of the xm2 code that runs ("unknown" outside git)."""
    folder = Path(__file__).resolve().parents[2]

    def git(*words: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(folder), *words], capture_output=True,
                                    text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"xm2.git_commit": "unknown", "xm2.git_dirty": "unknown"}
    # Untracked files do not change what runs; modified tracked files do.
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"xm2.git_commit": commit,
            "xm2.git_dirty": "unknown" if changes is None else str(bool(changes)).lower()}


def unreachable_server(error: BaseException) -> TrackingError | None:
    """An MLflow request in ``error`` (or what it wraps) that could not reach its server, as an
    error that names the URL; None if there is none."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    for link in chain(error):
        if mlflow_exceptions and isinstance(link, mlflow_exceptions.MlflowException):
            message = str(link.message)
            if message.startswith("API request to ") and " failed with" in message:
                url = message.removeprefix("API request to ").split(" failed with")[0]
                # MLflow names the full URL, or only the endpoint when the request never left.
                where = f"at {url}" if url.startswith("http") else f"({message[:300]})"
                return TrackingError(f"the MLflow tracking server does not answer {where}; start "
                                     "it, or log to a local store with --trainer.logger.init_args."
                                     f"tracking_uri {DEFAULT_TRACKING_URI}")
    return None
