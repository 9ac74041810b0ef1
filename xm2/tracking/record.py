"""How callbacks hand what they measured to a run: metrics, figures, tables and texts.

A callback records a value; the trainer's loggers log it (the xm2 MLflow logger as metrics and
artefacts of its run, any other logger with a ``log_dir`` as files under it). Values given to
``LightningModule.log`` wait for the next ``log_every_n_steps`` boundary and cannot be logged
from ``on_train_end``, so analyses record here instead, keyed by the step they describe.
No Lightning import: the trainer and its loggers are only duck-typed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def record_metrics(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log ``metrics`` now, at ``step`` (default the trainer's global step), to every logger."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def record_text(trainer: Any, text: str, artifact_file: str) -> None:
    """A text artefact (from the first rank only), e.g. ``config.yaml``."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        _log_text(logger, text, artifact_file)


def record_json(trainer: Any, data: Any, artifact_file: str) -> None:
    record_text(trainer, json.dumps(data, indent=1, allow_nan=True), artifact_file)


def record_csv(trainer: Any, rows: list[dict], artifact_file: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    record_text(trainer, buffer.getvalue(), artifact_file)


def record_figure(trainer: Any, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as a PNG artefact; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    try:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                _log_figure(logger, figure, artifact_file)
    finally:
        plt.close(figure)  # a no-op for figures that pyplot does not manage


def _mlflow_run(logger: Any) -> tuple[Any, str] | None:
    """The MLflow client and run id of an MLflow logger (Lightning's own, or xm2's)."""
    run_id = getattr(logger, "run_id", None)
    client = getattr(logger, "experiment", None) if run_id else None
    if client is not None and hasattr(client, "log_text"):
        return client, run_id
    return None


def _log_text(logger: Any, text: str, artifact_file: str) -> None:
    _deliver(logger, artifact_file, lambda client, run_id: client.log_text(run_id, text, artifact_file),
             lambda path: path.write_text(text))


def _log_figure(logger: Any, figure: Any, artifact_file: str) -> None:
    _deliver(logger, artifact_file,
             lambda client, run_id: client.log_figure(run_id, figure, artifact_file),
             figure.savefig)


def _deliver(logger: Any, artifact_file: str, to_run: Any, to_file: Any) -> None:
    """An artefact into the logger's MLflow run, or as a file under its ``log_dir``."""
    target = _mlflow_run(logger)
    if target:
        to_run(*target)
    elif getattr(logger, "log_dir", None):
        path = Path(logger.log_dir) / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file(path)
