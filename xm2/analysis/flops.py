"""FLOPs of the decoder per token, counted from its shape, and a measured matmul peak.

Counted: every matrix multiply at 2 FLOPs per multiply-add (the projections, the SwiGLU MLP, the
tied output head, and attention's scores ``QKᵀ`` and weighted sum ``AV``). Not counted: norms,
RoPE, activations, softmax and the loss, which are elementwise and a small fraction. A training
step costs 3× the forward pass (the backward pass computes gradients of inputs and weights).

With causal attention, position t attends to t keys, so a sequence of T tokens attends to
(T + 1)/2 keys per token on average; ``causal=False`` counts all T, what a kernel that computes the
masked half too would spend.
"""

from __future__ import annotations

import time

import torch

from xm2.config import ModelConfig


def matmul_flops_per_token(config: ModelConfig) -> dict[str, int]:
    """Forward FLOPs per token of each weight matrix kind (attention scores excluded)."""
    d, ff, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_kv_heads * config.head_dim
    layers = config.num_layers
    return {
        "attention_projections": layers * 2 * (d * d + 2 * d * kv + d * d),
        "mlp": layers * 2 * 3 * d * ff,
        "output_head": 2 * d * v,
    }


def attention_flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of ``QKᵀ`` and ``AV`` over a sequence of ``seq_len`` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    keys = (seq_len + 1) / 2 if causal else seq_len
    return config.num_layers * 2 * 2 * config.num_heads * config.head_dim * keys


def flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True,
                    causal: bool = True) -> float:
    """FLOPs per token of a forward pass, or of a training step (3× forward) by default."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    forward = sum(matmul_flops_per_token(config).values()) + attention_flops_per_token(
        config, seq_len, causal)
    return 3 * forward if training else forward


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 7,
                       device: str | torch.device = "cpu") -> float:
    """Median FLOP/s of a square matmul in ``dtype``: the peak an MFU on CPU is measured against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # first call: allocator and kernel selection
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2]
