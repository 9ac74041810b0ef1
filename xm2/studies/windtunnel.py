"""The wind tunnel: Bayesian search of the µP hyperparameters on a small proxy, then transfer.

Xmodel-2 tuned four µP values (scale_emb, dim_model_base, scale_depth and the learning rate) on
a ~6M-parameter proxy with Bayesian optimisation and carried them to 1.2B unchanged. Here every
trial is a real ``xm2 fit`` of a shortened recipe (the proxy's configs, a token budget, the same
WSD shape), proposed by Optuna (TPE, or a GP), stopped early when it diverges (recorded FAILED)
or when its intermediate validation losses are hopeless (PRUNED).

The study lives in an Optuna storage (a journal file, or an RDB URL such as PostgreSQL), so an
interrupted study resumes where it stopped and any number of worker processes, on one machine
or many, can run the same command against the same storage and share the trials. MLflow gets one
parent run per study (created by the process that creates the study) and one child run per
trial; the parent holds the best values, the optimisation history, importances, slice plots and
``best.yaml``, a config that ``xm2 fit`` runs as is. ``action: transfer`` trains a wider model
at the best values and at learning rates 2^k around the best one, under the same parent.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import optuna
import yaml
from matplotlib.figure import Figure
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from xm2.config import ModelConfig
from xm2.data.datamodule import MixtureDataModule
from xm2.module import NonFiniteLossError
from xm2.studies.tracked import TrackedRun, quiet_lightning

# ----------------------------------------------------------------------------- settings

ConfigValue = int | float | str | bool | list | dict | None
"""A config value as YAML writes it. Not ``Any``: the CLI parser would instantiate a mapping
with a ``class_path`` (e.g. a callbacks list) instead of keeping it as config."""


@dataclass(frozen=True)
class Dimension:
    """One searched value: a range ``[low, high]`` (on a ``step`` grid or a log scale) or a list
    of ``choices``."""

    low: float | None = None
    high: float | None = None
    step: float | None = None
    """Grid spacing of the range; Optuna cannot combine it with ``log``."""
    log: bool = False
    """Sample the range log-uniformly (for learning rates)."""
    choices: tuple[int | float, ...] | None = None
    """Categorical values; excludes low/high/step/log."""

    def distribution(self, name: str) -> BaseDistribution:
        """The Optuna distribution; refuses an ill-formed dimension with what is allowed."""
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step or self.log:
                raise ValueError(f"windtunnel space.{name}: give choices or low/high, not both")
            if not self.choices:
                raise ValueError(f"windtunnel space.{name}.choices is empty")
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"windtunnel space.{name}: low={self.low}, high={self.high}; "
                             "need low < high, or choices")
        if self.log and self.step is not None:
            raise ValueError(f"windtunnel space.{name}: step={self.step} and log=true; Optuna "
                             "samples on a grid or on a log scale, not both")
        if self.log and self.low <= 0:
            raise ValueError(f"windtunnel space.{name}: log scale needs low > 0, got {self.low}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"windtunnel space.{name}: step={self.step} must be > 0")
        integer = (all(float(v).is_integer() for v in (self.low, self.high))
                   and self.step is not None and float(self.step).is_integer())
        if integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        step=int(self.step))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log,
                                                      step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    """The searched µP values (the paper's Table 5); ``null`` keeps the recipe's value."""

    scale_emb: Dimension | None = Dimension(low=2, high=20, step=1)
    dim_model_base: Dimension | None = Dimension(choices=(32, 64, 128, 256, 512, 1024))
    scale_depth: Dimension | None = Dimension(low=1.0, high=5.0, step=0.1)
    lr: Dimension | None = Dimension(low=0.001, high=0.1, log=True)
    init_std: Dimension | None = None

    def distributions(self) -> dict[str, BaseDistribution]:
        found = {name: getattr(self, name).distribution(name) for name in CONFIG_PATHS
                 if getattr(self, name) is not None}
        if not found:
            raise ValueError("windtunnel space is empty; search at least one of "
                             + ", ".join(CONFIG_PATHS))
        return found


CONFIG_PATHS = {
    "scale_emb": "model.architecture.scale_emb",
    "dim_model_base": "model.architecture.dim_model_base",
    "scale_depth": "model.architecture.scale_depth",
    "lr": "model.optimizer.lr",
    "init_std": "model.architecture.init_std",
}
"""Where each searchable value lives in an ``xm2 fit`` config."""


@dataclass(frozen=True)
class Runs:
    """Short runs of an ``xm2 fit`` recipe: which configs, how many tokens, which WSD shape."""

    configs: tuple[str, ...] = ("config/nano.yaml",)
    """``xm2 fit`` config files, composed in order (later wins), as ``--config`` does."""
    tokens: int = 400_000
    """Training tokens per run (rounded to whole validation intervals)."""
    validations: int = 4
    """Validations per run, evenly spaced, the last at the end; the pruner sees each one."""
    warmup_fraction: float = 0.1
    """Fraction of the steps in linear warmup."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, in the recipe's decay (and decay data mixture)."""
    keep_callbacks: tuple[str, ...] = ("lightning.pytorch.callbacks.LearningRateMonitor",
                                       "callbacks.mixture.MixtureMonitor")
    """Callbacks of the recipe kept in each run (class paths); checkpoints and progress bars go."""
    overrides: dict[str, ConfigValue] | None = None
    """Dotted config paths set in every run, e.g. ``data.val_batches_per_source: 2``."""


@dataclass(frozen=True)
class Transfer(Runs):
    """The wider model that the best values are carried to, and the learning rates tried."""

    configs: tuple[str, ...] = ("config/nano.yaml", "config/model/tiny.yaml")
    tokens: int = 200_000
    log2_lr_factors: tuple[float, ...] = (-2, -1, 0, 1, 2)
    """The best learning rate is multiplied by 2^k for each k."""


@dataclass(frozen=True)
class Sampler:
    kind: Literal["tpe", "gp", "random"] = "tpe"
    """tpe: multivariate TPE (the lab's choice); gp: Gaussian process with log EI; random."""
    seed: int = 0
    """Trial n is proposed by a sampler seeded with seed + n, so a resumed or parallel study
    proposes what one uninterrupted process would, given the same finished trials."""
    startup_trials: int = 8
    """Random trials before the model-based proposals start."""


@dataclass(frozen=True)
class Pruner:
    kind: Literal["median", "none"] = "median"
    """median: stop a trial whose intermediate objective is worse than the median of earlier
    trials at the same step; none: never prune."""
    startup_trials: int = 5
    """Finished trials before any pruning."""
    warmup_validations: int = 1
    """Validations of a trial before it can be pruned."""


# ----------------------------------------------------------------------------- config files


def load_recipe(runs: Runs) -> dict:
    """The ``xm2 fit`` configs of ``runs`` composed in order (mappings merge, anything else is
    replaced, as ``--config a --config b`` does), with ``runs.overrides`` set."""
    recipe: dict = {}
    for path in runs.configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"windtunnel config {path} does not exist; give xm2 fit "
                                    "config files, e.g. config/nano.yaml")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"windtunnel config {path} is not a mapping of settings")
        _merge(recipe, loaded)
    for dotted, value in (runs.overrides or {}).items():
        set_path(recipe, dotted, value)
    return recipe


def _merge(into: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def get_path(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def set_path(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"config path {dotted}: {key} is not a mapping")
    node[last] = value


def recipe_values(recipe: dict) -> dict[str, Any]:
    """The recipe's own value of every searchable setting (class defaults where it is silent)."""
    defaults = {"lr": 0.01, **{name: getattr(ModelConfig, name) for name in CONFIG_PATHS
                               if name != "lr"}}
    return {name: get_path(recipe, path, defaults[name]) for name, path in CONFIG_PATHS.items()}


@dataclass(frozen=True)
class RunShape:
    steps: int
    validation_interval: int
    warmup_steps: int
    decay_start_step: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def run_shape(recipe: dict, runs: Runs) -> RunShape:
    """Steps, validation interval and WSD boundaries of a run of ``runs.tokens`` tokens."""
    if runs.tokens < 1 or runs.validations < 1:
        raise ValueError(f"windtunnel tokens={runs.tokens} and validations={runs.validations} "
                         "must be >= 1")
    if not (0 <= runs.warmup_fraction and 0 <= runs.decay_fraction
            and runs.warmup_fraction + runs.decay_fraction <= 1):
        raise ValueError(f"windtunnel warmup_fraction={runs.warmup_fraction} and decay_fraction="
                         f"{runs.decay_fraction} must be >= 0 and sum to at most 1")
    batch = get_path(recipe, "data.batch_size", 16)
    seq_len = get_path(recipe, "model.architecture.max_seq_len", ModelConfig.max_seq_len)
    accumulate = get_path(recipe, "trainer.accumulate_grad_batches", 1) or 1
    tokens_per_step = batch * seq_len * accumulate
    interval = max(1, round(runs.tokens / tokens_per_step / runs.validations))
    steps = interval * runs.validations
    # The decay must start inside the run (at the last step at the latest), after the warmup.
    decay_start = min(steps - 1, steps - round(steps * runs.decay_fraction))
    warmup = min(round(steps * runs.warmup_fraction), decay_start)
    return RunShape(steps, interval, warmup, decay_start, tokens_per_step)


def shortened(recipe: dict, runs: Runs, shape: RunShape, values: Mapping[str, Any],
              root_dir: Path | None = None) -> dict:
    """The recipe as one short tracked run: searched values set, WSD fitted to the budget,
    checkpoints and progress bars off (a trial is measured, not kept)."""
    config = copy.deepcopy(recipe)
    for name, value in values.items():
        set_path(config, CONFIG_PATHS[name], value)
    trainer = config.setdefault("trainer", {})
    trainer.update(max_steps=shape.steps, val_check_interval=shape.validation_interval,
                   check_val_every_n_epoch=None, num_sanity_val_steps=0,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    trainer.pop("max_epochs", None)
    if root_dir is not None:
        trainer["default_root_dir"] = str(root_dir)
    trainer["callbacks"] = [callback for callback in trainer.get("callbacks") or []
                            if _class_path(callback) in runs.keep_callbacks]
    set_path(config, "model.schedule.warmup_steps", shape.warmup_steps)
    set_path(config, "model.schedule.decay_start_step", shape.decay_start_step)
    return config


def _class_path(callback: Any) -> str:
    return callback.get("class_path", "") if isinstance(callback, dict) else str(callback)


# ----------------------------------------------------------------------------- one tracked fit


class TrialDiverged(RuntimeError):
    """The training loss exploded or stopped being finite."""


class DivergenceGuard(L.Callback):
    """Ends a fit whose train loss is not finite or exceeds ``factor`` × its first value."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:  # a skipped (non-finite) step
            raise TrialDiverged(f"the training loss is not finite at step {trainer.global_step}")
        loss = float(outputs["loss"])
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.factor * self.first_loss:
            raise TrialDiverged(f"the training loss is {loss:.4g} at step {trainer.global_step}"
                                f" (first {self.first_loss:.4g}, limit {self.factor:g}×)")


class ReportToTrial(L.Callback):
    """Reports each validation's objective to the Optuna trial at the optimizer step it was
    measured (Optuna's own Lightning callback reports the epoch, so a run of one long epoch
    would report once), stops the fit when the pruner says so, and keeps the trial's heartbeat."""

    def __init__(self, trial: optuna.Trial, objective: str, heartbeat_s: float = 30.0) -> None:
        self.trial, self.objective, self.heartbeat_s = trial, objective, heartbeat_s
        self.pruned_at: int | None = None
        self._last_beat = 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.objective not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.objective])
        if not math.isfinite(value):
            raise TrialDiverged(f"{self.objective} is {value} at step {trainer.global_step}")
        self.trial.report(value, trainer.global_step)
        if self.trial.should_prune():
            self.pruned_at = trainer.global_step
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.time()
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            self.trial.set_user_attr("heartbeat", now)


@dataclass
class FitResult:
    value: float | None
    """Final objective; None if the run diverged or was pruned."""
    run_id: str
    seconds: float
    """Wall time of the whole fit: config parsing, instantiation, training, validation."""
    diverged: str | None = None
    """Why the run was stopped as diverged."""
    pruned_at: int | None = None
    fit_seconds: float = 0.0
    """Wall time inside ``Trainer.fit`` (the rest is config parsing and instantiation)."""


def tracked_fit(config: dict, logger, callbacks: list[L.Callback], objective: str) -> FitResult:
    """``xm2 fit`` of one config dict (the same parser, links and config logging), into
    ``logger``; a diverging fit ends early and is returned, not raised."""
    from xm2.lightning_cli import TrackConfig, Xm2CLI  # Lightning's parser: import it late
    from xm2.module import Xm2Module

    config = copy.deepcopy(config)
    config["trainer"]["logger"] = False  # the logger object comes through trainer_defaults
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning warns when a command line exists beside args; here args is the whole config.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = Xm2CLI(Xm2Module, MixtureDataModule, save_config_callback=TrackConfig,
                     save_config_kwargs={"save_to_log_dir": False},
                     auto_configure_optimizers=False, trainer_defaults={"callbacks": callbacks},
                     run=False, args=config)
    cli.trainer.loggers = [logger]
    fit_started = time.perf_counter()
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except (NonFiniteLossError, TrialDiverged) as error:
        now = time.perf_counter()
        return FitResult(None, logger.run_id, now - started, diverged=str(error),
                         fit_seconds=now - fit_started)
    now = time.perf_counter()
    times = {"seconds": now - started, "fit_seconds": now - fit_started}
    pruned_at = next((c.pruned_at for c in callbacks if isinstance(c, ReportToTrial)), None)
    if pruned_at is not None:
        return FitResult(None, logger.run_id, pruned_at=pruned_at, **times)
    value = cli.trainer.callback_metrics.get(objective)
    if value is None:
        raise KeyError(f"objective {objective!r} was not logged; validation logs "
                       f"{sorted(cli.trainer.callback_metrics)}")
    return FitResult(float(value), logger.run_id, **times)


# ----------------------------------------------------------------------------- the study


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
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if settings.kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                              n_startup_trials=settings.startup_trials)
        if settings.kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.startup_trials)
        if settings.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        raise ValueError(f"windtunnel sampler.kind={settings.kind!r}; allowed: tpe, gp, random")

    return TrialSeededSampler(make, settings.seed)


def make_pruner(settings: Pruner, validation_interval: int) -> optuna.pruners.BasePruner:
    if settings.kind == "median":
        # Trials report at optimizer steps k × validation_interval; pruning starts after the
        # first warmup_validations of them.
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials,
            n_warmup_steps=settings.warmup_validations * validation_interval + 1)
    if settings.kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"windtunnel pruner.kind={settings.kind!r}; allowed: median, none")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """A URL (``sqlite:///…``, ``postgresql://…``) is an RDB; anything else a journal file."""
    if "://" in storage:
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
        return optuna.storages.RDBStorage(storage, engine_kwargs=engine)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(storage)))


PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
# A trial FAILED by divergence is a result and counts towards the budget; one FAILED because
# its worker died, or as surplus, does not and is run again.
RESULT_FAILURE = "diverged"


def _worker_id() -> str:
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
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("failure") == RESULT_FAILURE


def fail_stale_trials(study: optuna.Study, stale_after_s: float, tracking_uri: str) -> list[int]:
    """Mark FAILED the RUNNING trials whose worker is gone (same host, process ended) or silent
    for ``stale_after_s`` (another host); their MLflow runs become KILLED. A journal storage has
    no heartbeat of its own, so the trials keep theirs as a user attribute."""
    now, failed = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp()
                                    if trial.datetime_start else now)
        if not (_process_gone(worker) or now - beat > stale_after_s):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "failure", f"worker {worker} gone")
        try:
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
    name: str, storage: str, sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner, settings: dict, create_parent: Callable[[], str],
    enqueue: list[dict], wait_s: float = 120.0,
) -> tuple[optuna.Study, bool]:
    """Create the study, or join it; the creator also makes the MLflow parent run.

    Creating is atomic in both storages (a name is taken once), so of several workers started
    together exactly one creates and the others wait for the parent run id to appear.
    """
    backend = open_storage(storage)
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
                raise RuntimeError(f"study {name!r} in {storage} has no MLflow parent run after "
                                   f"{wait_s:.0f} s; its creator stopped early. Use a new name "
                                   "or storage")
            time.sleep(1.0)
        stored = study.user_attrs.get(SETTINGS_ATTR) or {}
        differing = sorted(key for key in settings if settings[key] != stored.get(key))
        if differing:
            raise ValueError(f"study {name!r} in {storage} was created with other settings "
                             f"({', '.join(differing)} differ): its trials would not compare. "
                             "Use the study's settings, or a new name or storage")
        return study, False
    study.set_user_attr(SETTINGS_ATTR, settings)
    for values in enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    study.set_user_attr(PARENT_ATTR, create_parent())
    return study, True


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
    data["vocab_size"] = get_path(config, "model.architecture.vocab_size", ModelConfig.vocab_size)
    with _file_lock(lock):
        MixtureDataModule(**data).prepare_data()


def run_trial(
    study: optuna.Study, trial: optuna.Trial, *, name: str, recipe: dict, proxy: Runs,
    shape: RunShape, distributions: dict[str, BaseDistribution], objective: str,
    diverge_factor: float, parent: TrackedRun, output: Path,
) -> FrozenTrial:
    """One trial: sample, fit, tell. Divergence and pruning are results; anything else raises."""
    values = {param: suggest(trial, param, distribution)
              for param, distribution in distributions.items()}
    trial.set_user_attr("worker", _worker_id())
    trial.set_user_attr("heartbeat", time.time())
    config = shortened(recipe, proxy, shape, values, root_dir=output / "runs")
    logger = parent.child_logger(f"{name}-trial-{trial.number:03d}", tags={
        "optuna.study": name, "optuna.trial": trial.number, "windtunnel.role": "trial"})
    trial.set_user_attr("mlflow_run_id", logger.run_id)
    logger.log_hyperparams({f"trial/{param}": value for param, value in values.items()})
    report = ReportToTrial(trial, objective)
    callbacks = [DivergenceGuard(diverge_factor), report]
    try:
        result = tracked_fit(config, logger, callbacks, objective)
    except BaseException as error:
        trial.set_user_attr("failure", f"{type(error).__name__}: {error}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", round(result.seconds, 2))
    trial.set_user_attr("fit_seconds", round(result.fit_seconds, 2))
    client = logger.experiment
    if result.diverged:
        trial.set_user_attr("failure", RESULT_FAILURE)
        trial.set_user_attr("reason", result.diverged)
        client.set_tag(result.run_id, "windtunnel.diverged", result.diverged)
        state = study.tell(trial, state=TrialState.FAIL).state
        client.set_terminated(result.run_id, "FAILED")
    elif result.pruned_at is not None:
        client.set_tag(result.run_id, "windtunnel.pruned_at_step", result.pruned_at)
        state = study.tell(trial, state=TrialState.PRUNED).state
    else:
        client.log_metric(result.run_id, "objective", result.value)
        state = study.tell(trial, result.value).state
    client.set_tag(result.run_id, "optuna.state", state.name)
    finished = study._storage.get_trial(trial._trial_id)
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


# ----------------------------------------------------------------------------- the summary


def best_config(recipe: dict, best: Mapping[str, Any], header: str, run_name: str) -> str:
    """The recipe with the best values: a complete ``xm2 fit`` config (its own schedule and
    length; the short trial schedule is not part of it)."""
    config = copy.deepcopy(recipe)
    for param, value in best.items():
        # A stepped float (e.g. scale_depth 2.4000000000000004) is written as its grid value.
        set_path(config, CONFIG_PATHS[param],
                 round(value, 12) if isinstance(value, float) else value)
    logger = get_path(config, "trainer.logger")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("MLFlowLogger"):
        logger.setdefault("init_args", {})["run_name"] = run_name
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _figure_of(axes) -> Figure:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def summarize_study(study: optuna.Study, recipe: dict, parent: TrackedRun, output: Path,
                    configs: tuple[str, ...]) -> dict:
    """Best values, history, importances and slices, into ``output`` and the parent run."""
    import optuna.visualization.matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    searched = {name for trial in trials for name in trial.params}
    summary: dict[str, Any] = {"study": study.study_name, "trials": states,
                               "recipe_values": {k: v for k, v in recipe_values(recipe).items()
                                                 if k in searched}}
    output.mkdir(parents=True, exist_ok=True)
    _write_trials_csv(trials, output / "trials.csv")
    parent.log_artifact(output / "trials.csv")
    if not complete:
        summary["best"] = None
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        parent.log_artifact(output / "summary.json")
        return summary
    best = study.best_trial
    summary["best"] = {"trial": best.number, "value": best.value, "params": best.params}
    parent.log_metrics({"best/value": best.value, "best/trial": best.number,
                        **{f"best/{k}": float(v) for k, v in best.params.items()}})
    header = (f"# Wind tunnel study {study.study_name!r}: best of {len(complete)} complete "
              f"trials (trial {best.number}, {study.user_attrs[SETTINGS_ATTR]['objective']} "
              f"{best.value:.4f}).\n# The recipe {' + '.join(configs)} at those values; run it "
              f"with: xm2 fit --config {output / 'best.yaml'}\n")
    (output / "best.yaml").write_text(
        best_config(recipe, best.params, header, f"{study.study_name}-best"))
    parent.log_artifact(output / "best.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        parent.log_figure(_figure_of(plots.plot_optimization_history(study)),
                          output / "history.png")
        parent.log_figure(_figure_of(plots.plot_slice(study)), output / "slices.png")
        if len(complete) >= 3:
            importances = optuna.importance.get_param_importances(study)
            summary["importances"] = importances
            parent.log_metrics({f"importance/{k}": v for k, v in importances.items()})
            parent.log_figure(_figure_of(plots.plot_param_importances(study)),
                              output / "importances.png")
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    parent.log_artifact(output / "summary.json")
    return summary


def _write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    params = sorted({name for trial in trials for name in trial.params})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", *params, "seconds", "fit_seconds",
                         "failure", "reason", "mlflow_run_id"])
        for trial in trials:
            attrs = trial.user_attrs
            writer.writerow([trial.number, trial.state.name, trial.value,
                             *(trial.params.get(p) for p in params), attrs.get("seconds"),
                             attrs.get("fit_seconds"), attrs.get("failure"), attrs.get("reason"), attrs.get("mlflow_run_id")])


# ----------------------------------------------------------------------------- transfer


def transfer_runs(study: optuna.Study, parent: TrackedRun, transfer: Transfer, objective: str,
                  diverge_factor: float, output: Path) -> dict:
    """Train the wider model at the best values and at lr × 2^k; plot and log under the parent."""
    best = study.best_trial.params
    recipe = load_recipe(transfer)
    shape = run_shape(recipe, transfer)
    prepare_data(recipe, output / ".prepare.lock")
    base_lr = best.get("lr", recipe_values(recipe)["lr"])
    rows = []
    for factor in transfer.log2_lr_factors:
        values = {**best, "lr": base_lr * 2.0**factor}
        logger = parent.child_logger(f"{study.study_name}-transfer-lr2^{factor:+g}", tags={
            "optuna.study": study.study_name, "windtunnel.role": "transfer",
            "windtunnel.log2_lr_factor": factor})
        logger.log_hyperparams({f"transfer/{k}": v for k, v in values.items()}
                               | {"transfer/log2_lr_factor": factor})
        result = tracked_fit(shortened(recipe, transfer, shape, values, output / "runs"), logger,
                             [DivergenceGuard(diverge_factor)], objective)
        if result.value is not None:
            logger.experiment.log_metric(result.run_id, "objective", result.value)
        else:
            logger.experiment.set_terminated(result.run_id, "FAILED")
        rows.append({"log2_lr_factor": factor, "lr": values["lr"], "value": result.value,
                     "diverged": result.diverged, "seconds": round(result.seconds, 1),
                     "mlflow_run_id": result.run_id})
        print(f"transfer lr × 2^{factor:+g} = {values['lr']:.5g}: "
              f"{'diverged' if result.value is None else f'{result.value:.4f}'} "
              f"({result.seconds:.0f} s)", flush=True)
    finite = [row for row in rows if row["value"] is not None]
    argmin = min(finite, key=lambda row: row["value"])["log2_lr_factor"] if finite else None
    summary = {"configs": list(transfer.configs), "tokens_per_run": shape.tokens,
               "steps": shape.steps, "best_values": best, "runs": rows,
               "argmin_log2_lr_factor": argmin, "transferred": argmin == 0}
    folder = output / "transfer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    parent.log_artifact(folder / "transfer.json", "transfer")
    for row in rows:
        if row["value"] is not None:
            parent.log_metrics({"transfer/value": row["value"]},
                               step=int(round(row["log2_lr_factor"])))
    if argmin is not None:
        parent.log_metrics({"transfer/argmin_log2_lr_factor": argmin})
    parent.log_figure(transfer_figure(rows, objective, transfer, shape, base_lr),
                      folder / "transfer.png", "transfer")
    return summary


def transfer_figure(rows: list[dict], objective: str, transfer: Transfer, shape: RunShape,
                    base_lr: float) -> Figure:
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    axis = figure.subplots()
    finite = [(row["lr"], row["value"]) for row in rows if row["value"] is not None]
    axis.plot([lr for lr, _ in finite], [v for _, v in finite], "-o", color="tab:blue")
    for row in rows:
        if row["value"] is None:
            axis.axvline(row["lr"], color="tab:red", linestyle=":", label="diverged")
    axis.axvline(base_lr, color="grey", linestyle="--", label="proxy's best lr")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"final {objective}")
    axis.set_title(f"{' + '.join(Path(c).stem for c in transfer.configs)}: "
                   f"{shape.steps} steps, {shape.tokens:,} tokens", fontsize=9)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axis.legend(unique.values(), unique.keys())
    axis.grid(alpha=0.3)
    return figure


# ----------------------------------------------------------------------------- the command


def windtunnel(
    name: str = "windtunnel",
    action: Literal["search", "transfer", "summary"] = "search",
    trials: int = 20,
    space: SearchSpace = SearchSpace(),
    proxy: Runs = Runs(),
    objective: str = "val/loss",
    sampler: Sampler = Sampler(),
    pruner: Pruner = Pruner(),
    diverge_factor: float = 1.5,
    baseline: bool = True,
    enqueue: list[dict[str, float]] | None = None,
    transfer: Transfer = Transfer(),
    storage: str | None = None,
    stale_after_s: float = 900.0,
    torch_threads: int | None = None,
    output_dir: str = "artifacts/windtunnel",
    experiment_name: str = "xm2-windtunnel",
    tracking_uri: str = "sqlite:///mlflow.db",
) -> dict:
    """Bayesian search of the µP hyperparameters on a small proxy (the wind tunnel).

    search: run trials until the study has ``trials`` of them (complete, pruned or diverged),
    sharing the study with any other process that runs the same command on the same storage,
    and resuming it if it was interrupted. summary: redo the parent run's figures and best.yaml.
    transfer: train the ``transfer`` model at the best values and the learning rates
    best × 2^k. Writes ``<output_dir>/<name>/`` and returns (and prints) the summary.

    Args:
        name: Study name: Optuna study, output folder, MLflow run names.
        action: search, transfer or summary (see above).
        trials: Trials the study runs in all, across workers and restarts.
        space: Searched values; null keeps the recipe's value.
        proxy: The recipe each trial shortens, and the trial's token budget and WSD shape.
        objective: Logged metric to minimise (held-out validation loss by default).
        sampler: tpe, gp or random, and its seed.
        pruner: median or none.
        diverge_factor: A trial whose train loss exceeds this × its first loss is stopped and
            recorded FAILED (as is one whose loss is not finite).
        baseline: The first trial runs the proxy recipe's own values (e.g. config/nano.yaml's).
        enqueue: Further points to run first, e.g. [{lr: 0.02, scale_emb: 8}].
        transfer: The wider model and learning-rate factors of action transfer.
        storage: Optuna storage: a journal file path (default <output_dir>/<name>/journal.log)
            or an RDB URL (postgresql://..., sqlite:///...) shared by the workers.
        stale_after_s: A RUNNING trial of another host silent this long is failed and rerun.
        torch_threads: CPU threads of this worker's training (default torch's choice). On a CPU
            shared with other jobs or workers, give each worker cores / workers: oversubscribed
            threads wait on each other and run several times slower.
        output_dir: Folder of the study outputs.
        experiment_name: MLflow experiment.
        tracking_uri: MLflow tracking URI.
    """
    if action not in ("search", "transfer", "summary"):
        raise ValueError(f"windtunnel action={action!r}; allowed: search, transfer, summary")
    if trials < 1:
        raise ValueError(f"windtunnel trials={trials} must be >= 1")
    if not diverge_factor > 1:
        raise ValueError(f"windtunnel diverge_factor={diverge_factor} must be > 1")
    if torch_threads is not None:
        if torch_threads < 1:
            raise ValueError(f"windtunnel torch_threads={torch_threads} must be >= 1")
        import torch

        torch.set_num_threads(torch_threads)
    output = Path(output_dir) / name
    storage = storage or str(output / "journal.log")
    quiet_lightning()
    from xm2.lightning_cli import quiet_lightning_noise

    quiet_lightning_noise()  # the messages `xm2 fit` drops, dropped from every trial too
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = load_recipe(proxy)
    shape = run_shape(recipe, proxy)
    space.distributions()  # refuse a bad space before anything is created
    settings = study_settings(space, proxy, objective)

    def create_parent() -> str:
        return TrackedRun.start(
            tracking_uri, experiment_name, f"{name}-study",
            tags={"optuna.study": name, "windtunnel.role": "study", "optuna.storage": storage},
            params={"trials": trials, "objective": objective, "storage": storage,
                    "proxy_configs": list(proxy.configs), "tokens_per_trial": shape.tokens,
                    "steps_per_trial": shape.steps, "validation_interval":
                    shape.validation_interval, "sampler": sampler.kind,
                    "sampler_seed": sampler.seed, "pruner": pruner.kind,
                    "diverge_factor": diverge_factor,
                    **{f"space/{k}": v for k, v in asdict(space).items()}}).run_id

    if action != "search" and name not in optuna.get_all_study_names(open_storage(storage)):
        raise ValueError(f"windtunnel action={action}: there is no study {name!r} in {storage}; "
                         "run the search first (action: search)")
    points = ([{k: v for k, v in recipe_values(recipe).items() if getattr(space, k) is not None}]
              if baseline else []) + list(enqueue or [])
    study, created = open_study(name, storage, make_sampler(sampler),
                                make_pruner(pruner, shape.validation_interval), settings,
                                create_parent, points)
    parent = TrackedRun.attach(tracking_uri, study.user_attrs[PARENT_ATTR])
    print(f"windtunnel {name!r}: {'created' if created else 'joined'} in {storage}; MLflow "
          f"parent run {parent.run_id}; {shape.steps} steps × {shape.tokens_per_step} tokens "
          f"= {shape.tokens:,} tokens per trial", flush=True)

    if action == "transfer":
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            raise ValueError(f"study {name!r} has no complete trial to transfer; run the search")
        summary = transfer_runs(study, parent, transfer, objective, diverge_factor, output)
        print(json.dumps(summary, indent=2))
        return summary
    if action == "search":
        search(study, name=name, recipe=recipe, proxy=proxy, shape=shape,
               distributions=space.distributions(), objective=objective, trials=trials,
               diverge_factor=diverge_factor, parent=parent,
               stale_after_s=stale_after_s, output=output, tracking_uri=tracking_uri)
    summary = summarize_study(study, recipe, parent, output, proxy.configs)
    summary.update(tokens_per_trial=shape.tokens, steps_per_trial=shape.steps,
                   mlflow_parent_run_id=parent.run_id, storage=storage)
    done = sum(counts_towards_budget(t) and t.state != TrialState.RUNNING
               for t in study.get_trials(deepcopy=False))
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if done >= trials and not running:
        parent.finish("FINISHED")
    print(json.dumps(summary, indent=2, default=str))
    return summary


def search(
    study: optuna.Study, *, name: str, recipe: dict, proxy: Runs, shape: RunShape,
    distributions: dict[str, BaseDistribution], objective: str, trials: int,
    diverge_factor: float, parent: TrackedRun, stale_after_s: float, output: Path,
    tracking_uri: str,
) -> None:
    """This worker's share of the study: trials until the study has ``trials`` of them."""
    # A resumed or joining worker runs the parent again (a killed one left it RUNNING/KILLED).
    parent.client.update_run(parent.run_id, status="RUNNING")
    prepare_data(shortened(recipe, proxy, shape, {}), output / ".prepare.lock")
    while True:
        for number in fail_stale_trials(study, stale_after_s, tracking_uri):
            print(f"trial {number}: its worker is gone; failed, to be run again", flush=True)
        if sum(map(counts_towards_budget, study.get_trials(deepcopy=False))) >= trials:
            return
        trial = study.ask()
        earlier = [t for t in study.get_trials(deepcopy=False)
                   if t.number < trial.number and counts_towards_budget(t)]
        if len(earlier) >= trials:
            # Another worker took the last place between the count and the ask.
            trial.set_user_attr("failure", "surplus")
            study.tell(trial, state=TrialState.FAIL)
            return
        finished = run_trial(study, trial, name=name, recipe=recipe, proxy=proxy, shape=shape,
                             distributions=distributions, objective=objective,
                             diverge_factor=diverge_factor, parent=parent, output=output)
        outcome = (f"{finished.value:.4f}" if finished.state == TrialState.COMPLETE
                   else finished.state.name.lower()
                   + (f" ({finished.user_attrs.get('reason')})"
                      if finished.state == TrialState.FAIL else ""))
        params = {k: round(v, 6) if isinstance(v, float) else v
                  for k, v in finished.params.items()}
        print(f"trial {finished.number}: {params} -> {outcome} "
              f"({finished.user_attrs.get('seconds')} s)", flush=True)
