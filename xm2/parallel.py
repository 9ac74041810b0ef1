"""How the decoder is laid out over devices: FSDP2 sharding, its mixed precision, activation
checkpointing, ``torch.compile`` (whole model or per block) and meta-device construction, all
switched in YAML; and where the processes of a run meet.

Every switch is a field of :class:`ParallelConfig` (``model.parallel`` in a config) and takes
effect in one place, :func:`apply`, which the LightningModule's ``configure_model`` calls once the
strategy has set up its processes. The strategies are Lightning's: single device, DDP
(:class:`Xm2DDPStrategy`), FSDP1 (``FSDPStrategy``, GPU only) and FSDP2 through
``ModelParallelStrategy``, whose pure data-parallel form is :class:`FSDP2Strategy`; xm2's two
keep a one-machine process group on the loopback interface (:func:`serve_rendezvous_on_loopback`).
``config/trainer/`` holds one YAML per strategy.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
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
    same YAML works for any ``trainer.devices`` and ``trainer.num_nodes``. Its processes on one
    machine meet on the loopback interface only (:func:`serve_rendezvous_on_loopback`).
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
        self.set_world_ranks()
        self._rendezvous = serve_rendezvous_on_loopback(self.cluster_environment)
        super().setup_environment()


class Xm2DDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` (same options) whose processes on one machine meet on the
    loopback interface only: see :func:`serve_rendezvous_on_loopback`."""

    def setup_environment(self) -> None:
        self.set_world_ranks()
        self._rendezvous = serve_rendezvous_on_loopback(self.cluster_environment)
        super().setup_environment()


# Where the process group's sockets go when every process runs on this machine.
LOOPBACK_INTERFACE = "lo0" if sys.platform == "darwin" else "lo"
SOCKET_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a name or an IP) resolves only to loopback addresses (127.x, ::1)."""
    try:
        found = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(entry[4][0].split("%")[0]).is_loopback
                               for entry in found)


def serve_rendezvous_on_loopback(environment: ClusterEnvironment | None) -> dist.TCPStore | None:
    """Keep a process group whose main address is loopback (one machine) off the network.

    torch's rendezvous store (``TCPStore``, which rank 0 serves at ``MASTER_ADDR:MASTER_PORT``)
    listens on every interface whatever address it is given, and gloo and NCCL listen on the
    address the machine's host name resolves to. When the main address is loopback (Lightning's
    launcher sets 127.0.0.1; so may the user), no other machine can be part of the group, so:
    every process sends gloo's and NCCL's sockets to the loopback interface (unless
    ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` say otherwise), and rank 0 serves the store
    from a socket bound to the main address itself. It is a multi-tenant store, so the one that
    ``init_process_group`` creates for the same port shares its server instead of opening
    another (torch's ``TCPStore(multi_tenant=True)``: all such stores of a process on one
    host and port use one server). Returns that store, which must live as long as the group;
    None where nothing is served here (other ranks, a group already set up, a launcher such as
    torchrun that serves the port itself) or the address names another machine (several nodes:
    torch's defaults, see docs/distributed.md).
    """
    if environment is None or dist.is_initialized():
        return None
    address = environment.main_address
    if not is_loopback(address):
        return None
    for variable in SOCKET_INTERFACE_VARIABLES:
        os.environ.setdefault(variable, LOOPBACK_INTERFACE)
    if environment.global_rank() != 0:
        return None
    port = environment.main_port
    family, kind, protocol, _, bound_to = socket.getaddrinfo(address, port,
                                                             type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(bound_to)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        return None  # the port is served already (torchrun's agent) or cannot be: torch decides
    # The store's server owns the socket from here on and closes it with itself.
    return dist.TCPStore(address, port, environment.world_size(), is_master=True,
                         wait_for_workers=False, multi_tenant=True,
                         master_listen_fd=listener.detach())


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
