"""``Xm2MLFlowLogger``: the MLflow logger every xm2 recipe names by ``class_path``.

It is Lightning's ``MLFlowLogger`` plus what xm2 promises of a run, with no patching of Lightning
or MLflow:

- **labelled parameters**: the data module's hyperparameters as ``data/...`` (Lightning logs them
  in one flat namespace with the model's), the trainer settings as ``trainer/...``;
- **parameters on resume**: MLflow refuses to change a logged parameter, so a resume that changed
  a safe setting keeps the run's first value and records ``xm2.changed_on_resume.<key>``;
- **git tags** ``xm2.git_commit`` and ``xm2.git_dirty`` on every run it opens or continues;
- **run identity**, as checkpoints record it (:meth:`identity`), and a resumed run set RUNNING;
- **the outage guard**: with an HTTP tracking server, every call goes through a
  :class:`~xm2.tracking.guard.TrackingGuard`, so training goes on while the server is away;
- **a local store that fails like its disk**: with a SQLite store, every call goes through a
  :class:`LocalStoreClient`, so a store that stops taking writes (made read-only, a full disk)
  stops the run with one line, its checkpoints kept, and a resume continues the same run;
- **one creator of a new store**: the store is opened by :func:`~xm2.tracking.store.open_store`
  and the experiment created race-free, so runs that start together on a new store all start.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from xm2.errors import TrackingError
from xm2.tracking import DEFAULT_TRACKING_URI, git_tags
from xm2.tracking.guard import TrackingGuard
from xm2.tracking.store import experiment_id, open_store, sqlite_path, storage_failure

# MLflow keeps at most this many characters of a parameter value (Lightning cuts to the same).
PARAM_VALUE_LIMIT = 250
CHANGED_ON_RESUME_TAG = "xm2.changed_on_resume."


class Xm2MLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger with xm2's labelled parameters, resume rules, tags and guard.

    Args:
        experiment_name: MLflow experiment of the run.
        run_name: Name of the run in the MLflow UI.
        tracking_uri: MLflow tracking server (``http://...``) or store (``sqlite:///...``).
        tags: Extra tags of the run (a study's parent run, a branch's lineage, ...).
        run_id: Continue this existing run instead of opening a new one (a resume sets it).
        log_model: Lightning's option: log checkpoints as MLflow artefacts too.
        artifact_location: Where a new experiment keeps its artefacts (the server's default if unset).
    """

    def __init__(
        self,
        experiment_name: str = "xm2",
        run_name: str | None = None,
        tracking_uri: str = DEFAULT_TRACKING_URI,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        log_model: bool = False,
        artifact_location: str | None = None,
    ) -> None:
        # Before Lightning's own client exists: that one builds the store too, without a lock.
        open_store(tracking_uri)
        super().__init__(experiment_name=experiment_name, run_name=run_name,
                         tracking_uri=tracking_uri, tags=tags, run_id=run_id,
                         log_model=log_model, artifact_location=artifact_location)
        self.experiment_name, self.run_name, self.tracking_uri = (experiment_name, run_name,
                                                                  tracking_uri)
        self.resumed_run_id, self.artifact_location = run_id, artifact_location
        self.backlog_dir = Path("artifacts/runs/tracking")
        self.guard: TrackingGuard | None = None
        self.local_store: LocalStoreClient | None = None
        # For the message of a store that stops taking writes: where training stopped, and
        # where its checkpoints are.
        self.last_step: int | None = None
        self.checkpoint_dir: str | None = None
        self._data_keys: frozenset[str] = frozenset()
        self._extra_params: dict[str, str] = {}
        self.opened = False

    # ------------------------------------------------------------------ set by the launch path

    def label_params(self, data_keys: Iterable[str], extra_params: Mapping[str, str]) -> None:
        """Which logged hyperparameters are the data module's, and the run's other parameters
        (trainer settings, seed) to log beside them."""
        self._data_keys = frozenset(data_keys)
        self._extra_params = dict(extra_params)

    def keep_backlog_in(self, folder: str | Path) -> None:
        """Where the outage guard keeps what the server could not receive."""
        self.backlog_dir = Path(folder)
        if self.guard is not None:
            self.guard.backlog_dir = self.backlog_dir

    # ------------------------------------------------------------------ the MLflow client

    @property
    def experiment(self) -> Any:
        if rank_zero_only.rank == 0 and not self.opened and self.resumed_run_id is None:
            # Lightning looks the experiment up and creates it if missing: of two runs starting
            # together on a new store, both would create it and one would fail.
            experiment_id(open_store(self.tracking_uri), self.experiment_name,
                          self.artifact_location)
        client = super().experiment
        if rank_zero_only.rank != 0:
            return client  # Lightning's stand-in: only the first rank talks to MLflow
        if not self.opened:
            self.opened = True
            self._open(client)
        return self.guard or self.local_store or client

    def _open(self, client: Any) -> None:
        # A server that is down at the start is a configuration error: the guard starts only
        # after the run exists, and only for a server. A local store fails like its disk: it
        # stops the run (see LocalStoreClient and docs/checkpoints.md).
        if self.tracking_uri.startswith("http"):
            self.guard = TrackingGuard(client, self.tracking_uri, self.backlog_dir)
        elif sqlite_path(self.tracking_uri) is not None:
            self.local_store = LocalStoreClient(client, self.store_refused)
        run_id = self.run_id
        if self.resumed_run_id:
            # A killed run was left RUNNING or FAILED; it runs again now, and ends FINISHED.
            client.update_run(run_id, status="RUNNING")
        for tag, value in git_tags().items():
            client.set_tag(run_id, tag, value)

    def store_refused(self, reason: str) -> TrackingError:
        """The one-line error of a local store that stopped taking writes mid-run."""
        at_step = "" if self.last_step is None else f" at step {self.last_step}"
        then = (f"training stopped and its checkpoints in {self.checkpoint_dir} are kept: make "
                "the store writable, then resume this run with --ckpt_path last"
                if self.checkpoint_dir else "training stopped before its first checkpoint: make "
                "the store writable and start the run again")
        return TrackingError(f"the MLflow store {sqlite_path(self.tracking_uri)} refused a "
                             f"write{at_step} ({reason}); {then}")

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.checkpoint_dir = getattr(checkpoint_callback, "dirpath", None)
        super().after_save_checkpoint(checkpoint_callback)

    def identity(self) -> dict:
        """Experiment and run as a checkpoint records them (a resume finds its run by these)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id,
                "experiment_name": self.experiment_name, "run_name": self.run_name,
                "tracking_uri": self.tracking_uri}

    # ------------------------------------------------------------------ parameters and metrics

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        labelled = {(f"data/{key}" if key in self._data_keys else key): value
                    for key, value in params.items() if not str(key).startswith("_")}
        flat = flatten_params({**labelled, **self._extra_params})
        if self.resumed_run_id:
            logged = self.experiment.get_run(self.run_id).data.params
            changed = {key: value for key, value in flat.items()
                       if key in logged and logged[key] != str(value)[:PARAM_VALUE_LIMIT]}
            for key, value in changed.items():
                self.experiment.set_tag(self.run_id, f"{CHANGED_ON_RESUME_TAG}{key}",
                                        f"{logged[key]} -> {value}")
            flat = {key: value for key, value in flat.items() if key not in changed}
        super().log_hyperparams(flat)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.last_step = step
        super().log_metrics(metrics, step)

    @rank_zero_only
    def restore_last_step_metrics(self, record: dict) -> None:
        """Log a checkpoint's last-step metrics if the killed run never got to log them."""
        metrics = record.get("last_step_metrics") or {}
        step = (record.get("global_step") or 0) - 1
        if not metrics or step < 0:
            return
        history = self.experiment.get_metric_history(self.run_id, "train/loss")
        if step not in {int(point.step) for point in history}:
            self.log_metrics(metrics, step=step)

    def report_unsent(self) -> None:
        """At the end of a command: name the backlog the server never received, if any."""
        if self.guard is not None:
            self.guard.report_unsent()


class LocalStoreClient:
    """A stand-in for the ``MlflowClient`` of a local store that fails like its disk.

    The first call that the store's database fails for a reason of its file (read-only, a full
    or failing disk) raises the logger's one-line :class:`~xm2.errors.TrackingError`, which stops
    training; Lightning saves nothing more, and the checkpoints already written stay. After that,
    calls do nothing: the run's own ending (Lightning marks it FAILED) would only fail again.
    A request the store refuses (a changed parameter) raises as it is.
    """

    def __init__(self, client: Any, refused: Callable[[str], TrackingError]) -> None:
        self._client, self._refused = client, refused
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.failed:
                return None
            with _quiet_store_errors():
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:
                    reason = storage_failure(error)
                    if reason is None:
                        raise
                    self.failed = True
                    raise self._refused(reason) from error

        return call


class _DropStoreErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SQLAlchemy database error")


@contextmanager
def _quiet_store_errors() -> Iterator[None]:
    """MLflow logs a database error with its whole traceback before raising it; the raised
    error is reported (in one line, or with XM2_TRACEBACK=1 in full), the log is not."""
    log, quiet = logging.getLogger("mlflow.store.db.utils"), _DropStoreErrors()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings, dataclasses and lists of mappings as ``a/b/c`` keys (MLflow's params are
    flat); other values as they are."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            flat |= flatten_params(value, f"{name}/")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                flat |= flatten_params(item, f"{name}/{index}/")
        else:
            flat[name] = value
    return flat
