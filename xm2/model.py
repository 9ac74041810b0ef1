"""The Xmodel-2 decoder: a Llama-2-style transformer with µP multipliers, in plain PyTorch.

Pre-RMSNorm blocks, rotary position embeddings, SwiGLU MLPs, grouped-query attention through
``scaled_dot_product_attention``, no biases, tied input/output embeddings. Parameter names follow
the Hugging Face Llama layout so that checkpoints map one-to-one. Initialisation and parameter roles
live in :mod:`xm2.mup`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xm2 import mup
from xm2.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim) in the rotate-half layout."""
    inverse_frequency = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) queries or keys by their positions."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention of (batch, heads, seq, head_dim) queries over
    (batch, kv_heads, seq, head_dim) keys and values.

    ``scaled_dot_product_attention`` everywhere but in bf16 on a CPU: there its flash kernel ran
    the nano training step's attention 1.8× slower (tiny's 1.6×) than two bf16 matrix products
    around a softmax (docs/performance.md), so that is what runs. As accurate as bf16 SDPA
    (tests/test_perf.py); the (seq × seq) scores cost memory, which at CPU sequence lengths is
    small.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # The query heads of one KV head are one matrix product with it: no repeated keys or values.
    grouped = q.reshape(batch * kv_heads, group * seq, head_dim)
    keys = k.reshape(batch * kv_heads, seq, head_dim).transpose(1, 2)
    # The causal mask as an additive bias, added by the product itself (nothing to undo in the
    # backward pass).
    future = torch.full((seq, seq), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(future.repeat(group, 1), grouped, keys, alpha=head_dim**-0.5)
    # bf16 in and out; the kernel accumulates in fp32 (an fp32 copy of the scores cost 3×).
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, v.reshape(batch * kv_heads, seq, head_dim))
    return out.view(batch, heads, seq, head_dim)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences, filled in place as tokens come.

    ``valid`` marks the key positions that may be attended to: generation left-pads prompts of
    different lengths and marks the padding invalid. RoPE scores depend only on the distance
    between a query and a key, so a left-padded row gives the same attention as the row alone.
    """

    keys: list[torch.Tensor]
    """One (batch, kv_heads, max_len, head_dim) tensor per layer."""
    values: list[torch.Tensor]
    valid: torch.Tensor
    """(batch, max_len) bool."""
    length: int = 0
    """Positions filled so far; the next tokens take positions length, length+1, ..."""

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        max_len = max_len or config.max_seq_len
        if max_len > config.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len={config.max_seq_len}")
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
                   torch.ones(batch, max_len, dtype=torch.bool, device=device))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of ``layer`` after the filled positions; return all of them."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention_mask(self, new: int) -> torch.Tensor | None:
        """(batch, 1, new, length+new) bool: causal over the new queries, valid keys only; None
        when plain causal attention is exact (a first call with no padding)."""
        end = self.length + new
        valid = self.valid[:, :end]
        if self.length == 0 and bool(valid.all()):
            return None
        causal = torch.ones(new, end, dtype=torch.bool, device=valid.device).tril(self.length)
        # Every query sees at least itself, so padding rows stay finite instead of NaN.
        itself = torch.zeros_like(causal)
        itself[torch.arange(new), self.length + torch.arange(new)] = True
        return (causal[None, None] & valid[:, None, None, :]) | itself[None, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v)
        else:
            mask = cache.attention_mask(seq)
            k, v = cache.store(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.residual_scale = config.residual_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        # µP rule 2: each branch output × scale_depth/√num_layers before the residual add (one
        # pass: add with alpha).
        attention = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        x = torch.add(x, attention, alpha=self.residual_scale)
        return torch.add(x, self.mlp(self.post_attention_layernorm(x)), alpha=self.residual_scale)


class Decoder(nn.Module):
    """Token ids (batch, seq) to next-token logits (batch, seq, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        device = torch.get_default_device()  # meta inside `with torch.device("meta")`
        # Built on the meta device and then given values once, by µP init alone: no memory or
        # random numbers spent on PyTorch's default init, and the weights depend only on the
        # generator state here, so a model materialised later from that state is the same one.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
            self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
            # Not persistent: derived from the config, so checkpoints hold only learned weights.
            shape = (config.max_seq_len, config.head_dim)
            self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        self.activation_checkpointing = False
        """Recompute each block in the backward pass instead of keeping its activations (set by
        :func:`xm2.parallel.apply`)."""
        if device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """RoPE tables and µP initialisation (rule 3), on whatever device the model is on.

        Sharded training builds the model on the meta device and materialises it with
        ``to_empty()``, which leaves every tensor uninitialised, buffers included; this method
        is what gives them their values again (see :func:`xm2.parallel.materialize`).
        """
        with torch.no_grad():
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len,
                                   self.config.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        mup.init_parameters(self, self.config)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of ``input_ids``; with a ``cache``, ``input_ids`` are the tokens that follow
        the cached ones, and the cache is extended by them."""
        seq = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + seq > limit:
            raise ValueError(f"sequence length {start + seq} exceeds "
                             + (f"the cache's {limit} positions" if cache is not None
                                else f"max_seq_len={self.config.max_seq_len}"))
        cos, sin = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
        # µP rule 1: embedding output × scale_emb.
        h = self.embed_tokens(input_ids) * self.config.scale_emb
        for index, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, index)
        if cache is not None:
            cache.length += seq
        h = self.norm(h)
        # µP rule 5: logits × 1/m, through the tied embedding. Applied to h, which is vocab/hidden
        # times smaller than the logits (the same numbers when m is a power of 2), and not at all
        # when m is 1.
        m = self.config.width_multiplier
        return F.linear(h if m == 1 else h / m, self.embed_tokens.weight)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` (default: the context)."""
        weight = self.embed_tokens.weight
        return KVCache.empty(self.config, batch, max_len, weight.dtype, weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
