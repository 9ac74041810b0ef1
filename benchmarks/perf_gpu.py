"""Training throughput and MFU of the nano, tiny and 1.2B presets on one GPU, against HF Llama.

    PYTHONPATH=. python benchmarks/perf_gpu.py --out artifacts/benchmarks/gpu.json [--budget_s 420]

Needs only torch (and transformers for the comparison rows): it runs on a bare GPU machine
without the rest of xm2's dependencies. Each case is the step `xm2 fit` takes with
``precision: bf16-mixed``: the µP decoder with fp32 master weights under bf16 autocast, the fp32
cross-entropy, gradient clipping at 1.0 and AdamW over the µP parameter groups, on random tokens
(the data pipeline is measured on CPU by benchmarks/perf_suite.py). Rows:

- ``xm2`` eager, ``xm2 compiled`` (each decoder block ``torch.compile``d, as
  ``model.parallel.compile: true`` does), ``xm2 compiled model`` (the whole model and its loss
  compiled as one graph), and ``hf llama``: transformers' LlamaForCausalLM of the
  same shape (SDPA attention, tied embeddings), same dtype policy and optimizer;
- tokens/s (median over the timed steps), MFU against the dense bf16 datasheet peak of the card
  and against a measured 8192³ bf16 matmul, peak memory against xm2's own estimate
  (``xm2 memory``), and the seconds to the first step (model build, compile).

Cases run in order of size and are skipped once ``--budget_s`` is spent; the JSON is rewritten
after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xm2 import mup
from xm2.analysis.flops import flops_per_token
from xm2.config import ModelConfig
from xm2.memory import estimate
from xm2.model import Decoder

# Dense bf16 tensor-core peaks (datasheets; without sparsity), by the name torch reports.
DATASHEET_BF16 = {"H100 80GB HBM3": 989.4e12, "H100": 989.4e12, "H200": 989.4e12,
                  "A100": 312e12}

PRESETS = {
    "nano": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=640, num_layers=8,
                        num_heads=4, num_kv_heads=1, max_seq_len=256),
    "tiny": ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1280, num_layers=18,
                        num_heads=8, num_kv_heads=4, max_seq_len=512),
    "xmodel2-1.2b": ModelConfig(vocab_size=65280, hidden_size=1536, intermediate_size=3840,
                                num_layers=48, num_heads=24, num_kv_heads=8, max_seq_len=4096),
}
# (preset, micro-batch): tokens per step 64×256, 32×512 and 2×4096.
CASES = [("nano", 64), ("tiny", 32), ("xmodel2-1.2b", 2)]


def datasheet_peak(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def measured_matmul_peak(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def hf_llama(config: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(hf_config)


def run_case(preset: str, batch: int, kind: str, device: torch.device, steps: int,
             warmup: int, profile_path: Path | None = None) -> dict:
    config = PRESETS[preset]
    seq = config.max_seq_len
    begin = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = hf_llama(config) if kind == "hf llama" else Decoder(config)
    if kind == "hf llama":
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]

        def logits_of(tokens):
            return model(input_ids=tokens).logits
    else:
        groups = mup.param_groups(model.named_parameters(), config, 0.01, 0.1)
        if kind == "xm2 compiled":
            for block in model.layers:
                block.compile()

        def logits_of(tokens):
            return model(tokens)
        if kind == "xm2 compiled model":
            logits_of = torch.compile(logits_of)
    optimizer = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.95), eps=1e-8, fused=True)
    data = torch.randint(0, config.vocab_size, (warmup + steps, batch, seq + 1), device=device)

    def step(tokens: torch.Tensor) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = logits_of(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        loss = step(data[i])
        if i == 0:
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - begin
    torch.cuda.synchronize()
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        loss = step(data[i])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    profile = None
    if profile_path is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(data[-1])
            torch.cuda.synchronize()
        profile = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        profile_path.write_text(profile)
    step_s = statistics.median(times)
    tokens = batch * seq
    expected = estimate(config, batch, seq, "bf16-mixed", 1, "single")
    return {
        "preset": preset, "kind": kind, "batch": batch, "seq_len": seq, "tokens_per_step": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s": step_s, "tokens_per_s": tokens / step_s,
        "model_flops_per_s": flops_per_token(config, seq) * tokens / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "estimated_memory_gib": expected.total / 2**30,
        "first_step_s": first_step_s, "final_loss": float(loss.detach()),
        "finite": bool(math.isfinite(float(loss))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="artifacts/benchmarks/gpu.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument("--kinds", default="xm2,hf llama,xm2 compiled")
    parser.add_argument("--cases", default=",".join(f"{p}:{b}" for p, b in CASES),
                        help="preset:micro-batch pairs")
    parser.add_argument("--profile", default=None,
                        help="preset:batch:kind to profile one step of (a table beside --out)")
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    started = time.perf_counter()
    report = {"device": name, "torch": torch.__version__,
              "datasheet_bf16_flops": datasheet_peak(name),
              "measured_bf16_matmul_flops": measured_matmul_peak(device), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}, torch {torch.__version__}: bf16 matmul "
          f"{report['measured_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s measured, datasheet "
          f"{(report['datasheet_bf16_flops'] or float('nan')) / 1e12:.0f}", flush=True)
    for preset, batch in cases:
        for kind in args.kinds.split(","):
            if time.perf_counter() - started > args.budget_s:
                print(f"skipped {preset} {kind}: budget spent", flush=True)
                continue
            try:
                profiled = args.profile == f"{preset}:{batch}:{kind}"
                row = run_case(preset, batch, kind, device, args.steps, args.warmup,
                               out.with_name(f"profile-{preset}-{batch}.txt") if profiled else None)
            except Exception as error:  # one failing case must not cost the others
                row = {"preset": preset, "kind": kind, "error": f"{type(error).__name__}: {error}"[:500]}
            peak = report["datasheet_bf16_flops"]
            if "tokens_per_s" in row:
                row["mfu_datasheet"] = row["model_flops_per_s"] / peak if peak else None
                row["mfu_measured"] = row["model_flops_per_s"] / report["measured_bf16_matmul_flops"]
                print(f"{preset:>13} {kind:>13}: {row['tokens_per_s']:>10,.0f} tok/s, "
                      f"MFU {row['mfu_datasheet'] or float('nan'):.1%} (of measured "
                      f"{row['mfu_measured']:.1%}), {row['peak_memory_gib']:.1f} GiB "
                      f"(estimate {row['estimated_memory_gib']:.1f}), first step "
                      f"{row['first_step_s']:.1f} s, loss {row['final_loss']:.3f}", flush=True)
            else:
                print(f"{preset:>13} {kind:>13}: {row['error']}", flush=True)
            report["rows"].append(row)
            out.write_text(json.dumps(report, indent=2))
            gc.collect()
            torch.cuda.empty_cache()
    report["elapsed_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
