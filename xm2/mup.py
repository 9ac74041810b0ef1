"""µP parameter roles, initialisation and per-group learning rates.

Roles come from parameter *names* and the model config only, never from attributes attached to
tensors, so they survive ``torch.compile`` (``_orig_mod.`` prefixes), FSDP wrapping and
checkpoint round trips. The forward-pass multipliers (rules 1, 2 and 5) are in
:mod:`xm2.model`; rules 3 and 4 are here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from xm2.config import ModelConfig


class Role(str, Enum):
    """What a parameter is to µP."""

    EMBEDDING = "embedding"
    """The tied input/output embedding: init std init_std, base learning rate."""
    HIDDEN = "hidden"
    """A hidden 2-D matrix (attention and MLP projections): init std init_std/√m, LR lr/m."""
    VECTOR = "vector"
    """An RMSNorm gain: initialised to 1, base learning rate, no weight decay."""


_HIDDEN_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parameter_role(name: str) -> Role:
    """The µP role of a parameter, from its (possibly wrapper-prefixed) name."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) >= 2:
        owner = parts[-2]
        if owner == "embed_tokens":
            return Role.EMBEDDING
        if owner in _HIDDEN_MATRICES:
            return Role.HIDDEN
        if owner.endswith("norm"):
            return Role.VECTOR
    raise ValueError(
        f"parameter {name!r} has no µP role; known owners are embed_tokens, "
        f"{', '.join(_HIDDEN_MATRICES)} and *norm, each with a 'weight'"
    )


def init_std(role: Role, config: ModelConfig) -> float:
    """µP rule 3: hidden matrices start at init_std/√m; the embedding at init_std."""
    if role is Role.HIDDEN:
        return config.init_std / math.sqrt(config.width_multiplier)
    if role is Role.EMBEDDING:
        return config.init_std
    raise ValueError(f"role {role.value!r} is not initialised from a normal distribution")


def lr_multiplier(role: Role, config: ModelConfig) -> float:
    """µP rule 4: hidden matrices learn at lr/m; the embedding and norm gains at lr."""
    return 1.0 / config.width_multiplier if role is Role.HIDDEN else 1.0


@torch.no_grad()
def init_parameters(model: nn.Module, config: ModelConfig) -> None:
    """Initialise every parameter of ``model`` according to its µP role."""
    for name, parameter in model.named_parameters():
        role = parameter_role(name)
        if role is Role.VECTOR:
            nn.init.ones_(parameter)
        else:
            _normal_(parameter, init_std(role, config))


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    config: ModelConfig,
    lr: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups, one per role, each named and carrying its µP learning rate.

    Learning-rate schedulers must scale each group's ``initial_lr`` (``LambdaLR`` does), never set
    an absolute value, or the per-group µP ratio is lost.
    """
    grouped: dict[Role, list[nn.Parameter]] = {role: [] for role in Role}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            grouped[parameter_role(name)].append(parameter)
    return [
        {
            "name": role.value,
            "params": parameters,
            "lr": lr * lr_multiplier(role, config),
            # No decay on norm gains: pulling them to 0 would switch features off.
            "weight_decay": 0.0 if role is Role.VECTOR else weight_decay,
        }
        for role, parameters in grouped.items()
        if parameters
    ]


def _normal_(parameter: torch.Tensor, std: float) -> None:
    """Draw N(0, std²) into ``parameter`` from the CPU generator, whatever its device and sharding.

    The CPU generator makes the weights depend on the seed only, not on where the model lives.
    DTensor has no sharding-aware random numbers on CPU, so a sharded parameter's ranks each draw
    the whole tensor from the same generator state and keep their own shard: the model is the one
    a single device builds from that seed, whatever the number of shards.
    """
    full = torch.empty(parameter.shape, dtype=parameter.dtype).normal_(0.0, std)
    if isinstance(parameter, DTensor):
        local = parameter.to_local()
        full = distribute_tensor(full.to(local.device), parameter.device_mesh,
                                 parameter.placements, src_data_rank=None).to_local()
        local.copy_(full)
    else:
        parameter.copy_(full)
