"""Model configuration: the decoder's shape and its µP multipliers.

Every number the model needs lives here, so that a YAML preset in ``config/model/`` describes a
model completely and the µP rules in :mod:`xm2.mup` follow from it with no other settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from xm2.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape of a Llama-2-style decoder and its µP (Tensor Programs) multipliers.

    The defaults are the ``nano`` wind-tunnel proxy (about 6M parameters).
    """

    vocab_size: int = 4096
    """Tokenizer vocabulary size; input and output embeddings are tied."""
    hidden_size: int = 256
    """Width of the residual stream (d_model)."""
    intermediate_size: int = 640
    """Width of the SwiGLU MLP (2.5 × hidden_size in every Xmodel-2 preset)."""
    num_layers: int = 8
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention query heads; hidden_size must be divisible by it."""
    num_kv_heads: int = 1
    """Key/value heads for grouped-query attention; num_heads must be divisible by it."""
    max_seq_len: int = 256
    """Context length: training sequences have this many tokens."""
    rope_theta: float = 500000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    use_mup: bool = True
    """µP on; false gives standard parametrization: the width multiplier is fixed at 1 in the init,
    learning-rate and logit rules, so both parametrizations are the same model at the base width
    and differ only in how they scale."""
    dim_model_base: int = 256
    """Base width of µP: the width multiplier is m = hidden_size / dim_model_base."""
    scale_emb: float = 12.0
    """µP: the embedding output is multiplied by this."""
    scale_depth: float = 1.4
    """µP: each attention and MLP output is multiplied by scale_depth / sqrt(num_layers)."""
    init_std: float = 0.1
    """µP: base init std; hidden matrices use init_std / sqrt(m), the embedding init_std."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_seq_len", "dim_model_base"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "scale_emb", "scale_depth", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model {name}={value!r} must be a finite number > 0")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"allowed num_heads are divisors of {self.hidden_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}; allowed num_kv_heads are divisors of {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model head_dim={self.head_dim} (hidden_size/num_heads) must be even for RoPE"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def width_multiplier(self) -> float:
        """m = d_model / dim_model_base under µP, 1 under standard parametrization."""
        return self.hidden_size / self.dim_model_base if self.use_mup else 1.0

    @property
    def residual_scale(self) -> float:
        """Multiplier on each attention and MLP output before the residual add."""
        return self.scale_depth / math.sqrt(self.num_layers)

    def mup_settings(self) -> dict[str, float | bool | int]:
        """The µP facts a checkpoint records, so that a mismatched load can be refused."""
        return {
            "use_mup": self.use_mup,
            "dim_model_base": self.dim_model_base,
            "hidden_size": self.hidden_size,
            "width_multiplier": self.width_multiplier,
            "scale_emb": self.scale_emb,
            "scale_depth": self.scale_depth,
            "init_std": self.init_std,
        }

    def to_dict(self) -> dict:
        return asdict(self)
