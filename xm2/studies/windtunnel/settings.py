"""The wind tunnel's settings: the searched µP values and the runs, sampler, pruner and transfer
that the command is given (``xm2 windtunnel --config config/windtunnel/nano.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import optuna
from optuna.distributions import BaseDistribution

from xm2.errors import ConfigError

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
                raise ConfigError(f"windtunnel space.{name}: give choices or low/high, not both")
            if not self.choices:
                raise ConfigError(f"windtunnel space.{name}.choices is empty")
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"windtunnel space.{name}: low={self.low}, high={self.high}; "
                              "need low < high, or choices")
        if self.log and self.step is not None:
            raise ConfigError(f"windtunnel space.{name}: step={self.step} and log=true; Optuna "
                              "samples on a grid or on a log scale, not both")
        if self.log and self.low <= 0:
            raise ConfigError(f"windtunnel space.{name}: log scale needs low > 0, got {self.low}")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"windtunnel space.{name}: step={self.step} must be > 0")
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
            raise ConfigError("windtunnel space is empty; search at least one of "
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

