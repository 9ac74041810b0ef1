"""One training-throughput measurement of a plain PyTorch loop: xm2's decoder or transformers' Llama.

    .venv/bin/python benchmarks/perf_loop.py --impl raw --size nano --dtype bf16 [--compile model]
    .venv/bin/python benchmarks/perf_loop.py --impl hf --size tiny --dtype fp32 --profile out.txt

The loop is what a user would write without xm2: real mixture batches from the recipe's shards,
the model, fp32 cross-entropy, backward, gradient clipping at 1.0, AdamW with xm2's settings and
the WSD schedule, ``zero_grad(set_to_none=True)``. ``--impl raw`` trains xm2's ``Decoder`` with
xm2's µP parameter groups (:func:`xm2.optimizer.build_adamw`); ``--impl hf`` trains
``transformers.LlamaForCausalLM`` of the same shape (tied embeddings, SDPA attention, no biases)
with an AdamW of the same settings. Prints one JSON line (``perf_suite.py`` runs this in a fresh
process per measurement and reads it): tokens/s over the timed steps (data fetch included, as in
``xm2 fit``), the median step, peak resident memory, seconds from process start to the first
step, the first step's own seconds (with ``--compile``: the compilation) and the final loss. ``--profile`` writes a ``torch.profiler`` table of two steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

STARTED = time.time()  # before torch is imported: start-up includes the imports

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH_ROWS = {"nano": 16, "tiny": 4}
"""Rows per batch of each preset: nano as the recipe trains it (16 × 256 tokens); tiny at 4 × 512
tokens so that a step takes seconds, not tens of seconds, on 2 cores."""


def architecture(size: str):
    """The preset's ModelConfig with the recipe's µP settings (config/nano.yaml)."""
    from xm2.config import ModelConfig

    recipe = yaml.safe_load((ROOT / "config" / "nano.yaml").read_text())
    preset = yaml.safe_load((ROOT / "config" / "model" / f"{size}.yaml").read_text())
    return ModelConfig(**{**recipe["model"]["architecture"], **preset["model"]["architecture"]})


def batches(config, batch_size: int, seed: int = 0):
    """The recipe's stable mixture from the tokenized shards, as ``xm2 fit`` streams it."""
    from xm2.data.datamodule import DEFAULT_STABLE
    from xm2.data.mixture import MixtureBatches, PackedRows
    from xm2.data.shards import open_shard, shard_dir
    from xm2.data.tokenizer import default_tokenizer_path

    directory = shard_dir(ROOT / "artifacts" / "shards", ROOT / default_tokenizer_path(config.vocab_size))
    rows = {name: PackedRows(open_shard(directory, name, "train", check=False), config.max_seq_len,
                             name) for name in DEFAULT_STABLE}
    return iter(MixtureBatches(rows, DEFAULT_STABLE, DEFAULT_STABLE, batch_size, 10**9, seed=seed))


def llama(config):
    """transformers' LlamaForCausalLM with xm2's shape: same parameter count, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, use_cache=False, attention_bias=False, mlp_bias=False)
    hf_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_config)


def adamw_like_xm2(model: torch.nn.Module, reference: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """AdamW over ``model`` with the settings (and implementation flags) of xm2's optimizer."""
    defaults = {key: reference.defaults[key] for key in
                ("lr", "betas", "eps", "weight_decay", "foreach", "fused") if key in reference.defaults}
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}],
                             **defaults)


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "model":
        return torch.compile(model)
    if mode == "blocks":
        layers = model.layers if hasattr(model, "layers") else model.model.layers
        for block in layers:
            block.compile()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["raw", "hf"], default="raw")
    parser.add_argument("--size", choices=list(BATCH_ROWS), default="nano")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", choices=["none", "model", "blocks"], default="none")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", default=None, help="write a torch.profiler table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from xm2.optimizer import OptimizerConfig, build_adamw
    from xm2.schedule import WSDSchedule

    torch.manual_seed(0)
    config = architecture(args.size)
    batch_size = args.batch_size or BATCH_ROWS[args.size]
    stream = batches(config, batch_size)
    from xm2.model import Decoder

    xm2_model = Decoder(config)
    xm2_optimizer = build_adamw(xm2_model, config, OptimizerConfig())
    if args.impl == "raw":
        model, optimizer = xm2_model, xm2_optimizer

        def logits_of(inputs):
            return model(inputs)
    else:
        model = llama(config)
        optimizer = adamw_like_xm2(model, xm2_optimizer)
        del xm2_model, xm2_optimizer

        def logits_of(inputs):
            return model(input_ids=inputs).logits
    model.train()
    parameters = list(model.parameters())
    model = compile_model(model, args.compile)
    total_steps = args.warmup + args.steps
    # Warmup, stable and decay inside the measured run, as a real one has them.
    schedule = WSDSchedule(warmup_steps=1, decay_start_step=total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.lr_factor(step, total_steps + 2))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> float:
        tokens = next(stream)["tokens"]
        with autocast:
            logits = logits_of(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first_step = None
    times, all_times = [], []
    for index in range(total_steps):
        start = time.perf_counter()
        if first_step is None:
            first_step = time.time() - STARTED
        loss = step()
        all_times.append(time.perf_counter() - start)
        if index >= args.warmup:
            times.append(all_times[-1])
    tokens_per_step = batch_size * config.max_seq_len
    result = {
        "impl": args.impl, "size": args.size, "dtype": args.dtype, "compile": args.compile,
        "batch_size": batch_size, "seq_len": config.max_seq_len, "steps": len(times),
        "tokens_per_s": tokens_per_step * len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "startup_s": first_step, "first_step_s": all_times[0], "loss": loss, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in parameters),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
            step()
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(args.profile).write_text(table)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
