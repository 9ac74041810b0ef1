"""An xm2 checkpoint as a model and its tokenizer, ready for evaluation or generation.

Everything that evaluates a checkpoint outside of training (``xm2 evaluate``, ``xm2 generate``,
the lm-eval adapter, the Hugging Face export) starts here, so that each one checks the same things:
the checkpoint's digest record (a checkpoint without one loads with a warning that it cannot be
verified), a ``weights_only`` load, and that the tokenizer is the one the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from xm2.checkpoint import load_checkpoint_file, verify_checkpoint
from xm2.config import ModelConfig
from xm2.data.tokenizer import default_tokenizer_path, load_tokenizer, tokenizer_mismatch
from xm2.errors import ConfigError
from xm2.model import Decoder, rope_tables

MODEL_PREFIX = "model."
"""The decoder's parameters sit under this prefix in the LightningModule's state dict."""


@dataclass
class LoadedModel:
    """A decoder in eval mode with the tokenizer it was trained with."""

    model: Decoder
    tokenizer: spm.SentencePieceProcessor
    config: ModelConfig
    record: dict
    """The checkpoint's record: global_step, tokens_seen, run_id, ... (for a checkpoint without
    one, the record saved inside it, if any)."""
    path: Path
    tokenizer_path: Path

    @property
    def global_step(self) -> int:
        return int(self.record.get("global_step", 0))


def decoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's weights out of a LightningModule state dict."""
    return {name[len(MODEL_PREFIX):]: tensor for name, tensor in state_dict.items()
            if name.startswith(MODEL_PREFIX)}


def find_tokenizer(record: dict, checkpoint: dict, config: ModelConfig,
                   tokenizer_path: str | Path | None) -> Path:
    """The tokenizer a checkpoint was trained with: the one given, else the one its record or its
    data settings name, else the default for its vocabulary size; checked against its digest."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    candidates = [tokenizer_path, record.get("tokenizer_path"), data.get("tokenizer_path"),
                  default_tokenizer_path(config.vocab_size)]
    path = Path(next(c for c in candidates if c))
    if not path.is_file():
        raise ConfigError(f"tokenizer {path} (named by the checkpoint) does not exist; pass the "
                          "tokenizer the model was trained with as --tokenizer_path")
    problem = tokenizer_mismatch(record.get("tokenizer_sha256"), path)
    if problem:
        raise ConfigError(f"the checkpoint {problem}")
    return path


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None,
                          tokenizer_path: str | Path | None = None) -> LoadedModel:
    """Load the decoder and tokenizer of the xm2 checkpoint at ``path`` (a ``.ckpt`` file).

    Args:
        path: A checkpoint written by ``xm2 fit`` or ``xm2 import-hf``.
        device: Where to put the model.
        dtype: Cast the weights to this dtype (default: as saved, fp32).
        tokenizer_path: The tokenizer, if not where the checkpoint's record says.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a sharded checkpoint folder; make one file of it with "
                          f"`xm2 consolidate-checkpoint {path}` and evaluate that")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    record = verify_checkpoint(path)
    checkpoint = load_checkpoint_file(path)  # warns if there is no record to verify it by
    if record is None:
        # Unverified, but the run's own record inside still names its tokenizer's digest.
        record = ((checkpoint.get("xm2") or {}).get("record") or {}
                  if isinstance(checkpoint, dict) else {})
    try:
        architecture = checkpoint["hyper_parameters"]["architecture"]
    except (KeyError, TypeError):
        raise ConfigError(f"{path} is not an xm2 checkpoint: it has no "
                          "hyper_parameters.architecture (write one with `xm2 fit` or "
                          "`xm2 import-hf`)") from None
    config = ModelConfig(**architecture)
    with torch.device("meta"):
        model = Decoder(config)
    # Materialised without µP init: it would only be overwritten, and would draw random numbers.
    model.to_empty(device=device)
    with torch.no_grad():
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    try:
        model.load_state_dict(decoder_state_dict(checkpoint["state_dict"]))
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {path} does not hold the weights of its own architecture "
                          f"({' '.join(str(error).split())[:300]})") from None
    if dtype is not None:
        model.to(dtype)
    model.eval().requires_grad_(False)
    found = find_tokenizer(record, checkpoint, config, tokenizer_path)
    return LoadedModel(model, load_tokenizer(found), config, record, path, found)
