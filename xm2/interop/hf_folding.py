"""The µP multipliers moved into and out of the weights between xm2 and ``transformers``.

xm2 and Llama share parameter names (``model.layers.N.self_attn.q_proj.weight`` ...), so only the
µP multipliers need a home on the other side (``../shared/api-notes.md`` §2.4):

* **Llama export** folds them into the weights, exactly even with tied embeddings. The residual
  stream runs 1/s smaller (s = ``scale_emb``): o_proj and down_proj × r/s (r = scale_depth/√L),
  every RMSNorm ε × 1/s² (RMSNorm is scale invariant up to ε), and the final norm gain × 1/m for
  the logits' 1/m. xm2's attention scale is SDPA's 1/√head_dim, Llama's too: q needs no fold.
* **Import** folds a source multiplier xm2 has no field for into the weights exactly (unequal
  attention and MLP residual scales, an attention scale other than 1/√head_dim, an output
  scale), and undoes the fold of an xm2 export.

Every fold of a weight is computed in float64 and rounded once. The norms' ε lives in
config.json, so its fold is in ``hf_export.hf_config`` and ``hf_import.xm2_config``; writing and
reading the folders is ``xm2.interop.hf_export`` and ``xm2.interop.hf_import``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from xm2.config import ModelConfig
from xm2.errors import ConfigError

HF_PREFIX = "model."
"""Where the decoder's weights sit in a transformers CausalLM state dict (and in xm2's module)."""
# Buffers some older folders saved; derived from the config, so nothing is lost by skipping them.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class SourceMath:
    """What a Hugging Face config computes, in xm2's terms: the multipliers it applies."""

    naming: str
    """minicpm, xmodel (mup_*), granite, or llama (none; an xm2 export when ``target`` is set)."""
    scale_emb: float = 1.0
    attention_residual: float = 1.0
    mlp_residual: float = 1.0
    logits_divisor: float = 1.0
    """The source's logits are (final norm output · Eᵀ) / logits_divisor."""
    attention_scale: float | None = None
    """The attention-score scale if it is not 1/√head_dim."""
    use_mup: bool = False
    dim_model_base: int | None = None
    target: dict | None = None
    """The xm2 architecture an xm2 export recorded: its multipliers are taken back (the fold
    undone) instead of folding the source's into the weights."""


def _is_folded(name: str) -> bool:
    """The last matrix of a residual branch: scaling it scales the branch (no bias after it)."""
    return name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))


def hf_state_dict(decoder: dict[str, torch.Tensor], config: ModelConfig,
                  target: Literal["llama", "granite"]) -> dict[str, torch.Tensor]:
    """xm2 decoder weights as a transformers CausalLM state dict, µP folded for ``llama``.

    The tied LM head is not stored (transformers ties ``lm_head.weight`` on load). The fold is
    computed in float64 and rounded once.
    """
    s, r, m = config.scale_emb, config.residual_scale, config.width_multiplier
    state = {}
    for name, tensor in decoder.items():
        factor = 1.0
        if target == "llama" and _is_folded(name):
            factor = r / s  # branch × r, and the whole residual stream × 1/s
        elif target == "llama" and name == "norm.weight":
            factor = 1 / m  # logits × 1/m through the final norm, which feeds only the head
        state[HF_PREFIX + name] = scaled(tensor.detach(), factor, tensor.dtype)
    return state


def scaled(tensor: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``tensor × factor`` in ``dtype``, computed in float64 and rounded once; the tensor itself
    (no copy: a 1.2B model is 5 GB) when there is nothing to change."""
    if factor == 1.0 and tensor.dtype == dtype:
        return tensor.contiguous()
    return (tensor.to(torch.float64) * factor).to(dtype).contiguous()


def xm2_weights(hf_state: dict[str, torch.Tensor], math_: SourceMath, config: ModelConfig,
                path: Path) -> dict[str, torch.Tensor]:
    """A transformers state dict (consumed) as the xm2 decoder's, with the source's multipliers
    that xm2 has no field for folded into the weights (computed in float64, stored as float32)."""
    state, head = {}, None
    while hf_state:  # emptied as it goes: the source's tensors are freed as they are converted
        name, tensor = hf_state.popitem()
        if name.endswith(DERIVED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            head = tensor
        elif name.startswith(HF_PREFIX):
            state[name[len(HF_PREFIX):]] = tensor
        else:
            state[name] = tensor  # reported below as unexpected
    expected = {name: tuple(p.shape) for name, p in _meta_decoder(config).named_parameters()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ConfigError(f"{path}: the weights do not fit an xm2 decoder of this config: "
                          f"unexpected {unexpected[:4]}, missing {missing[:4]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ConfigError(f"{path}: {HF_PREFIX}{name} has shape {tuple(state[name].shape)}, "
                              f"the config says {shape}")
    if head is not None and not torch.equal(head, state["embed_tokens.weight"]):
        raise ConfigError(f"{path}: lm_head.weight differs from model.embed_tokens.weight (untied "
                          "embeddings); xm2 ties its input and output embeddings, so this model "
                          "cannot be represented")
    # xm2's residual stream is c× the source's (c = ratio of embedding multipliers; 1 unless an
    # xm2 export is unfolded). RMSNorm ε is c²× (xm2_config), so every norm returns what it did,
    # and each branch's last matrix carries c and the source's scale over xm2's.
    c = config.scale_emb / math_.scale_emb
    r = config.residual_scale
    # The source's logits: g·N(h)·Eᵀ/divisor; xm2's: g'·N(h)·Eᵀ/m. So g' = g·m/divisor.
    gain = config.width_multiplier / math_.logits_divisor
    q_fold = (math_.attention_scale * math.sqrt(config.head_dim)
              if math_.attention_scale is not None else 1.0)
    folds = {"self_attn.o_proj.weight": c * math_.attention_residual / r,
             "mlp.down_proj.weight": c * math_.mlp_residual / r, "self_attn.q_proj.weight": q_fold}
    for name, tensor in state.items():
        factor = next((f for suffix, f in folds.items() if name.endswith(suffix)), 1.0)
        state[name] = scaled(tensor, gain if name == "norm.weight" else factor, torch.float32)
    return state


def _meta_decoder(config: ModelConfig):
    from xm2.model import Decoder

    with torch.device("meta"):
        return Decoder(config)
