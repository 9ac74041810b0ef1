"""AdamW over µP parameter groups: the one optimizer that training, coord checks and sweeps use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xm2 import mup
from xm2.config import ModelConfig
from xm2.errors import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW settings; the learning rate is the base (width-independent) µP learning rate."""

    lr: float = 0.01
    """Peak learning rate of the embedding and norm gains; hidden matrices get lr/m."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the embedding and hidden matrices (never the norm gains)."""

    def __post_init__(self) -> None:
        # Written so that NaN fails each check too: every comparison with NaN is false.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optimizer lr={self.lr} must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optimizer weight_decay={self.weight_decay} must be a finite number >= 0")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"optimizer eps={self.eps} must be a finite number > 0")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"optimizer betas={tuple(self.betas)} must be two numbers in [0, 1)")


def build_adamw(
    model: nn.Module, architecture: ModelConfig, config: OptimizerConfig
) -> torch.optim.AdamW:
    """AdamW with one named group per µP role, each at its µP learning rate."""
    groups = mup.param_groups(
        model.named_parameters(), architecture, config.lr, config.weight_decay
    )
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
