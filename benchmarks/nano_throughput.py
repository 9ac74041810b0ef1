"""Training and evaluation throughput of the nano recipe on this machine.

    .venv/bin/python benchmarks/nano_throughput.py [--steps 10] [--threads 2]

Times the LightningModule's loss + backward + AdamW step on real mixture batches (batch 16 ×
256 tokens, vocab 4096) in bf16 autocast and fp32, and a no-grad validation batch, and prints the
median seconds per step and tokens per second. Needs the nano tokenizer and shards, which
`make train` (or `xm2 fit --config config/nano.yaml`) creates.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xm2.data.datamodule import DEFAULT_STABLE
from xm2.data.mixture import MixtureBatches, PackedRows
from xm2.data.shards import open_shard, shard_dir
from xm2.module import Xm2Module
from xm2.optimizer import OptimizerConfig, build_adamw

BATCH, SEQ_LEN = 16, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", default="artifacts/tokenizers/unigram-4096.model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    directory = shard_dir("artifacts/shards", args.tokenizer)
    rows = {name: PackedRows(open_shard(directory, name, "train"), SEQ_LEN, name)
            for name in DEFAULT_STABLE}
    stream = iter(MixtureBatches(rows, DEFAULT_STABLE, DEFAULT_STABLE, BATCH, 10**9, seed=0))
    module = Xm2Module()
    optimizer = build_adamw(module.model, module.architecture, OptimizerConfig())
    tokens_per_step = BATCH * SEQ_LEN

    for precision in ("bf16", "fp32"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        train_times, eval_times = [], []
        for step in range(args.steps + 2):  # the first two steps warm up allocators and kernels
            tokens = next(stream)["tokens"]
            start = time.perf_counter()
            with autocast:
                loss = module.loss(tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                train_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad(), autocast:
                module.loss(next(stream)["tokens"])
            if step >= 2:
                eval_times.append(time.perf_counter() - start)
        train, evaluate = statistics.median(train_times), statistics.median(eval_times)
        print(f"{precision}: train {train:.3f} s/step ({tokens_per_step / train:,.0f} tok/s), "
              f"eval {evaluate:.3f} s/batch ({tokens_per_step / evaluate:,.0f} tok/s)")


if __name__ == "__main__":
    main()
