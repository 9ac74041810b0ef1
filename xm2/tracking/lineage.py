"""Which MLflow run a resume, a decay branch or an evaluation of a checkpoint logs into.

A checkpoint's record names the run that wrote it (see ``run_identity``). Before the logger is
built, the launch path (xm2.run) points its config at that run (a resume continues the same run),
or at a new run tagged with its parent (a decay branch, nested under its stable run in the MLflow
UI), or at a new evaluation run tagged with the checkpoint. ``xm2 branches`` lists the branches.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from xm2.tracking import (
    DECAY_STEPS_TAG,
    DEFAULT_TRACKING_URI,
    PARENT_RUN_TAG,
    SOURCE_STEP_TAG,
    SOURCE_TOKENS_TAG,
)


def mlflow_logger_configs(logger_config: Any) -> list:
    """The MLflow logger entries (``class_path`` + ``init_args``) of a ``trainer.logger`` config."""
    from lightning.pytorch.loggers import MLFlowLogger

    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    found = []
    for entry in entries:
        class_path = str(getattr(entry, "get", lambda *_: "")("class_path", "") or "")
        if "." not in class_path:
            continue
        module, name = class_path.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue  # jsonargparse reports a class it cannot import itself
        if isinstance(cls, type) and issubclass(cls, MLFlowLogger):
            found.append(entry)
    return found


def run_name_and_experiment(logger_config: Any) -> tuple[str | None, str | None]:
    """The run name and experiment name the config's MLflow logger logs to."""
    for entry in mlflow_logger_configs(logger_config):
        return entry.init_args.get("run_name"), entry.init_args.get("experiment_name")
    return None, None


def continue_run(logger_config: Any, record: dict) -> str | None:
    """Point the MLflow logger at the checkpoint's run, so the resumed run is the same run."""
    resumed = None
    for entry in mlflow_logger_configs(logger_config):
        uri = entry.init_args.get("tracking_uri") or DEFAULT_TRACKING_URI
        same_store = record.get("tracking_uri") in (None, uri)
        if record.get("run_id") and same_store:
            entry.init_args.run_id = record["run_id"]
            resumed = record["run_id"]
        elif record.get("run_id"):
            print(f"The checkpoint's MLflow run {record['run_id']} is in another store "
                  f"({record.get('tracking_uri')}); this resume opens a new run.", file=sys.stderr)
    return resumed


def start_branch_run(logger_config: Any, record: dict, source_step: int,
                     source_tokens: int | None, decay_steps: int) -> None:
    """A new run for a decay branch, named after and tagged with the run it branches from."""
    for entry in mlflow_logger_configs(logger_config):
        args = entry.init_args
        parent_name = record.get("run_name") or "run"
        if args.get("run_name") in (None, record.get("run_name")):
            args.run_name = f"{parent_name}-decay-from-{source_step}"
        args.run_id = None
        tags = {SOURCE_STEP_TAG: str(source_step), SOURCE_TOKENS_TAG: str(source_tokens or ""),
                DECAY_STEPS_TAG: str(decay_steps)}
        uri = args.get("tracking_uri") or DEFAULT_TRACKING_URI
        if record.get("run_id") and record.get("tracking_uri") in (None, uri):
            # The parent tag also nests the branch under its stable run in the MLflow UI.
            tags |= {PARENT_RUN_TAG: record["run_id"], "mlflow.parentRunId": record["run_id"]}
        args.tags = {**(args.get("tags") or {}), **tags}


def tag_evaluation_run(logger_config: Any, record: dict, path: str, subcommand: str) -> None:
    """A new run for ``validate``/``test`` of a checkpoint, tagged with the checkpoint and its run."""
    for entry in mlflow_logger_configs(logger_config):
        args = entry.init_args
        args.run_id = None
        if args.get("run_name") in (None, record.get("run_name")):
            args.run_name = f"{record.get('run_name') or 'run'}-{subcommand}-step{record.get('global_step')}"
        tags = {"xm2.checkpoint": str(path), "xm2.checkpoint_step": str(record.get("global_step"))}
        if record.get("run_id"):
            tags["xm2.checkpoint_run_id"] = record["run_id"]
        args.tags = {**(args.get("tags") or {}), **tags}


def branches(run_id: str, tracking_uri: str = DEFAULT_TRACKING_URI) -> list[dict]:
    """The decay branches of a run: one row per branch, ordered by source step.

    Args:
        run_id: The MLflow run the branches were started from.
        tracking_uri: Where runs are tracked.
    """
    from xm2.tracking.store import open_store

    client = open_store(tracking_uri)
    parent = client.get_run(run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run_id}'")
    rows = [{
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "source_step": int(run.data.tags[SOURCE_STEP_TAG]),
        "source_tokens": int(float(run.data.tags.get(SOURCE_TOKENS_TAG) or 0)),
        "decay_steps": int(run.data.tags.get(DECAY_STEPS_TAG) or 0),
        "decay_style": run.data.params.get("schedule/decay_style"),
        "val_loss": run.data.metrics.get("val/loss"),
    } for run in runs]
    return sorted(rows, key=lambda row: (row["source_step"], row["run_name"] or ""))


def print_branches(run_id: str, tracking_uri: str = DEFAULT_TRACKING_URI) -> None:
    """List the decay branches started from a run (see ``xm2 fit --branch_from``).

    Args:
        run_id: The MLflow run the branches were started from.
        tracking_uri: Where runs are tracked.
    """
    rows = branches(run_id, tracking_uri)
    if not rows:
        print(f"run {run_id} has no decay branches")
        return
    print(f"{'source step':>11}  {'decay steps':>11}  {'style':<11}  {'val/loss':>8}  "
          f"{'status':<9}  run")
    for row in rows:
        loss = "" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        print(f"{row['source_step']:>11}  {row['decay_steps']:>11}  {row['decay_style'] or '':<11}  "
              f"{loss:>8}  {row['status']:<9}  {row['run_name']} ({row['run_id']})")
