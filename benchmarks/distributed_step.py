"""One process against two (DDP, FSDP2) on the same global batch: loss difference and step time.

    .venv/bin/python benchmarks/distributed_step.py --tokenizer_path <unigram-512.model> \
        --shards_dir <shards root> [--steps 8] [--batch_size 8]

Runs tests/distributed_run.py (real Lightning strategies, gloo on CPU) with the nano architecture
(vocab 512, the test tokenizer's) in fp32: one process accumulating two micro-batches per step,
then DDP and FSDP2 on two processes with one micro-batch each, which are the same micro-batches.
Prints the largest per-micro-batch loss difference against one process, the median time per
micro-batch (step time on two processes) after the first two steps, and the whole fit time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"single": ["--strategy", "single", "--accumulate", "2"],
        "ddp": ["--strategy", "ddp", "--devices", "2"],
        "fsdp2": ["--strategy", "fsdp2", "--devices", "2"],
        "fsdp2 + bf16 params": ["--strategy", "fsdp2", "--devices", "2",
                                "--mixed_precision", "bf16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--shards_dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in RUNS.items():
            out = Path(scratch) / name.replace(" ", "_")
            subprocess.run(
                [sys.executable, str(ROOT / "tests" / "distributed_run.py"), "--architecture",
                 "nano", "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                 "--val_every", str(args.steps), "--clip", "1.0",
                 "--tokenizer_path", args.tokenizer_path,
                 "--shards_dir", args.shards_dir, "--out", str(out), *extra],
                check=True, env=env, capture_output=True)
            results[name] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    single = results["single"][0]
    skip = 2 * 2  # the first two steps (two micro-batches each) warm up
    single_micro = statistics.median(single["step_seconds"][skip:])
    print(f"nano (vocab 512), {args.batch_size} × 256 tokens per micro-batch, {args.steps} steps, "
          "fp32 unless noted, 1 thread per process")
    print("| run | max loss diff vs 1 process | s per micro-batch | s per step | fit s |")
    print("|---|---|---|---|---|")
    print(f"| 1 process, 2 micro-batches per step | 0 | {single_micro:.3f} | "
          f"{2 * single_micro:.3f} | {single['seconds']:.1f} |")
    for name in list(RUNS)[1:]:
        ranks = results[name]
        diff = max(abs(ranks[r]["steps"][k]["losses"][0] - single["steps"][k]["losses"][r])
                   for r in (0, 1) for k in single["steps"])
        step = statistics.median(ranks[0]["step_seconds"][skip // 2:])
        print(f"| 2 processes, {name} | {diff:.2e} | {step:.3f} | {step:.3f} | "
              f"{ranks[0]['seconds']:.1f} |")


if __name__ == "__main__":
    main()
