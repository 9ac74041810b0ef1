"""Memory per device before renting devices: parameters, weights, gradients, optimizer state and
activations of any preset at a batch, sequence length, precision, device count and strategy.

The model is built on the meta device (no memory, any size); the figures are counts of what
training keeps alive, from the decoder's code:

- weights: fp32 master weights (sharded over the devices under FSDP2), plus under FSDP2 the
  gathered copies of the units in flight (the root unit, which holds the tied embedding and
  stays gathered, and two blocks: the one running and the one prefetched), plus under autocast
  (``bf16-mixed``) its cache of bf16 copies of the weights;
- gradients: fp32 (sharded under FSDP2, plus one gathered unit's worth); DDP adds its
  communication buckets, one more fp32 copy;
- optimizer: AdamW's two fp32 moments (sharded under FSDP2);
- activations: the tensors each block saves for its backward pass, counted per token (see
  :func:`activation_bytes_per_token`), for the device's batch × sequence tokens; with activation
  checkpointing each block keeps only its input and one block at a time is recomputed;
- logits and loss: the vocabulary-wide tensors at the loss (log-probabilities kept for the
  backward pass, plus the logits and their fp32 copy while the loss is formed).

Attention is counted as a fused kernel that keeps its output and log-sum-exp (GPU flash or
memory-efficient attention), not the seq × seq score matrix. Allocator fragmentation, the CUDA
context (about 0.5 GiB) and communication buffers of NCCL are not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from xm2.config import ModelConfig
from xm2.errors import ConfigError
from xm2.model import Decoder
from xm2.presets import preset_names, resolve_config

STRATEGIES = ("single", "ddp", "fsdp2")
PRECISIONS = ("32-true", "bf16-mixed")
GIB = 2**30


@dataclass
class MemoryEstimate:
    parameters: int
    tokens_per_device: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer (AdamW)", self.optimizer), ("activations", self.activations),
                ("logits and loss", self.logits), ("total", self.total)]


def read_architecture(model: str) -> ModelConfig:
    """A ``ModelConfig`` from a preset YAML (config/model/*.yaml or a recipe with
    ``model.architecture``); a bare name means config/model/<name>.yaml."""
    path = Path(model)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        path = Path("config", "model", f"{model}.yaml")
    path = Path(resolve_config(str(path)))
    if not path.is_file():
        presets = [Path(name).stem for name in preset_names() if name.startswith("model/")]
        raise ConfigError(f"model preset {model!r} not found (looked for {path}); give a YAML "
                          f"path or one of: {', '.join(presets)}")
    data = yaml.safe_load(path.read_text()) or {}
    architecture = (data.get("model") or {}).get("architecture")
    if architecture is None:
        raise ConfigError(f"{path} has no model.architecture section")
    return ModelConfig(**architecture)


def activation_bytes_per_token(config: ModelConfig, activation_bytes: int, residual_bytes: int,
                               autocast_copies: bool) -> tuple[int, int]:
    """Bytes one block saves for its backward pass per token, and those of its input alone.

    Saved by a block (see xm2.model.Block), as measured with saved-tensor hooks: each RMSNorm's
    input and normalised input (residual-stream dtype) and its output as the projections take it;
    under autocast each projection keeps its own bf16 copy of that output (three for q, k, v, two
    for gate and up); the rotated queries and keys and the values; the attention output, its
    log-sum-exp and the reshaped copy that o_proj takes; the gate and up projections, the SiLU
    output and their product. The RoPE multiplications keep only the tables, shared by all.
    """
    d, i = config.hidden_size, config.intermediate_size
    kv = config.num_kv_heads * config.head_dim
    norm_outputs = 5 if autocast_copies else 2
    block = (2 * 2 * d * residual_bytes
             + (norm_outputs * d + (d + kv) + kv + 2 * d + 4 * i) * activation_bytes
             + config.num_heads * 4)  # attention log-sum-exp, fp32 per head
    return block, d * residual_bytes


def estimate(config: ModelConfig, batch_size: int, seq_len: int, precision: str, devices: int,
             strategy: str, activation_checkpointing: bool = False,
             fsdp_mixed_precision: bool = True) -> MemoryEstimate:
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    if strategy == "single" and devices != 1:
        raise ConfigError(f"strategy single runs on one device, not devices={devices}")
    for name, value in (("devices", devices), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if seq_len > config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    with torch.device("meta"):
        model = Decoder(config)
    total = model.num_parameters()
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = total - block * config.num_layers
    sharded = strategy == "fsdp2"
    bf16_params = sharded and fsdp_mixed_precision and precision == "bf16-mixed"
    autocast = precision == "bf16-mixed"
    activation = 2 if autocast else 4
    residual = 2 if bf16_params else 4  # autocast keeps the residual stream in fp32
    share = devices if sharded else 1

    weights = 4 * total / share
    if sharded:
        weights += (root + 2 * block) * (2 if bf16_params else 4)
    if autocast and not bf16_params:
        weights += 2 * total  # autocast's cache of bf16 weight copies, alive for the step
    gradients = 4 * total / share + (4 * (root + block) if sharded else 0)
    if strategy == "ddp":
        gradients += 4 * total  # DDP's gradient buckets
    optimizer = 8 * total / share

    tokens = batch_size * seq_len
    # Autocast copies activations to bf16 for each matmul unless they are bf16 already.
    copies = autocast and not bf16_params
    per_block, block_input = activation_bytes_per_token(config, activation, residual, copies)
    final_norm = config.hidden_size * (2 * residual + activation)
    if activation_checkpointing:
        per_token = config.num_layers * block_input + per_block + final_norm
    else:
        per_token = config.num_layers * per_block + final_norm
    logits = tokens * config.vocab_size * (4 + 4 + 2 * activation)
    return MemoryEstimate(total, tokens, weights, gradients, optimizer, tokens * per_token,
                          logits)


def memory(
    model: str = "config/model/xmodel2-1.2b.yaml",
    batch_size: int = 1,
    seq_len: int | None = None,
    precision: Literal["32-true", "bf16-mixed"] = "bf16-mixed",
    devices: int = 8,
    strategy: Literal["single", "ddp", "fsdp2"] = "fsdp2",
    activation_checkpointing: bool = False,
    fsdp_mixed_precision: bool = True,
) -> dict:
    """Print parameters and memory per device (weights, gradients, optimizer, activations) of a
    preset, built on the meta device, for a batch, sequence length, precision and strategy.

    Args:
        model: Preset YAML (config/model/*.yaml, or a recipe with model.architecture), or a
            preset name such as xmodel2-1.2b.
        batch_size: Sequences per device per micro-batch (data.batch_size).
        seq_len: Tokens per sequence; default the preset's max_seq_len.
        precision: trainer.precision: 32-true or bf16-mixed.
        devices: Number of devices (trainer.devices × trainer.num_nodes).
        strategy: single, ddp or fsdp2 (config/trainer/).
        activation_checkpointing: model.parallel.activation_checkpointing.
        fsdp_mixed_precision: FSDP2 with bf16 parameters (model.parallel.mixed_precision bf16),
            with precision bf16-mixed.
    """
    config = read_architecture(model)
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be >= 1 (tokens per sequence); leave it out "
                          f"for the preset's max_seq_len={config.max_seq_len}")
    seq_len = config.max_seq_len if seq_len is None else seq_len
    result = estimate(config, batch_size, seq_len, precision, devices, strategy,
                      activation_checkpointing, fsdp_mixed_precision)
    print(f"{model}: {result.parameters:,} parameters; {strategy} on {devices} device(s), "
          f"{precision}{', FSDP2 bf16 parameters' if strategy == 'fsdp2' and fsdp_mixed_precision and precision == 'bf16-mixed' else ''}"
          f"{', activation checkpointing' if activation_checkpointing else ''}; "
          f"batch {batch_size} × {seq_len} tokens per device")
    print(f"| {'per device':<18} | {'GiB':>8} |\n|{'-' * 20}|{'-' * 10}|")
    for name, value in result.rows():
        print(f"| {name:<18} | {value / GIB:8.2f} |")
    return {name: round(value / GIB, 3) for name, value in result.rows()} | {
        "parameters": result.parameters}
