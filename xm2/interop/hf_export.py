"""Export an xm2 checkpoint to a Hugging Face ``transformers`` folder, with the same logits.

* **Llama** (``--target llama``): a LlamaForCausalLM with the µP multipliers folded into the
  weights (``xm2.interop.hf_folding``).
* **Granite** (``--target granite``): keeps them as they are: ``embedding_multiplier`` s,
  ``residual_multiplier`` r, ``attention_multiplier`` 1/√head_dim, ``logits_scaling`` m.

The config.json of an export carries an ``xm2`` record of what was folded, so that
``xm2 import-hf`` can undo it.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from xm2.config import ModelConfig
from xm2.errors import ConfigError
from xm2.interop.hf_folding import hf_state_dict
from xm2.interop.output_folder import written_whole

FORMAT_VERSION = 1
"""Version of the ``xm2`` record that an export writes into config.json."""


def hf_config(config: ModelConfig, target: Literal["llama", "granite"],
              dtype: torch.dtype, source: dict) -> Any:
    """The transformers config of an export, with an ``xm2`` record of what was folded."""
    from transformers import GraniteConfig, LlamaConfig

    s = config.scale_emb
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        initializer_range=min(config.init_std, 1.0), bos_token_id=1, eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
        xm2={"format_version": FORMAT_VERSION, "target": target,
             "architecture": config.to_dict(), "source": source},
    )
    if target == "llama":
        # ε/s²: every RMSNorm sees the stream 1/s smaller and must return what it did before.
        return LlamaConfig(rms_norm_eps=config.norm_eps / s**2, **common)
    return GraniteConfig(
        rms_norm_eps=config.norm_eps, embedding_multiplier=s,
        residual_multiplier=config.residual_scale, attention_multiplier=config.head_dim**-0.5,
        logits_scaling=config.width_multiplier, **common)


def export_tokenizer(tokenizer_path: str | Path, output: str | Path) -> None:
    """Write the SentencePiece model as transformers tokenizers: exact ids, and a fast decoder.

    ``AutoTokenizer`` loads transformers' ``SentencePieceBackend`` (tokenizer_config.json), which
    encodes with the SentencePiece library itself: xm2's ids by construction. Special-token
    strings in text are encoded as text, as SentencePiece does, and no BOS/EOS is added (xm2
    trains with an EOS between documents and nothing else). Its ``decode`` works piece by piece
    and shows byte-fallback pieces as ``<0x0A>``; ``PreTrainedTokenizerFast.from_pretrained``
    loads tokenizer.json instead, a ``tokenizers`` Unigram that decodes exactly but breaks ties
    between equal-scoring segmentations (runs of ``=`` or spaces) otherwise than SentencePiece's
    float32 Viterbi does, so its ids can differ there.
    """
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    special = {"unk_token": processor.id_to_piece(processor.unk_id()),
               "bos_token": processor.id_to_piece(processor.bos_id()),
               "eos_token": processor.id_to_piece(processor.eos_id()),
               "split_special_tokens": True}
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    # SentencePiece never matches unknown, control, byte or unused pieces in text: the Unigram
    # model must not either (byte fallback still finds the byte pieces by name).
    vocab = [(piece.piece, piece.score if piece.type in (1, 4) else -1e9) for piece in proto.pieces]
    TokenizersBackend(tokenizer_object=SpmConverter.build_tokenizer_from_spm_proto(proto, vocab),
                      **special).save_pretrained(str(output))
    output = Path(output)
    shutil.copyfile(tokenizer_path, output / "tokenizer.model")
    SentencePieceBackend(vocab_file=str(output / "tokenizer.model"), legacy=True,
                         **special).save_pretrained(str(output))


def compare_logits(xm2_model: torch.nn.Module, hf_folder: str | Path, seq_len: int = 64,
                   seed: int = 0) -> float:
    """Max |logit difference| between an xm2 decoder and a transformers folder on random tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per export is enough
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    hf_model.eval()
    config = xm2_model.config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (2, min(seq_len, config.max_seq_len)),
                           generator=generator)
    with torch.no_grad():
        expected = xm2_model.float()(tokens)
        got = hf_model(input_ids=tokens).logits
    return float((expected - got).abs().max())


def export_hf(
    checkpoint: str,
    output: str | None = None,
    target: Literal["llama", "granite"] = "llama",
    tokenizer_path: str | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    verify: bool = True,
    overwrite: bool = False,
) -> str:
    """Export an xm2 checkpoint to a Hugging Face transformers folder (AutoModelForCausalLM).

    The folder holds model.safetensors, config.json, generation_config.json and the tokenizer
    (tokenizer.model with a SentencePiece-backed tokenizer_config.json that encodes xm2's ids).
    It loads offline with AutoModelForCausalLM.from_pretrained(folder) and gives xm2's logits.

    Args:
        checkpoint: An xm2 checkpoint file (.ckpt written by `xm2 fit` or `xm2 import-hf`).
        output: The folder to write (refused if it exists and is not empty, unless --overwrite);
            default <checkpoint name>-hf-<target> beside the checkpoint.
        target: llama: a LlamaForCausalLM with the µP multipliers folded into the weights (exact
            with tied embeddings); granite: a GraniteForCausalLM whose config carries them.
        tokenizer_path: The tokenizer, if not where the checkpoint's record says.
        dtype: Weights dtype of the export (float32 keeps xm2's weights bit for bit).
        verify: Load the export with transformers and report the largest logit difference
            from xm2 on random tokens (fails above 1e-3 for float32).
        overwrite: Replace an existing output folder.
    """
    if target not in ("llama", "granite"):
        raise ConfigError(f"--target {target!r}; allowed: llama, granite")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}; allowed: float32, bfloat16")
    source = Path(checkpoint)
    if source.is_dir() and (source / "config.json").is_file():
        raise ConfigError(f"{source} is a Hugging Face folder, not an xm2 checkpoint; bring it "
                          f"into xm2 with `xm2 import-hf {source} --output <folder>`")
    try:
        from safetensors.torch import save_file
        from transformers import GenerationConfig
    except ImportError as error:
        raise ConfigError(f"export-hf needs transformers ({error}); install it with "
                          "`pip install -e '.[hf]'`") from error
    from xm2.eval.load import load_checkpoint_model

    started = time.perf_counter()
    loaded = load_checkpoint_model(source, tokenizer_path=tokenizer_path)
    output_dir = Path(output) if output else source.with_name(f"{source.stem}-hf-{target}")
    with written_whole(output_dir, overwrite) as staging:
        torch_dtype = getattr(torch, dtype)
        state = hf_state_dict(loaded.model.state_dict(), loaded.config, target)
        state = {name: tensor.to(torch_dtype) for name, tensor in state.items()}
        record = loaded.record
        provenance = {"checkpoint": str(source.resolve()), "global_step": record.get("global_step"),
                      "tokens_seen": record.get("tokens_seen"), "run_id": record.get("run_id"),
                      "tokenizer_sha256": record.get("tokenizer_sha256")}
        try:
            save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        except Exception as error:
            if "I/O error" not in str(error):
                raise
            # safetensors words a failed write (a full disk) as its own error, not an OSError.
            raise OSError(str(error)) from error
        hf_config(loaded.config, target, torch_dtype, provenance).save_pretrained(str(staging))
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(staging))
        export_tokenizer(loaded.tokenizer_path, staging)
        difference = compare_logits(loaded.model, staging) if verify else None
        tolerance = 1e-3 if dtype == "float32" else math.inf
        if difference is not None and not difference <= tolerance:
            raise ConfigError(f"the {target} export of {source} gives logits {difference:.3g} "
                              f"away from xm2's (allowed {tolerance}); nothing was written")
    parameters = sum(t.numel() for t in state.values())
    check = f", max |logit diff| vs xm2 {difference:.2e}" if difference is not None else ""
    print(f"{output_dir}: {target} ({dtype}), {parameters:,} parameters, step "
          f"{record.get('global_step')}, {time.perf_counter() - started:.1f} s{check}",
          file=sys.stderr)
    return str(output_dir)
