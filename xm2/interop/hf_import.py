"""Import a Hugging Face ``transformers`` folder as an xm2 checkpoint, with the same logits.

Reads the Xmodel-2 / MiniCPM layout (``scale_emb``/``dim_model_base``/``scale_depth``, or
Xmodel-2.5's ``mup_*``), Granite, a plain Llama (multipliers 1, standard parametrization) or an
xm2 export (the fold undone from the ``xm2`` record in its config.json). A source multiplier xm2
has no field for is folded into the weights exactly (``xm2.interop.hf_folding``); a setting that
changes the math and cannot be represented is refused by name.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
import yaml

from xm2.checkpoint import load_weights_only, save_checkpoint_file
from xm2.config import ModelConfig
from xm2.errors import CheckpointError, ConfigError
from xm2.interop.hf_folding import HF_PREFIX, SourceMath, xm2_weights
from xm2.interop.output_folder import written_whole
from xm2.presets import preset

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
        return load_weights_only(path, what=f"weights file {path}")
    except CheckpointError:
        raise  # holds more than tensors: refused, never retried without weights_only
    except Exception as error:
        raise ConfigError(f"weights file {path} cannot be read ({type(error).__name__}: "
                          f"{str(error).splitlines()[0]}); it is truncated or not a torch "
                          "file") from error


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
    recipe = preset("nano.yaml")
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
    with written_whole(output_dir, overwrite) as staging:
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
    parameters = sum(t.numel() for t in weights.values())
    layout = math_.naming + (" (an xm2 export: its µP settings restored)" if math_.target else "")
    print(f"{output_dir / 'model.ckpt'}: {layout} layout, {parameters:,} parameters, "
          f"use_mup {config.use_mup}, scale_emb {config.scale_emb:g}, residual "
          f"{config.residual_scale:.6g}, m {config.width_multiplier:g}; "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return str(output_dir / "model.ckpt")
