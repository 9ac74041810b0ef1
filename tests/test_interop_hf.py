"""Hugging Face export and import: real transformers, real SentencePiece, tiny shapes."""

import gzip
import json
import math
import os
import shutil
import subprocess
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.conftest import CORPUS, ROOT
from tests.test_cli import xm2
from tests.test_errors import CONSOLE_SCRIPT, console, one_line_error
from xm2.checkpoint import save_checkpoint_file
from xm2.config import ModelConfig
from xm2.data.tokenizer import file_digest, load_tokenizer
from xm2.errors import CheckpointError, ConfigError
from xm2.eval.generate import generate_ids
from xm2.eval.load import load_checkpoint_model
from xm2.interop.hf_export import export_hf
from xm2.interop.hf_import import import_hf
from xm2.model import Decoder

# µP with m = 2 (hidden 64 over base 32), GQA, and every multiplier away from 1.
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_seq_len=32, dim_model_base=32,
                   scale_emb=12.0, scale_depth=1.4)


def tokens(seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def xm2_checkpoint(folder: Path, tokenizer_path: Path, config: ModelConfig = TINY) -> Path:
    """A checkpoint file as `xm2 fit` writes it (the parts export reads), random norm gains."""
    torch.manual_seed(0)
    model = Decoder(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # trained gains are not 1: the folds must show
                parameter.uniform_(0.5, 1.5)
    path = folder / "step=5.ckpt"
    save_checkpoint_file({
        "global_step": 5,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"architecture": config.to_dict()},
        "xm2": {"record": {"global_step": 5, "tokenizer_path": str(tokenizer_path),
                           "tokenizer_sha256": file_digest(tokenizer_path)}},
    }, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    """The tiny checkpoint and its llama and granite exports."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = xm2_checkpoint(folder, tokenizer_path)
    out = {"checkpoint": checkpoint}
    for target in ("llama", "granite"):
        out[target] = Path(export_hf(str(checkpoint), str(folder / target), target=target,
                                     verify=False))
    return out


@pytest.mark.parametrize("target", ["llama", "granite"])
def test_export_gives_xm2_logits_in_transformers(exported, target):
    xm2_model = load_checkpoint_model(exported["checkpoint"]).model
    hf_model = AutoModelForCausalLM.from_pretrained(exported[target], dtype=torch.float32)
    assert hf_model.config.model_type == target and hf_model.config.tie_word_embeddings
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    ids = tokens()
    with torch.no_grad():
        expected, got = xm2_model(ids), hf_model(input_ids=ids).logits
    assert expected.abs().max() > 1  # a model that says something, not all zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_transformers_greedy_generation_of_the_export_is_xm2s(exported):
    """transformers' own generate (its KV cache, its positions) continues as `xm2 generate` does."""
    xm2_model = load_checkpoint_model(exported["checkpoint"]).model
    hf_model = AutoModelForCausalLM.from_pretrained(exported["llama"], dtype=torch.float32)
    prompts = tokens(6)[:, :8].tolist()
    expected = generate_ids(xm2_model, prompts, max_new_tokens=20, eos_id=None)
    with torch.no_grad():
        got = hf_model.generate(torch.tensor(prompts), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, 8:]
    assert got.tolist() == expected


def test_export_leaves_no_multiplier_on_the_llama_side(exported):
    """The Llama export is µP-free: its multipliers live in the weights and ε (api-notes §2.4)."""
    config = json.loads((exported["llama"] / "config.json").read_text())
    assert config["rms_norm_eps"] == pytest.approx(TINY.norm_eps / TINY.scale_emb**2)
    assert not {"embedding_multiplier", "logits_scaling", "scale_emb"} & set(config)
    granite = json.loads((exported["granite"] / "config.json").read_text())
    assert granite["logits_scaling"] == 2.0 and granite["embedding_multiplier"] == 12.0
    assert granite["residual_multiplier"] == pytest.approx(1.4 / math.sqrt(2))


def corpus_samples(limit: int = 40) -> list[str]:
    texts = []
    for source in ("prose", "code", "docs", "instruct_math"):
        with gzip.open(CORPUS / source / "val.jsonl.gz", "rt") as file:
            texts += [json.loads(line)["text"][:2000] for line in islice(file, limit)]
    return texts + [" leading space", "  two", "x\n\n\ty", "trailing  ", "数字 123 ünï 😀", "",
                    "<s> literal </s> <unk>", " " * 40 + "deep = 1"]


def test_exported_tokenizer_encodes_xm2_ids_and_the_fast_one_decodes_them(exported,
                                                                          tokenizer_path):
    processor = load_tokenizer(tokenizer_path)
    hf_tokenizer = AutoTokenizer.from_pretrained(exported["llama"])
    fast = PreTrainedTokenizerFast.from_pretrained(exported["llama"])
    for text in corpus_samples():
        expected = processor.encode(text)
        assert hf_tokenizer(text)["input_ids"] == expected, text[:80]
        assert hf_tokenizer.encode(text, add_special_tokens=False) == expected
        assert fast.decode(expected) == processor.decode(expected), text[:80]
    assert hf_tokenizer.eos_token_id == fast.eos_token_id == 2
    assert hf_tokenizer.bos_token_id == fast.bos_token_id == 1


# --- import -------------------------------------------------------------------------------


def reference_logits(weights: dict, hf: dict, ids: torch.Tensor) -> torch.Tensor:
    """MiniCPM's / Xmodel-2.5's forward pass written out from their modelling code (recipe.md
    §2.1-2.2), independent of xm2: embedding × input scale, branch × scale/√L, logits × out/m,
    attention 1/√d (MiniCPM) or 1/d (Xmodel-2.5 under use_mup)."""
    L, H = hf["num_hidden_layers"], hf["hidden_size"]
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    d, eps = H // heads, hf["rms_norm_eps"]
    if "scale_emb" in hf:
        s, attn_res = hf["scale_emb"], hf["scale_depth"] / math.sqrt(L)
        mlp_res, out, score = attn_res, 1 / (H / hf["dim_model_base"]), d**-0.5
    else:
        s, out, score = hf["mup_input_scale"], hf["mup_output_scale"] / (H / hf["mup_base_width"]), 1 / d
        attn_res = hf["mup_attention_residual_scale"] / math.sqrt(L)
        mlp_res = hf["mup_ffn_residual_scale"] / math.sqrt(L)
    w = {k: v.double() for k, v in weights.items()}

    def norm(x, gain):
        return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x):
        seq = x.shape[-2]
        inv = 1.0 / hf["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv).repeat(1, 2)
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * angles.cos() + half * angles.sin()

    b, t = ids.shape
    h = w["model.embed_tokens.weight"][ids] * s
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, t, heads, d).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, t, kv, d).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, t, kv, d).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        attention = torch.softmax(q @ k.transpose(-1, -2) * score + mask, -1) @ v
        h = h + attn_res * (attention.transpose(1, 2).reshape(b, t, H) @ w[p + "self_attn.o_proj.weight"].T)
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + mlp_res * (mlp @ w[p + "mlp.down_proj.weight"].T)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return (norm(h, w["model.norm.weight"]) @ head.T * out).float()


MINICPM = {"model_type": "minicpm", "architectures": ["MiniCPMForCausalLM"], "vocab_size": 512,
           "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": True, "initializer_range": 0.1, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "bfloat16",
           "scale_emb": 12, "dim_model_base": 16, "scale_depth": 1.4}
XMODEL = {**{k: v for k, v in MINICPM.items() if k not in ("scale_emb", "dim_model_base",
                                                            "scale_depth")},
          "model_type": "xmodel", "use_mup": True, "mup_input_scale": 12.0,
          "mup_output_scale": 0.5, "mup_attention_residual_scale": 1.4,
          "mup_ffn_residual_scale": 2.0, "mup_base_width": 16}


def hf_folder(folder: Path, config: dict, tokenizer_path: Path, head: bool = False,
              weights_format: str = "safetensors", seed: int = 0) -> tuple[Path, dict]:
    """A transformers folder of the Xmodel-2 / MiniCPM layout with random weights."""
    generator = torch.Generator().manual_seed(seed)
    H, inter, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * H // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], H), "model.norm.weight": (H,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                   p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                   p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                   p + "mlp.down_proj.weight": (H, inter), p + "input_layernorm.weight": (H,),
                   p + "post_attention_layernorm.weight": (H,)}
    weights = {name: (torch.rand(shape, generator=generator) + 0.5 if len(shape) == 1 else
                      torch.randn(shape, generator=generator) * 0.1) for name, shape in shapes.items()}
    if head:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    if weights_format == "safetensors":
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif weights_format == "sharded":  # transformers' layout above its max_shard_size
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: weights[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return folder, weights


@pytest.mark.parametrize("layout,head,weights_format", [
    ("minicpm", False, "sharded"), ("minicpm", True, "bin"),
    ("xmodel", True, "safetensors"), ("xmodel", False, "bin")])
def test_import_gives_the_layouts_logits(tmp_path, tokenizer_path, layout, head, weights_format):
    config = MINICPM if layout == "minicpm" else XMODEL
    folder, weights = hf_folder(tmp_path / "hf", config, tokenizer_path, head, weights_format)
    checkpoint = import_hf(str(folder), str(tmp_path / "xm2"))
    loaded = load_checkpoint_model(checkpoint)
    assert loaded.config.use_mup and loaded.config.width_multiplier == 4.0  # 64 / 16
    assert loaded.config.scale_emb == 12.0
    assert loaded.record["tokenizer_sha256"] == file_digest(tokenizer_path)
    ids = tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), reference_logits(weights, config, ids),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["llama", "granite"])
def test_round_trip_keeps_logits_and_mup_settings(exported, tmp_path, target):
    original = load_checkpoint_model(exported["checkpoint"])
    back = load_checkpoint_model(import_hf(str(exported[target]), str(tmp_path / "back")))
    # The µP settings come back too (the fold undone), so continued training scales as before.
    assert back.config == original.config
    ids = tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), original.model(ids), atol=1e-5, rtol=1e-5)


def test_plain_llama_imports_as_standard_parametrization(tmp_path, tokenizer_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    loaded = load_checkpoint_model(import_hf(str(tmp_path / "llama"), str(tmp_path / "xm2")))
    assert not loaded.config.use_mup and loaded.config.scale_emb == 1.0
    assert loaded.config.residual_scale == 1.0 and loaded.config.rope_theta == 10000.0
    ids = tokens(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), llama(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_granite_imports_with_its_multipliers_folded_where_xm2_has_none(tmp_path, tokenizer_path):
    """A Granite model (not an xm2 export): an attention multiplier other than 1/√head_dim and a
    logits scale whose base width is not an integer both go into the weights."""
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, tie_word_embeddings=True,
                           embedding_multiplier=12.0, residual_multiplier=0.22,
                           attention_multiplier=0.05, logits_scaling=3.0)
    granite = GraniteForCausalLM(config).eval()
    granite.save_pretrained(tmp_path / "granite")
    (tmp_path / "granite" / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    loaded = load_checkpoint_model(import_hf(str(tmp_path / "granite"), str(tmp_path / "xm2")))
    assert loaded.config.scale_emb == 12.0 and loaded.config.residual_scale == pytest.approx(0.22)
    ids = tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), granite(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"tie_word_embeddings": False, "untie": True}, "untied embeddings"),
    ({"qk_layernorm": True}, "fields xm2 does not know: qk_layernorm"),
    ({"scale_depth": None}, "scale_depth"),
    ({"use_mup": True, "mup_input_scale": 12.0, "mup_attention_residual_scale": 1.4,
      "mup_ffn_residual_scale": 1.4, "mup_base_width": 16}, "several namings"),
])
def test_import_refuses_math_it_cannot_represent(tmp_path, tokenizer_path, change, message):
    change = dict(change)
    untie = change.pop("untie", False)
    config = {k: v for k, v in {**MINICPM, **change}.items() if v is not None}
    folder, weights = hf_folder(tmp_path / "hf", config, tokenizer_path)
    if untie:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 2
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=message):
        import_hf(str(folder), str(tmp_path / "xm2"))
    assert not (tmp_path / "xm2").exists()


def test_import_takes_unknown_fields_the_user_vouches_for(tmp_path, tokenizer_path):
    folder, _ = hf_folder(tmp_path / "hf", {**MINICPM, "my_note": "x"}, tokenizer_path)
    with pytest.raises(ConfigError, match="--allow_fields"):
        import_hf(str(folder), str(tmp_path / "xm2"))
    import_hf(str(folder), str(tmp_path / "xm2"), allow_fields=["my_note"])


def test_bad_inputs_are_refused_by_name(tmp_path, exported, tokenizer_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        export_hf(str(junk), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="is a Hugging Face folder"):
        export_hf(str(exported["llama"]), str(tmp_path / "out"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_hf(str(exported["checkpoint"]), str(busy), verify=False)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no config.json"):
        import_hf(str(exported["checkpoint"]), str(tmp_path / "out"))
    folder, _ = hf_folder(tmp_path / "hf", MINICPM, tokenizer_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="tokenizer.model.*--tokenizer_path"):
        import_hf(str(folder), str(tmp_path / "out"))
    (folder / "model.safetensors").unlink()
    torch.save({"weights": torch.ones(2), "code": object()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as refused:
        import_hf(str(folder), str(tmp_path / "out"), tokenizer_path=str(tokenizer_path))
    assert str(refused.value) == (
        f"weights file {folder / 'pytorch_model.bin'} holds objects other than tensors and plain "
        "data (such as object), which can run code when loaded; xm2 does not load "
        "such files")


def read_only_mount_command(folder: Path, *command: str) -> list[str] | None:
    """``command`` in a private mount namespace where ``folder`` is an empty read-only tmpfs, or
    None where this process may not mount (chmod does not stop root, the tests' usual user)."""
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(folder)]
    if shutil.which("unshare") is None or subprocess.run(
            [*wrapper, "true"], capture_output=True).returncode != 0:
        return None
    return [*wrapper, *command]


def test_an_export_to_a_read_only_filesystem_is_one_line_naming_the_folder(exported, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    command = read_only_mount_command(read_only, str(CONSOLE_SCRIPT), "export-hf",
                                      str(exported["checkpoint"]), "--output",
                                      str(read_only / "export"), "--verify", "false")
    if command is None:
        pytest.skip("cannot mount a read-only filesystem here (needs unshare and mount rights)")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert one_line_error(result) == (
        f"xm2: error: cannot write the output folder {read_only / 'export'}: Read-only file "
        f"system ({read_only / '.export.partial'}); nothing was written there; give --output a "
        "folder on a filesystem you can write")


def test_an_export_under_a_file_is_one_line_naming_the_folder(exported, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "export"
    line = one_line_error(console("export-hf", str(exported["checkpoint"]), "--output",
                                  str(output), "--verify", "false", cwd=tmp_path))
    assert line == (f"xm2: error: cannot write the output folder {output}: Not a directory "
                    f"({blocker / '.export.partial'}); nothing was written there; a part of its "
                    "path is a file: give --output a folder")


@pytest.mark.slow
def test_decay_branch_from_an_imported_model_trains_with_fresh_adamw(tmp_path, tokenizer_path,
                                                                    shards):
    folder, _ = hf_folder(tmp_path / "hf", MINICPM, tokenizer_path)
    result = xm2("import-hf", str(folder), "--output", str(tmp_path / "xm2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint, config = tmp_path / "xm2" / "model.ckpt", tmp_path / "xm2" / "config.yaml"
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        "trainer:\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  val_check_interval: 3\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true}\n"
        "data:\n  batch_size: 2\n  val_batches_per_source: 1\n")
    common = ["--config", str(config), "--config", str(quick),
              "--data.corpus_dir", str(CORPUS), "--data.shards_dir", str(shards.parent),
              "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
              "--trainer.default_root_dir", str(tmp_path / "runs")]
    resumed = xm2("fit", *common, "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert resumed.returncode == 1 and "no training state to resume" in resumed.stderr
    branch = xm2("fit", *common, "--branch_from", str(checkpoint), "--branch_decay_steps", "3",
                 cwd=tmp_path)
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert "AdamW starts fresh" in branch.stderr
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3
