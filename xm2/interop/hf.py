"""Hugging Face ``transformers`` folders to and from xm2 checkpoints, with the same logits.

xm2 and Llama share parameter names (``model.layers.N.self_attn.q_proj.weight`` ...), so only the
µP multipliers need a home on the other side (``../shared/api-notes.md`` §2.4):

* **Llama export** folds them into the weights, exactly even with tied embeddings. The residual
  stream runs 1/s smaller (s = ``scale_emb``): o_proj and down_proj × r/s (r = scale_depth/√L),
  every RMSNorm ε × 1/s² (RMSNorm is scale invariant up to ε), and the final norm gain × 1/m for
  the logits' 1/m. xm2's attention scale is SDPA's 1/√head_dim, Llama's too: q needs no fold.
* **Granite export** keeps them as they are: ``embedding_multiplier`` s, ``residual_multiplier``
  r, ``attention_multiplier`` 1/√head_dim, ``logits_scaling`` m.
* **Import** reads the Xmodel-2 / MiniCPM layout (``scale_emb``/``dim_model_base``/``scale_depth``,
  or Xmodel-2.5's ``mup_*``), Granite, a plain Llama (multipliers 1, standard parametrization)
  or an xm2 export (the fold undone from the ``xm2`` record in its config.json). A source
  multiplier xm2 has no field for is folded into the weights exactly (unequal attention and MLP
  residual scales, an attention scale other than 1/√head_dim, an output scale); a setting that
  changes the math and cannot be represented is refused by name.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from xm2.checkpoint import save_checkpoint_file
from xm2.config import ModelConfig
from xm2.errors import ConfigError

HF_PREFIX = "model."
"""Where the decoder's weights sit in a transformers CausalLM state dict (and in xm2's module)."""
FORMAT_VERSION = 1
"""Version of the ``xm2`` record that an export writes into config.json."""
# Buffers some older folders saved; derived from the config, so nothing is lost by skipping them.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json fields that do not change what the model computes.
NEUTRAL_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "initializer_range", "pretraining_tp", "attention_dropout", "tokenizer_class", "return_dict",
    "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder",
    "_attn_implementation", "_attn_implementation_autoset", "id2label", "label2id", "xm2",
    "max_position_embeddings", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "mlp_bias",
}
MINICPM_FIELDS = ("scale_emb", "dim_model_base", "scale_depth")
XMODEL_FIELDS = ("use_mup", "mup_input_scale", "mup_output_scale", "mup_attention_residual_scale",
                 "mup_ffn_residual_scale", "mup_base_width")
GRANITE_FIELDS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                  "logits_scaling")
MODEL_TYPES = ("llama", "minicpm", "xmodel", "granite")


# ---------------------------------------------------------------------------------------------
# Shared: output folders and names


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``output``; refuses to replace a non-empty folder silently."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} exists and is not empty; name a new folder or pass "
                          "--overwrite true to replace it")
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, output: Path) -> None:
    """Put the finished staging folder in place of ``output``: never a half-written folder."""
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _is_folded(name: str) -> bool:
    """The last matrix of a residual branch: scaling it scales the branch (no bias after it)."""
    return name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))


# ---------------------------------------------------------------------------------------------
# Export


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
    staging = _prepare_output(output_dir, overwrite)
    try:
        torch_dtype = getattr(torch, dtype)
        state = hf_state_dict(loaded.model.state_dict(), loaded.config, target)
        state = {name: tensor.to(torch_dtype) for name, tensor in state.items()}
        record = loaded.record
        provenance = {"checkpoint": str(source.resolve()), "global_step": record.get("global_step"),
                      "tokens_seen": record.get("tokens_seen"), "run_id": record.get("run_id"),
                      "tokenizer_sha256": record.get("tokenizer_sha256")}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        hf_config(loaded.config, target, torch_dtype, provenance).save_pretrained(str(staging))
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(staging))
        export_tokenizer(loaded.tokenizer_path, staging)
        difference = compare_logits(loaded.model, staging) if verify else None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tolerance = 1e-3 if dtype == "float32" else math.inf
    if difference is not None and not difference <= tolerance:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"the {target} export of {source} gives logits {difference:.3g} away "
                          f"from xm2's (allowed {tolerance}); nothing was written")
    _publish(staging, output_dir)
    parameters = sum(t.numel() for t in state.values())
    check = f", max |logit diff| vs xm2 {difference:.2e}" if difference is not None else ""
    print(f"{output_dir}: {target} ({dtype}), {parameters:,} parameters, step "
          f"{record.get('global_step')}, {time.perf_counter() - started:.1f} s{check}",
          file=sys.stderr)
    return str(output_dir)


# ---------------------------------------------------------------------------------------------
# Import


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


def _number(hf: dict, key: str, path: Path) -> float:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"{path}: {key}={value!r} must be a finite number > 0")
    return float(value)


def _present(hf: dict, fields: tuple[str, ...], path: Path, naming: str) -> bool:
    found = [f for f in fields if f in hf]
    required = [f for f in fields if f not in ("use_mup", "mup_output_scale")]
    if found and any(f not in hf for f in required):
        missing = [f for f in required if f not in hf]
        raise ConfigError(f"{path}: the {naming} µP fields are incomplete: {found} given, "
                          f"{missing} missing; a model under µP needs all of them")
    return bool(found)


def source_math(hf: dict, path: Path) -> SourceMath:
    """The µP multipliers a config.json declares, under any of the namings xm2 reads."""
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    namings = [name for name, fields in (("minicpm", MINICPM_FIELDS), ("xmodel", XMODEL_FIELDS),
                                         ("granite", GRANITE_FIELDS))
               if _present(hf, fields, path, name)]
    if len(namings) > 1:
        raise ConfigError(f"{path} declares µP multipliers under several namings ({namings}); "
                          "which one the model ran with is ambiguous, so it is not imported")
    exported = hf.get("xm2")
    if not namings:
        # A plain Llama applies no multiplier; an xm2 export says which ones it folded.
        target = exported["architecture"] if exported and exported.get("target") == "llama" else None
        return SourceMath("llama", target=target)
    naming = namings[0]
    if naming == "minicpm":
        depth = _number(hf, "scale_depth", path) / math.sqrt(layers)
        return SourceMath(naming, scale_emb=_number(hf, "scale_emb", path),
                          attention_residual=depth, mlp_residual=depth,
                          logits_divisor=hidden / _number(hf, "dim_model_base", path),
                          use_mup=True, dim_model_base=hf["dim_model_base"])
    if naming == "xmodel":
        if not hf.get("use_mup", True):
            raise ConfigError(f"{path}: use_mup is false, yet mup_* multipliers are set; whether "
                              "they apply is not defined, so the model is not imported")
        output_scale = _number(hf, "mup_output_scale", path) if "mup_output_scale" in hf else 1.0
        head_dim = hf.get("head_dim") or hidden // hf["num_attention_heads"]
        return SourceMath(
            naming, scale_emb=_number(hf, "mup_input_scale", path),
            attention_residual=_number(hf, "mup_attention_residual_scale", path) / math.sqrt(layers),
            mlp_residual=_number(hf, "mup_ffn_residual_scale", path) / math.sqrt(layers),
            logits_divisor=hidden / _number(hf, "mup_base_width", path) / output_scale,
            # Xmodel-2.5's µP attention: scores × 1/head_dim (recipe.md §2.2).
            attention_scale=1.0 / head_dim, use_mup=True, dim_model_base=hf["mup_base_width"])
    residual = _number(hf, "residual_multiplier", path)
    target = exported["architecture"] if exported and exported.get("target") == "granite" else None
    return SourceMath(naming, scale_emb=_number(hf, "embedding_multiplier", path),
                      attention_residual=residual, mlp_residual=residual,
                      logits_divisor=_number(hf, "logits_scaling", path),
                      attention_scale=_number(hf, "attention_multiplier", path), use_mup=True,
                      target=target)


def check_supported(hf: dict, path: Path, allow_fields: list[str]) -> None:
    """Refuse a config whose math xm2 cannot represent, naming the field and its value."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type {model_type!r} is not a layout xm2 imports; "
                          f"allowed: {', '.join(MODEL_TYPES)}")
    problems = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act={hf['hidden_act']!r} (xm2's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (xm2 has no biases)")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']!r} (xm2 has plain RoPE)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        problems.append(f"rope_parameters={rope!r} (xm2 has plain RoPE: rope_type default)")
    head_dim = hf.get("head_dim")
    if head_dim and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(f"head_dim={head_dim} (xm2's is hidden_size/num_attention_heads = "
                        f"{hf['hidden_size'] // hf['num_attention_heads']})")
    for key in ("sliding_window", "quantization_config"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]!r} (not in xm2)")
    if problems:
        raise ConfigError(f"{path} changes the model's math in ways xm2 cannot represent: "
                          f"{'; '.join(problems)}. It is not imported")
    known = NEUTRAL_FIELDS | set(MINICPM_FIELDS) | set(XMODEL_FIELDS) | set(GRANITE_FIELDS)
    unknown = sorted(set(hf) - known - set(allow_fields) - {"sliding_window", "quantization_config"})
    if unknown:
        raise ConfigError(f"{path} has fields xm2 does not know: {', '.join(unknown)}. They may "
                          "change the model's math; if you know they do not, import with "
                          f"--allow_fields '[{', '.join(unknown)}]'")


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder: safetensors (sharded or not) or torch .bin files,
    the latter loaded with ``weights_only=True``."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for name in files:
            state.update(_read_weights_file(folder / name))
        return state
    raise ConfigError(f"{folder} has no weights: expected model.safetensors, "
                      "pytorch_model.bin or their sharded .index.json forms")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{path} cannot be loaded with weights_only=True ({type(error).__name__}:"
                          f" {str(error).splitlines()[0]}); a .bin file that needs more may run "
                          "code when loaded: convert it to safetensors first") from error


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


def xm2_config(hf: dict, math_: SourceMath, path: Path) -> ModelConfig:
    """The xm2 ModelConfig of a config.json and its multipliers."""
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    eps = float(hf.get("rms_norm_eps", 1e-6))
    target = math_.target
    if target is not None:
        mup = {key: target[key] for key in ("use_mup", "dim_model_base", "scale_emb",
                                            "scale_depth", "init_std")}
        # The export divided ε by (its scale_emb)²: the stream comes back that much larger.
        eps *= (target["scale_emb"] / math_.scale_emb) ** 2
        if math.isclose(eps, target["norm_eps"], rel_tol=1e-6):
            eps = target["norm_eps"]
    else:
        base = math_.dim_model_base or hidden / math_.logits_divisor
        # A base width that is not an integer keeps µP with m = 1; the logits' divisor then goes
        # into the final norm gain (xm2_weights), as any difference between the two does.
        base = round(base) if abs(base - round(base)) < 1e-9 and round(base) > 0 else hidden
        mup = {"use_mup": math_.use_mup,
               "dim_model_base": int(base) if math_.use_mup else hidden,
               "scale_emb": math_.scale_emb,
               # One residual scale in xm2: the attention one; the MLP's ratio is folded.
               "scale_depth": math_.attention_residual * math.sqrt(layers),
               "init_std": float(hf.get("initializer_range") or 0.02)}
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf["intermediate_size"], num_layers=layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(rope_theta),
            norm_eps=eps, **mup)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"{path} does not describe a model xm2 can build: {error}") from error


def _continue_training_config(config: ModelConfig, tokenizer: Path, run_name: str) -> dict:
    """The recipe's config (config/nano.yaml when present) with the imported model in it."""
    recipe = Path(__file__).resolve().parents[2] / "config" / "nano.yaml"
    settings = yaml.safe_load(recipe.read_text()) if recipe.is_file() else {}
    model = settings.setdefault("model", {})
    model["architecture"] = config.to_dict()
    # A decay branch starts at the imported step (0): no warmup before its decay start.
    model["schedule"] = {**(model.get("schedule") or {}), "warmup_steps": 0, "decay_start_step": 0}
    settings.setdefault("data", {})["tokenizer_path"] = str(tokenizer)
    logger = (settings.get("trainer") or {}).get("logger") or {}
    if isinstance(logger, dict) and "init_args" in logger:
        logger["init_args"]["run_name"] = run_name
    return settings


def import_hf(
    folder: str,
    output: str | None = None,
    tokenizer_path: str | None = None,
    allow_fields: list[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Import a Hugging Face folder (Xmodel-2 / MiniCPM, Granite or Llama layout) as an xm2 checkpoint.

    Writes <output>/model.ckpt (with its digest record), <output>/tokenizer.model and
    <output>/config.yaml, so that `xm2 validate`, `xm2 evaluate` and a decay branch
    (`xm2 fit --config <output>/config.yaml --branch_from <output>/model.ckpt
    --branch_decay_steps N`; AdamW starts fresh) work on it.

    Args:
        folder: The transformers folder: config.json, model.safetensors (or sharded, or
            pytorch_model.bin loaded with weights_only=True) and tokenizer.model.
        output: The folder to write (refused if it exists and is not empty, unless --overwrite);
            default artifacts/imported/<folder name>.
        tokenizer_path: The SentencePiece model, if the folder has no tokenizer.model.
        allow_fields: config.json fields that xm2 does not know but you know leave the math
            unchanged (unknown fields are refused otherwise).
        overwrite: Replace an existing output folder.
    """
    started = time.perf_counter()
    source = Path(folder)
    config_file = source / "config.json"
    if not config_file.is_file():
        hint = (" (it is a file: an xm2 checkpoint is exported with `xm2 export-hf`)"
                if source.is_file() else "")
        raise ConfigError(f"{source} is not a Hugging Face model folder: no config.json{hint}")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{config_file} is not valid JSON ({error})") from error
    check_supported(hf, config_file, list(allow_fields or []))
    math_ = source_math(hf, config_file)
    config = xm2_config(hf, math_, config_file)
    tokenizer = Path(tokenizer_path) if tokenizer_path else source / "tokenizer.model"
    if not tokenizer.is_file():
        raise ConfigError(f"{source} has no SentencePiece tokenizer.model, which xm2 needs; "
                          "pass it as --tokenizer_path")
    from xm2.data.tokenizer import file_digest, load_tokenizer

    pieces = load_tokenizer(tokenizer).get_piece_size()  # checks it is xm2-compatible (eos 2)
    if pieces > config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer} has {pieces} pieces, more than the model's "
                          f"vocab_size {config.vocab_size}; it is not this model's tokenizer")
    weights = xm2_weights(read_hf_weights(source), math_, config, source)
    output_dir = Path(output) if output else Path("artifacts/imported") / source.resolve().name
    staging = _prepare_output(output_dir, overwrite)
    try:
        shutil.copyfile(tokenizer, staging / "tokenizer.model")
        final_tokenizer = (output_dir / "tokenizer.model").resolve()
        run_name = f"imported-{source.resolve().name}"
        record = {"global_step": 0, "tokens_seen": None, "decay_start_step": None,
                  "tokenizer_sha256": file_digest(tokenizer),
                  "tokenizer_path": str(final_tokenizer), "run_name": run_name,
                  "imported_from": str(source.resolve()), "imported_layout": math_.naming}
        checkpoint = {
            "epoch": 0, "global_step": 0, "pytorch-lightning_version": metadata.version("lightning"),
            "state_dict": {HF_PREFIX + name: tensor for name, tensor in weights.items()},
            # No training state: a branch from here starts AdamW and its schedule fresh.
            "optimizer_states": [], "lr_schedulers": [],
            "hyper_parameters": {"architecture": config.to_dict()},
            # What the data must agree on; the rest of the data settings are the branch's own.
            "datamodule_hyper_parameters": {"vocab_size": config.vocab_size,
                                            "seq_len": config.max_seq_len,
                                            "tokenizer_path": str(final_tokenizer)},
            "MixtureDataModule": {"tokenizer_sha256": record["tokenizer_sha256"]},
            "mup": config.mup_settings(),
            "xm2": {"record": record, "imported": {"source_config": hf,
                                                    "multipliers": asdict(math_)}},
        }
        save_checkpoint_file(checkpoint, staging / "model.ckpt")
        settings = _continue_training_config(config, final_tokenizer, run_name)
        header = (f"# Continue training the model imported from {source.resolve()}, e.g.:\n"
                  f"#   xm2 fit --config {output_dir / 'config.yaml'} --branch_from "
                  f"{output_dir / 'model.ckpt'} --branch_decay_steps 100\n")
        (staging / "config.yaml").write_text(header + yaml.safe_dump(settings, sort_keys=False))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, output_dir)
    parameters = sum(t.numel() for t in weights.values())
    layout = math_.naming + (" (an xm2 export: its µP settings restored)" if math_.target else "")
    print(f"{output_dir / 'model.ckpt'}: {layout} layout, {parameters:,} parameters, "
          f"use_mup {config.use_mup}, scale_emb {config.scale_emb:g}, residual "
          f"{config.residual_scale:.6g}, m {config.width_multiplier:g}; "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return str(output_dir / "model.ckpt")
