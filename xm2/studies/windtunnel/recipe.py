"""The ``xm2 fit`` recipe of a wind-tunnel run: its config files parsed as ``xm2 fit`` parses them,
shortened to a trial's token budget and WSD shape, and one tracked fit of it through
:func:`xm2.run.run`, the path ``xm2 fit`` takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from xm2.errors import ConfigError, MissingFileError
from xm2.presets import resolve_config
from xm2.run import override_args, resolve, run
from xm2.studies.windtunnel.callbacks import ReportToTrial
from xm2.studies.windtunnel.settings import CONFIG_PATHS, Runs
from xm2.tracking import LOGGER_CLASS_PATH

# ----------------------------------------------------------------------------- config files


def resolved_recipe(runs: Runs) -> dict:
    """The complete ``xm2 fit`` config of ``runs`` (its configs composed as ``--config`` does,
    ``runs.overrides`` set, every default filled in), as a dict."""
    for path in runs.configs:
        if not Path(resolve_config(str(path))).is_file():
            raise MissingFileError(f"windtunnel config {path} does not exist; give xm2 fit "
                                   "config files, e.g. config/nano.yaml")
    return resolve("fit", runs.configs, override_args(runs.overrides or {}))


def get_path(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def recipe_values(recipe: dict) -> dict[str, Any]:
    """The recipe's own value of every searchable setting."""
    return {name: get_path(recipe, path) for name, path in CONFIG_PATHS.items()}


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
    batch = get_path(recipe, "data.batch_size")
    seq_len = get_path(recipe, "model.architecture.max_seq_len")
    accumulate = get_path(recipe, "trainer.accumulate_grad_batches") or 1
    tokens_per_step = batch * seq_len * accumulate
    interval = max(1, round(runs.tokens / tokens_per_step / runs.validations))
    steps = interval * runs.validations
    # The decay must start inside the run (at the last step at the latest), after the warmup.
    decay_start = min(steps - 1, steps - round(steps * runs.decay_fraction))
    warmup = min(round(steps * runs.warmup_fraction), decay_start)
    return RunShape(steps, interval, warmup, decay_start, tokens_per_step)


@dataclass(frozen=True)
class ShortRun:
    """The recipe as one short measured run: ``xm2 fit`` settings (dotted paths) over the
    recipe's, and the recipe's callbacks it keeps (a trial is measured, not kept)."""

    overrides: dict[str, Any]
    keep_callbacks: tuple[str, ...]

    def adjust(self, config: Any) -> None:
        """Keep only ``keep_callbacks`` of the parsed config's callbacks: the complete list, so
        that ``callbacks+:`` entries of any config file are filtered too."""
        callbacks = config.trainer.callbacks
        if callbacks is not None and not isinstance(callbacks, list):
            callbacks = [callbacks]
        config.trainer.callbacks = [callback for callback in callbacks or []
                                    if _class_path(callback) in self.keep_callbacks]


def shortened(runs: Runs, shape: RunShape, values: Mapping[str, Any],
              root_dir: Path | None = None) -> ShortRun:
    """The recipe as one short tracked run: searched values set, WSD fitted to the budget,
    checkpoints and progress bars off, only ``runs.keep_callbacks`` kept."""
    overrides: dict[str, Any] = {CONFIG_PATHS[name]: value for name, value in values.items()}
    overrides.update({
        "trainer.max_steps": shape.steps, "trainer.max_epochs": None,
        "trainer.val_check_interval": shape.validation_interval,
        "trainer.check_val_every_n_epoch": None, "trainer.num_sanity_val_steps": 0,
        "trainer.enable_checkpointing": False, "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "model.schedule.warmup_steps": shape.warmup_steps,
        "model.schedule.decay_start_step": shape.decay_start_step,
        # A run is a child run of the study: the recipe's xm2 logger (its settings kept; a
        # recipe that names none gets one).
        "trainer.logger": {"class_path": LOGGER_CLASS_PATH},
    })
    if root_dir is not None:
        overrides["trainer.default_root_dir"] = str(root_dir)
    return ShortRun(overrides, tuple(runs.keep_callbacks))


def _class_path(callback: Any) -> str:
    return str(callback.get("class_path", "")) if hasattr(callback, "get") else str(callback)


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
    """Wall time from the trainer's creation to the end (the rest is parsing and building)."""


def tracked_fit(runs: Runs, short: ShortRun, logger_args: Sequence[str],
                callbacks: list[L.Callback], objective: str) -> FitResult:
    """``xm2 fit`` of ``runs`` shortened to ``short`` (:func:`xm2.run.run`, the path ``xm2 fit``
    takes), its logger set by ``logger_args`` (e.g. a child of the study's parent run); a
    diverging fit ends early and is returned, not raised."""
    result = run("fit", runs.configs, [*override_args(runs.overrides or {}),
                                       *override_args(short.overrides), *logger_args],
                 callbacks=callbacks, adjust=short.adjust, quiet=True)
    times = {"seconds": result.seconds, "fit_seconds": result.fit_seconds}
    if result.status == "diverged":
        return FitResult(None, result.run_id, diverged=result.error, **times)
    pruned_at = next((c.pruned_at for c in callbacks if isinstance(c, ReportToTrial)), None)
    if pruned_at is not None:
        return FitResult(None, result.run_id, pruned_at=pruned_at, **times)
    value = result.metrics.get(objective)
    if value is None:
        raise KeyError(f"objective {objective!r} was not logged; validation logs "
                       f"{sorted(result.metrics)}")
    return FitResult(value, result.run_id, **times)
