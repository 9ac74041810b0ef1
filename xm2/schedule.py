"""The warmup-stable-decay (WSD) learning-rate schedule.

Linear warmup to the peak, a constant stable phase, then a decay that starts at
``decay_start_step`` and ends with the run. ``decay_start_step`` is also where the data mixture
switches from the stable to the decay mix (the CLI links the two), so it is stated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from xm2.errors import ConfigError

DecayStyle = Literal["exponential", "linear", "cosine", "1-sqrt"]
Phase = Literal["warmup", "stable", "decay"]
DataPhase = Literal["stable", "decay"]


def data_phase(step: int, decay_start_step: int | None) -> DataPhase:
    """The mixture phase of optimizer step ``step``: the warmup trains on the stable mixture, and
    the decay mixture starts with the decay (never, if ``decay_start_step`` is None)."""
    return "decay" if decay_start_step is not None and step >= decay_start_step else "stable"


@dataclass
class WSDSchedule:
    """Warmup, stable and decay phases; values are multipliers of each group's peak LR."""

    warmup_steps: int = 30
    """Steps of linear warmup; step s < warmup_steps runs at (s+1)/warmup_steps of the peak."""
    decay_start_step: int = 240
    """First step of the decay phase, and of the decay data mixture. The run ends at
    trainer.max_steps, so the decay lasts max_steps - decay_start_step steps."""
    decay_style: DecayStyle = "exponential"
    """exponential: MiniCPM's 0.5^((s - decay_start)/half_life); linear, cosine and 1-sqrt go
    from the peak to the floor over the decay phase."""
    half_life_steps: int | None = None
    """Half-life of the exponential decay; default a tenth of the decay phase."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak LR."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:  # NaN fails this too
            raise ConfigError(f"schedule min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.half_life_steps is not None and self.half_life_steps <= 0:
            raise ConfigError(f"schedule half_life_steps={self.half_life_steps} must be > 0")
        if self.decay_start_step < self.warmup_steps:
            raise ConfigError(
                f"schedule decay_start_step={self.decay_start_step} is inside the warmup "
                f"(warmup_steps={self.warmup_steps}); allowed: warmup_steps <= decay_start_step"
            )

    def phase(self, step: int) -> Phase:
        """The schedule's phase at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return "warmup"
        return "stable" if data_phase(step, self.decay_start_step) == "stable" else "decay"

    def data_phase(self, step: int) -> DataPhase:
        """The data mixture's phase at optimizer step ``step`` (see :func:`data_phase`)."""
        return data_phase(step, self.decay_start_step)

    def check_run_length(self, total_steps: int) -> None:
        """Refuse a decay start that is not inside a run of ``total_steps`` steps."""
        if total_steps is None or total_steps <= 0:
            raise ConfigError(
                f"the WSD schedule needs a fixed run length; set trainer.max_steps (got {total_steps})"
            )
        if not self.warmup_steps <= self.decay_start_step < total_steps:
            raise ConfigError(
                f"schedule decay_start_step={self.decay_start_step} is outside the run; allowed: "
                f"{self.warmup_steps} (warmup_steps) <= decay_start_step < {total_steps} "
                "(trainer.max_steps)"
            )

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step < self.decay_start_step:
            return 1.0
        decay_steps = total_steps - self.decay_start_step
        progress = min(1.0, (step - self.decay_start_step) / decay_steps)
        if self.decay_style == "exponential":
            half_life = self.half_life_steps or max(1.0, decay_steps / 10)
            shape = 0.5 ** ((step - self.decay_start_step) / half_life)
        elif self.decay_style == "linear":
            shape = 1.0 - progress
        elif self.decay_style == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay_style == "1-sqrt":
            shape = 1.0 - math.sqrt(progress)
        else:
            raise ConfigError(
                f"schedule decay_style={self.decay_style!r}; allowed: exponential, linear, "
                "cosine, 1-sqrt"
            )
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
