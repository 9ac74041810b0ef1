"""One wind-tunnel trial: its values sampled, the shortened recipe fitted as a child run of the
study's parent, the outcome told to the study; and the data prepared once before any trial."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from xm2.data.datamodule import MixtureDataModule
from xm2.studies.windtunnel.callbacks import DivergenceGuard, RecordRun, ReportToTrial
from xm2.studies.windtunnel.recipe import RunShape, get_path, shortened, tracked_fit
from xm2.studies.windtunnel.settings import Runs
from xm2.studies.windtunnel.study import RESULT_FAILURE, worker_id
from xm2.tracking.runs import TrackedRun


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise first-time data preparation between worker processes on this machine."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(config: dict, lock: Path) -> None:
    """Tokenizer and shards of a recipe, built once before any trial (``xm2 fit`` would build
    them in the first trial; several workers at once must not build them together)."""
    data = {k: v for k, v in (config.get("data") or {}).items()
            if k in ("corpus_dir", "tokenizer_path", "shards_dir", "stable", "decay")}
    data["vocab_size"] = get_path(config, "model.architecture.vocab_size")
    with _file_lock(lock):
        MixtureDataModule(**data).prepare_data()


def run_trial(
    study: optuna.Study, trial: optuna.Trial, *, name: str, proxy: Runs,
    shape: RunShape, distributions: dict[str, BaseDistribution], objective: str,
    diverge_factor: float, parent: TrackedRun, output: Path,
) -> FrozenTrial:
    """One trial: sample, fit, tell. Divergence and pruning are results; anything else raises."""
    values = {param: suggest(trial, param, distribution)
              for param, distribution in distributions.items()}
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("heartbeat", time.time())
    logger_args = parent.child_args(f"{name}-trial-{trial.number:03d}", tags={
        "optuna.study": name, "optuna.trial": trial.number, "windtunnel.role": "trial"})
    report = ReportToTrial(trial, objective)
    record = RecordRun({f"trial/{param}": value for param, value in values.items()},
                       on_run=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
    callbacks = [DivergenceGuard(diverge_factor), report, record]
    try:
        result = tracked_fit(proxy, shortened(proxy, shape, values, root_dir=output / "runs"),
                             logger_args, callbacks, objective)
    except BaseException as error:
        trial.set_user_attr("failure", f"{type(error).__name__}: {error}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", round(result.seconds, 2))
    trial.set_user_attr("fit_seconds", round(result.fit_seconds, 2))
    client = parent.client
    if result.diverged:
        trial.set_user_attr("failure", RESULT_FAILURE)
        trial.set_user_attr("reason", result.diverged)
        client.set_tag(result.run_id, "windtunnel.diverged", result.diverged)
        finished = study.tell(trial, state=TrialState.FAIL)
        client.set_terminated(result.run_id, "FAILED")
    elif result.pruned_at is not None:
        client.set_tag(result.run_id, "windtunnel.pruned_at_step", result.pruned_at)
        finished = study.tell(trial, state=TrialState.PRUNED)
    else:
        client.log_metric(result.run_id, "objective", result.value)
        finished = study.tell(trial, result.value)
    client.set_tag(result.run_id, "optuna.state", finished.state.name)
    if finished.state == TrialState.COMPLETE:
        parent.log_metrics({"trial/value": finished.value}, step=trial.number)
    return finished


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """The trial's value of ``name`` (a planted value of an enqueued trial, or a proposal)."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high,
                                 step=distribution.step, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high,
                               step=distribution.step, log=distribution.log)
