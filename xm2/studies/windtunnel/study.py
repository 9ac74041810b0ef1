"""The wind tunnel's Optuna study: samplers, pruners and storage; creating or joining a study; and
failing the trials of workers that are gone, so that they are run again."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from xm2.errors import ConfigError, DataError
from xm2.studies.windtunnel.settings import Pruner, Runs, Sampler, SearchSpace
from xm2.tracking.runs import TrackedRun


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Builds the inner sampler afresh for each trial, seeded with ``seed + trial.number``.

    Optuna's samplers keep one random stream per process, so two workers with one seed propose
    the same points and a restarted worker proposes the first trials' points again. Models such
    as TPE and GP are fitted to the finished trials at every proposal, so nothing is lost by
    rebuilding them.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._inner = self._make(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(settings: Sampler) -> optuna.samplers.BaseSampler:
    """The study's sampler: ``settings.kind``, seeded per trial (:class:`TrialSeededSampler`)."""
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if settings.kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                              n_startup_trials=settings.startup_trials)
        if settings.kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.startup_trials)
        if settings.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        raise ConfigError(f"windtunnel sampler.kind={settings.kind!r}; allowed: tpe, gp, random")

    return TrialSeededSampler(make, settings.seed)


def make_pruner(settings: Pruner, validation_interval: int) -> optuna.pruners.BasePruner:
    """The study's pruner, its warmup counted in validations of ``validation_interval`` steps."""
    if settings.kind == "median":
        # Trials report at optimizer steps k × validation_interval; pruning starts after the
        # first warmup_validations of them.
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials,
            n_warmup_steps=settings.warmup_validations * validation_interval + 1)
    if settings.kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"windtunnel pruner.kind={settings.kind!r}; allowed: median, none")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """A URL (``sqlite:///…``, ``postgresql://…``) is an RDB; anything else a journal file."""
    if "://" in storage:
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
        return optuna.storages.RDBStorage(storage, engine_kwargs=engine)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    try:
        # Opening replays the whole journal: a garbled line fails here, in Optuna's words.
        return JournalStorage(JournalFileBackend(str(storage)))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise damaged_journal(Path(storage), error) from error


def damaged_journal(path: Path, error: Exception) -> DataError:
    """The error for a journal file Optuna cannot replay: the first bad line and how to recover."""
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
            good = isinstance(entry, dict) and "op_code" in entry
        except ValueError:  # not JSON, or not UTF-8
            good = False
        if not good:
            # A prefix of a journal is the study as it was then: what comes before is kept.
            keep = (f", or keep the study as it was before the damage: head -n {number - 1} "
                    f"{path}.damaged > {path}" if number > 1 else "")
            return DataError(
                f"windtunnel journal {path} is damaged at line {number} (not an Optuna journal "
                f"entry), so the study cannot be read. Move it away (mv {path} {path}.damaged) "
                f"to start the study afresh{keep}")
    return DataError(
        f"windtunnel journal {path} is damaged ({type(error).__name__}: {error}), so the study "
        f"cannot be read. Move it away (mv {path} {path}.damaged) to start the study afresh")


PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
# A trial FAILED by divergence is a result and counts towards the budget; one FAILED because
# its worker died, or as surplus, does not and is run again.
RESULT_FAILURE = "diverged"


def worker_id() -> str:
    """This process as the ``worker`` attribute of its trials: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str | None) -> bool:
    """True when ``worker`` (host:pid) ran on this host and its process no longer exists."""
    if not worker or worker.rsplit(":", 1)[0] != socket.gethostname():
        return False
    try:
        os.kill(int(worker.rsplit(":", 1)[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def counts_towards_budget(trial: FrozenTrial) -> bool:
    """Whether ``trial`` takes one of the study's places (see ``RESULT_FAILURE``)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("failure") == RESULT_FAILURE


def fail_stale_trials(study: optuna.Study, backend: optuna.storages.BaseStorage,
                      stale_after_s: float, tracking_uri: str) -> list[int]:
    """Mark FAILED the RUNNING trials whose worker is gone (same host, process ended) or silent
    for ``stale_after_s`` (another host); their MLflow runs become KILLED. A journal storage has
    no heartbeat of its own, so the trials keep theirs as a user attribute.

    ``backend`` is the study's storage, as :func:`open_storage` opened it. The reason is written
    through it: Optuna's ``Trial`` sets user attributes only on a trial this process asked for,
    while the storage interface, which every Optuna storage implements, reaches any trial.
    """
    now, failed = time.time(), []
    study_id = backend.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp()
                                    if trial.datetime_start else now)
        if not (_process_gone(worker) or now - beat > stale_after_s):
            continue
        trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            backend.set_trial_user_attr(trial_id, "failure", f"worker {worker} gone")
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # its worker finished it after all
        if trial.user_attrs.get("mlflow_run_id"):
            TrackedRun(tracking_uri, "", trial.user_attrs["mlflow_run_id"]).finish("KILLED")
        failed.append(trial.number)
    return failed


def study_settings(space: SearchSpace, proxy: Runs, objective: str) -> dict:
    """What makes trials of one study comparable; a worker with other settings is refused.
    The number of trials is not among them: rerunning with more trials extends the study."""
    return json.loads(json.dumps({"space": asdict(space), "proxy": asdict(proxy),
                                  "objective": objective}))


def open_study(
    name: str, storage: str, backend: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner, settings: dict,
    create_parent: Callable[[], str], enqueue: list[dict], wait_s: float = 120.0,
) -> tuple[optuna.Study, bool]:
    """Create the study, or join it; the creator also makes the MLflow parent run.

    ``backend`` is ``storage`` (a journal file or RDB URL, named in errors) opened with
    :func:`open_storage`. Creating is atomic in both storages (a name is taken once), so of
    several workers started together exactly one creates and the others wait for the parent
    run id to appear.
    """
    arguments = dict(study_name=name, storage=backend, sampler=sampler, pruner=pruner,
                     direction="minimize")
    try:
        study = optuna.create_study(**arguments)
    except optuna.exceptions.DuplicatedStudyError:
        study = None
    if study is None:
        study = optuna.load_study(**{k: v for k, v in arguments.items() if k != "direction"})
        deadline = time.time() + wait_s
        while PARENT_ATTR not in study.user_attrs:
            if time.time() > deadline:
                raise DataError(f"study {name!r} in {storage} has no MLflow parent run after "
                                f"{wait_s:.0f} s; its creator stopped early. Use a new name "
                                "or storage")
            time.sleep(1.0)
        stored = study.user_attrs.get(SETTINGS_ATTR) or {}
        differing = sorted(key for key in settings if settings[key] != stored.get(key))
        if differing:
            raise ConfigError(f"study {name!r} in {storage} was created with other settings "
                              f"({', '.join(differing)} differ): its trials would not compare. "
                              "Use the study's settings, or a new name or storage")
        return study, False
    study.set_user_attr(SETTINGS_ATTR, settings)
    for values in enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    study.set_user_attr(PARENT_ATTR, create_parent())
    return study, True
