"""Runs addressed by id: a study's parent run, its child runs of real fits, and figures as PNGs.

A study (coordinate check, µTransfer sweep, wind tunnel, decay study) is one *parent* run that
holds the study's settings, summary metrics and figures, with one *child* run per training run
under it. :class:`TrackedRun` addresses a run by id through ``MlflowClient`` and never through
MLflow's process-global "active run", so it works beside Lightning's ``MLFlowLogger``, in worker
processes that share a study, and when a study is resumed by another process
(:meth:`TrackedRun.attach`). A child is a run tagged ``mlflow.parentRunId``, which is all that
MLflow's nesting is; :meth:`TrackedRun.child_args` gives the ``xm2 fit`` words whose run is one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlflow
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunTag

from xm2.tracking import KIND_TAG, RECIPE_TAG
from xm2.tracking.store import experiment_id, open_store

# MLflow refuses more than this many entries of one kind in one log_batch call.
_BATCH_LIMIT = {"metrics": 1000, "params": 100, "tags": 100}
# MLflow's limit on a parameter value; longer values are cut rather than refused.
_PARAM_VALUE_LIMIT = 6000


class TrackedRun:
    """One MLflow run, addressed by id: params, metrics, tags, artefacts, figures, children.

    Use :meth:`start` for a new run (a study's parent, or a child of one) and :meth:`attach` to
    log into an existing one. As a context manager it ends the run FINISHED, or FAILED if the
    block raised.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.client = open_store(tracking_uri)

    # ------------------------------------------------------------------ opening

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        *,
        parent: TrackedRun | str | None = None,
        tags: Mapping[str, object] | None = None,
        params: Mapping[str, object] | None = None,
    ) -> TrackedRun:
        """Create a run (RUNNING) in ``experiment_name``; a child of ``parent`` if given."""
        client = open_store(tracking_uri)
        all_tags = {key: str(value) for key, value in (tags or {}).items()}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent if isinstance(parent, str) else parent.run_id
        created = client.create_run(experiment_id(client, experiment_name), run_name=run_name,
                                    tags=all_tags)
        run = cls(tracking_uri, experiment_name, created.info.run_id)
        if params:
            run.log_params(params)
        return run

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> TrackedRun:
        """An existing run, e.g. a study's parent reopened by a resumed or second process."""
        client = open_store(tracking_uri)
        run = client.get_run(run_id)  # raises if there is no such run
        experiment = client.get_experiment(run.info.experiment_id)
        return cls(tracking_uri, experiment.name, run_id)

    def child_args(self, run_name: str, tags: Mapping[str, object] | None = None) -> list[str]:
        """``xm2 fit`` words that send a run's logger into a new child run of this run: the
        run is then logged exactly as ``xm2 fit`` logs it, nested under this one."""
        all_tags = {key: str(value) for key, value in (tags or {}).items()}
        settings = {"experiment_name": self.experiment_name, "tracking_uri": self.tracking_uri,
                    "run_name": run_name, "run_id": None,
                    "tags": {**all_tags, "mlflow.parentRunId": self.run_id}}
        # Strings as they are, anything else as JSON (YAML to the parser), as xm2.run writes them.
        return [f"--trainer.logger.init_args.{key}="
                f"{value if isinstance(value, str) else json.dumps(value)}"
                for key, value in settings.items()]

    def children(self, filter_string: str = "") -> list[mlflow.entities.Run]:
        """The child runs of this run, oldest first; ``filter_string`` narrows them (MLflow syntax)."""
        clauses = [f"tags.mlflow.parentRunId = '{self.run_id}'"]
        if filter_string:
            clauses.append(filter_string)
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return self.client.search_runs([experiment], " AND ".join(clauses),
                                       order_by=["attributes.start_time ASC"], max_results=50_000)

    @classmethod
    def latest(cls, tracking_uri: str, experiment_name: str, filter_string: str) -> TrackedRun | None:
        """The newest run of ``experiment_name`` that matches ``filter_string`` (MLflow syntax)."""
        client = open_store(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return None
        found = client.search_runs([experiment.experiment_id], filter_string,
                                   order_by=["attributes.start_time DESC"], max_results=1)
        return cls(tracking_uri, experiment_name, found[0].info.run_id) if found else None

    @classmethod
    def training_run(cls, tracking_uri: str, experiment_name: str = "xm2",
                     recipe: str | None = None) -> TrackedRun | None:
        """The recipe's run: the newest ``xm2 fit`` training run (tag ``xm2.kind`` = training,
        so no trial, branch or evaluation), of ``recipe`` (tag ``xm2.recipe``) if given.

        A finished run is preferred; with none finished, the newest running one (a notebook can
        draw what it has logged so far; ``run.info.status`` says which). None if there is none.
        """
        client = open_store(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return None
        clauses = [f"tags.`{KIND_TAG}` = 'training'"]
        if recipe is not None:
            clauses.append(f"tags.`{RECIPE_TAG}` = '{recipe}'")
        for status in ("FINISHED", "RUNNING"):
            found = client.search_runs(
                [experiment.experiment_id],
                " AND ".join([*clauses, f"attributes.status = '{status}'"]),
                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                return cls(tracking_uri, experiment_name, found[0].info.run_id)
        return None

    # ------------------------------------------------------------------ reading

    @property
    def run(self) -> mlflow.entities.Run:
        """The run as MLflow has it now: info (name, status), params, tags, last metrics."""
        return self.client.get_run(self.run_id)

    def metric_history(self, key: str) -> dict[int, float]:
        """Every logged value of metric ``key``, by step."""
        return {int(point.step): point.value
                for point in self.client.get_metric_history(self.run_id, key)}

    def download(self, artifact_path: str) -> Path:
        """A local copy of one of the run's artefacts."""
        return Path(self.client.download_artifacts(self.run_id, artifact_path))

    # ------------------------------------------------------------------ logging

    def log_params(self, params: Mapping[str, object]) -> None:
        """Parameters as strings (lists and tuples as written by ``str``)."""
        entries = [Param(key, str(value)[:_PARAM_VALUE_LIMIT]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH_LIMIT["params"]):
            self.client.log_batch(self.run_id, params=entries[start:start + _BATCH_LIMIT["params"]])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for start in range(0, len(entries), _BATCH_LIMIT["tags"]):
            self.client.log_batch(self.run_id, tags=entries[start:start + _BATCH_LIMIT["tags"]])

    def log_metrics(
        self, metrics: Mapping[str, float], step: int = 0, *, skip_non_finite: bool = False
    ) -> None:
        """Metrics at one step. MLflow stores ±inf as ±max float and nan as nan, so a diverged
        value stays visible; ``skip_non_finite`` drops them instead (for ratios where a
        non-finite value means "undefined" rather than "diverged")."""
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()
                   if not skip_non_finite or math.isfinite(float(value))]
        self.log_metric_entries(entries)

    def log_curves(self, points: Iterable[tuple[str, float, int]]) -> None:
        """Many metrics at many steps, as (key, value, step): whole curves in as few calls as
        MLflow allows."""
        now = int(time.time() * 1000)
        self.log_metric_entries(Metric(key, float(value), now, step) for key, value, step in points)

    def log_metric_entries(self, entries: Iterable[Metric]) -> None:
        """MLflow ``Metric`` entries, in as few calls as MLflow allows."""
        entries = list(entries)
        for start in range(0, len(entries), _BATCH_LIMIT["metrics"]):
            self.client.log_batch(self.run_id,
                                  metrics=entries[start:start + _BATCH_LIMIT["metrics"]])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A local file as an artefact of this run (under folder ``artifact_path`` if given)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artefact written straight from memory, e.g. ``best.yaml``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(
        self, figure: Figure, path: str | Path, artifact_path: str | None = None, dpi: int = 120
    ) -> Path:
        """Save ``figure`` as a PNG at ``path`` (kept on disk) and log it as an artefact."""
        path = save_figure(figure, path, dpi=dpi)
        self.log_artifact(path, artifact_path)
        return path

    # ------------------------------------------------------------------ ending

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # KeyboardInterrupt counts as KILLED: the study was stopped, not broken.
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` as a PNG, creating its folder, and release it if pyplot made it.

    Figures built as ``matplotlib.figure.Figure`` need no pyplot and no display; figures from
    pyplot-based helpers (e.g. Optuna's matplotlib visualisation) are closed after saving so that
    a study of many trials does not accumulate open figures.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(figure)  # a no-op for figures that pyplot does not manage
    return path
