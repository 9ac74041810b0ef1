"""How the decoder is laid out over devices: FSDP2 sharding, its mixed precision, activation
checkpointing, ``torch.compile`` (whole model or per block) and meta-device construction, all
switched in YAML.

Every switch is a field of :class:`ParallelConfig` (``model.parallel`` in a config) and takes
effect in one place, :func:`apply`, which the LightningModule's ``configure_model`` calls once the
strategy has set up its processes. The strategies themselves are Lightning's: single device, DDP,
FSDP1 (``FSDPStrategy``, GPU only) and FSDP2 through ``ModelParallelStrategy``, whose pure
data-parallel form is :class:`FSDP2Strategy`. ``config/trainer/`` holds one YAML per strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from xm2.errors import ConfigError

MIXED_PRECISION = ("none", "bf16")
COMPILE = (False, True, "blocks", "model")


@dataclass
class ParallelConfig:
    """How the decoder is built, sharded and run; none of it changes what the model computes
    beyond rounding."""

    mixed_precision: Literal["none", "bf16"] = "none"
    """FSDP2 only: bf16 keeps parameters in bf16 for the forward and backward pass (half the
    all-gather traffic and memory) while the sharded master weights, the optimizer and the
    gradient reduction stay in fp32. Other strategies take ``trainer.precision`` instead."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute the block in the backward pass: activation
    memory of one block instead of all, for about a third more compute."""
    compile: bool | Literal["blocks", "model"] = False
    """``torch.compile`` in place (parameter and checkpoint names unchanged): ``model`` compiles
    the whole decoder as one graph (fastest on one device: docs/performance.md); ``blocks`` (or
    true) each decoder block on its own, the unit FSDP2 shards and activation checkpointing
    recomputes; false runs eagerly."""
    meta_init: bool = False
    """Build the model on the meta device (no memory) and give it its values only after
    sharding, so no process ever holds the whole model; µP initialisation is the same draw as on
    one device from the same seed."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters of a block after its forward pass (gather them again
    for the backward pass); false trades memory for less communication."""

    def __post_init__(self) -> None:
        if self.compile not in COMPILE:
            raise ConfigError(f"parallel compile={self.compile!r}; allowed: false, true, "
                              "blocks (the same as true), model")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"parallel mixed_precision={self.mixed_precision!r}; allowed: "
                              f"{', '.join(MIXED_PRECISION)}")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: every process in one data-parallel
    dimension, no tensor parallelism.

    The parent's ``"auto"`` sizes give tensor parallelism across the processes of a node (one
    node with 8 devices would be tp=8, dp=1); this sets dp to the world size and tp to 1, so the
    same YAML works for any ``trainer.devices`` and ``trainer.num_nodes``.
    """

    def __init__(self, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None) -> None:
        """
        Args:
            save_distributed_checkpoint: Each rank writes its own shard into a checkpoint folder
                (torch.distributed.checkpoint); false gathers one file on rank 0.
            process_group_backend: Default nccl on GPUs, gloo on CPUs.
        """
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_applied(model: nn.Module) -> bool:
    return getattr(model, "_xm2_parallel_applied", False)


def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def apply(model: nn.Module, config: ParallelConfig, strategy: Strategy | None,
          device: torch.device) -> None:
    """Lay ``model`` (an :class:`xm2.model.Decoder`) out for ``strategy``: activation
    checkpointing, compiled blocks, FSDP2 sharding of each block and of the root, and the
    materialisation of a meta-device model. Runs once; later calls (fit then validate on the same
    trainer) find the model laid out already.
    """
    if is_applied(model):
        return
    sharded = isinstance(strategy, ModelParallelStrategy)
    if config.mixed_precision != "none" and not sharded:
        raise ConfigError(
            f"model.parallel.mixed_precision={config.mixed_precision!r} is FSDP2's parameter "
            f"policy and needs trainer.strategy xm2.parallel.FSDP2Strategy (this run uses "
            f"{type(strategy).__name__}); set it to 'none' and use trainer.precision bf16-mixed")
    model.activation_checkpointing = config.activation_checkpointing
    if config.compile == "model":
        model.compile()
    elif config.compile:
        for block in model.layers:
            block.compile()
    if sharded:
        shard(model, strategy, config)
    if has_meta_tensors(model):
        materialize(model, device)
    model._xm2_parallel_applied = True


def shard(model: nn.Module, strategy: ModelParallelStrategy, config: ParallelConfig) -> None:
    """FSDP2: each block is one unit; the root unit holds the tied embedding (input and LM head
    are one parameter, so it is gathered once for both uses) and the final norm."""
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ConfigError(
            f"xm2 shards with FSDP2 only, but the strategy's mesh has tensor_parallel_size="
            f"{mesh['tensor_parallel'].size()}; use trainer.strategy xm2.parallel.FSDP2Strategy, "
            "or ModelParallelStrategy with data_parallel_size=<world size> and "
            "tensor_parallel_size=1")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if config.mixed_precision == "bf16" else MixedPrecisionPolicy())
    data_parallel = mesh["data_parallel"]
    for block in model.layers:
        fully_shard(block, mesh=data_parallel, mp_policy=policy,
                    reshard_after_forward=config.reshard_after_forward)
    # The root's parameters are needed again at the very end (LM head), so it stays gathered.
    fully_shard(model, mesh=data_parallel, mp_policy=policy, reshard_after_forward=False)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give a meta-device (possibly sharded) model real memory and its values: RoPE tables and
    µP initialisation. Lightning's own materialisation would call every submodule's default
    ``reset_parameters`` after the model's and undo µP; this one runs first and leaves it
    nothing to do."""
    model.to_empty(device=device)
    model.reset_parameters()
