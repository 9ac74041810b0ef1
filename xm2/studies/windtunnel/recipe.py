"""The ``xm2 fit`` recipe of a wind-tunnel run: its config files composed, shortened to a trial's
token budget and WSD shape, and one tracked fit of such a config."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from xm2.config import ModelConfig
from xm2.data.datamodule import MixtureDataModule
from xm2.errors import ConfigError, MissingFileError, NonFiniteLossError, TrainingDiverged
from xm2.studies.windtunnel.callbacks import ReportToTrial
from xm2.studies.windtunnel.settings import CONFIG_PATHS, Runs

# ----------------------------------------------------------------------------- config files


def load_recipe(runs: Runs) -> dict:
    """The ``xm2 fit`` configs of ``runs`` composed in order (mappings merge, anything else is
    replaced, as ``--config a --config b`` does), with ``runs.overrides`` set."""
    recipe: dict = {}
    for path in runs.configs:
        if not Path(path).is_file():
            raise MissingFileError(f"windtunnel config {path} does not exist; give xm2 fit "
                                   "config files, e.g. config/nano.yaml")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"windtunnel config {path} is not a mapping of settings")
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
            raise ConfigError(f"config path {dotted}: {key} is not a mapping")
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
        raise ConfigError(f"windtunnel tokens={runs.tokens} and validations={runs.validations} "
                          "must be >= 1")
    if not (0 <= runs.warmup_fraction and 0 <= runs.decay_fraction
            and runs.warmup_fraction + runs.decay_fraction <= 1):
        raise ConfigError(f"windtunnel warmup_fraction={runs.warmup_fraction} and decay_fraction="
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
    except (NonFiniteLossError, TrainingDiverged) as error:
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
