"""AdamW over µP parameter groups: the one optimizer that training, coord checks and sweeps use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xm2 import mup
from xm2.config import ModelConfig


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
        if self.lr <= 0:
            raise ValueError(f"optimizer lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer weight_decay={self.weight_decay} must be >= 0")


def build_adamw(
    model: nn.Module, architecture: ModelConfig, config: OptimizerConfig
) -> torch.optim.AdamW:
    """AdamW with one named group per µP role, each at its µP learning rate."""
    groups = mup.param_groups(
        model.named_parameters(), architecture, config.lr, config.weight_decay
    )
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
