"""Figures and tables of an analysis into the run of whatever logger a trainer has.

MLflow loggers (their ``experiment`` is an ``MlflowClient``) get the files as artefacts of their
run; any other logger with a ``log_dir`` gets them written under it; with no logger they are
dropped. No Lightning import: the logger is only duck-typed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


def _mlflow_target(logger: Any):
    run_id = getattr(logger, "run_id", None)
    experiment = getattr(logger, "experiment", None) if run_id else None
    if experiment is not None and hasattr(experiment, "log_text"):
        return experiment, run_id
    return None


def log_figure(logger: Any, figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    try:
        target = _mlflow_target(logger)
        if target:
            target[0].log_figure(target[1], figure, artifact_file)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / artifact_file
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)
    finally:
        plt.close(figure)


def log_text(logger: Any, text: str, artifact_file: str) -> None:
    target = _mlflow_target(logger)
    if target:
        target[0].log_text(target[1], text, artifact_file)
    elif getattr(logger, "log_dir", None):
        path = Path(logger.log_dir) / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def log_json(logger: Any, data: Any, artifact_file: str) -> None:
    log_text(logger, json.dumps(data, indent=1, allow_nan=True), artifact_file)


def log_csv(logger: Any, rows: list[dict], artifact_file: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    log_text(logger, buffer.getvalue(), artifact_file)
