"""Where a training step's time goes: ``torch.profiler`` of xm2's decoder beside transformers'
Llama of the same shape (and, with ``--baseline REV``, beside xm2's decoder at another revision).

    .venv/bin/python benchmarks/perf_profile.py --size nano --dtype bf16 [--baseline 1c1ac36]

One process builds every model with the same data, AdamW settings and clipping as
benchmarks/perf_loop.py, runs a warm-up step of each, then profiles ``--steps`` steps of each in
turn (so machine load falls on all alike) and prints the self CPU time per step by category
(matrix products, attention kernels, softmax/cross-entropy, elementwise, casts and copies, AdamW
and clipping) and of the operators that differ most.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_loop import BATCH_ROWS, ROOT, adamw_like_xm2, architecture, llama  # noqa: E402

from xm2.optimizer import OptimizerConfig, build_adamw  # noqa: E402

CATEGORIES = [
    ("matrix products", ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::matmul")),
    ("attention kernel", ("scaled_dot_product",)),
    ("softmax, cross-entropy", ("softmax", "nll_loss")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::fill_",
                          "aten::zero_", "aten::clone", "aten::contiguous")),
    ("AdamW and clipping", ("lerp", "addcmul", "addcdiv", "sqrt", "linalg_vector_norm",
                            "_foreach", "Optimizer")),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::silu", "aten::pow",
                     "aten::neg", "aten::rsqrt", "aten::mean", "aten::sum", "aten::masked_fill",
                     "aten::sub", "aten::exp")),
]


def category(op: str) -> str:
    for name, keys in CATEGORIES:
        if any(key in op for key in keys):
            return name
    return "other"


def decoder_of_revision(revision: str):
    """xm2.model.Decoder as it was at ``revision`` (its model.py, imported under another name)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:xm2/model.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="xm2-perf-profile-")) / f"model_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.Decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(BATCH_ROWS), default="nano")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--baseline", default=None, metavar="REV")
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()

    from xm2.model import Decoder

    torch.manual_seed(0)
    config = architecture(args.size)
    models = {}
    xm2_model = Decoder(config)
    xm2_optimizer = build_adamw(xm2_model, config, OptimizerConfig())
    models["xm2"] = (xm2_model, xm2_optimizer, lambda m, t: m(t))
    if args.baseline:
        base = decoder_of_revision(args.baseline)(config)
        base.load_state_dict(xm2_model.state_dict())
        models[f"xm2@{args.baseline}"] = (base, build_adamw(base, config, OptimizerConfig()),
                                          lambda m, t: m(t))
    hf = llama(config)
    models["transformers"] = (hf, adamw_like_xm2(hf, xm2_optimizer),
                              lambda m, t: m(input_ids=t).logits)
    tokens = torch.randint(0, config.vocab_size, (BATCH_ROWS[args.size], config.max_seq_len + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(name: str) -> None:
        model, optimizer, forward = models[name]
        with record_function("phase: forward"), autocast:
            logits = forward(model, tokens[:, :-1])
        with record_function("phase: loss"):
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: clipping and AdamW"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for name in models:
        step(name)  # AdamW state, kernel selection
    per_op = {name: {} for name in models}
    phases = {name: {} for name in models}
    for _ in range(args.steps):
        for name in models:
            with profile() as profiler:
                step(name)
            for event in profiler.key_averages():
                if event.key.startswith("phase: "):
                    # Wall time of the phase (the backward runs on autograd's own thread, so its
                    # operators are not inside the annotation; the annotation's time still is).
                    table, value = phases[name], event.cpu_time_total
                else:
                    table, value = per_op[name], event.self_cpu_time_total
                table[event.key] = table.get(event.key, 0.0) + value / 1e3 / args.steps

    names = list(models)
    width = max(len(n) for n in names) + 2
    print(f"{args.size} {args.dtype}, {BATCH_ROWS[args.size]}x{config.max_seq_len} tokens, "
          f"{torch.get_num_threads()} threads: self CPU ms per training step")
    print("| category | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    categories = [c for c, _ in CATEGORIES] + ["other"]
    totals = {n: {c: 0.0 for c in categories} for n in names}
    for name in names:
        for op, ms in per_op[name].items():
            totals[name][category(op)] += ms
    for c in categories:
        print(f"| {c} | " + " | ".join(f"{totals[n][c]:.0f}" for n in names) + " |")
    print("| **total** | " + " | ".join(f"**{sum(totals[n].values()):.0f}**" for n in names)
          + " |")
    print()
    ops = sorted(set().union(*per_op.values()),
                 key=lambda op: -max(per_op[n].get(op, 0.0) for n in names))[:args.top]
    print("| phase (wall ms) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for phase in phases[names[0]]:
        print(f"| {phase.removeprefix('phase: ')} | "
              + " | ".join(f"{phases[n].get(phase, 0.0):.0f}" for n in names) + " |")
    print()
    print(f"{'operator':58}" + "".join(f"{n:>{width}}" for n in names))
    for op in ops:
        print(f"{op[:58]:58}" + "".join(f"{per_op[n].get(op, 0.0):>{width}.1f}" for n in names))


if __name__ == "__main__":
    main()
