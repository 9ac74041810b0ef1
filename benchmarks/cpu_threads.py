"""Seconds per training step of the nano decoder on CPU at a given number of torch threads.

On a CPU shared with other jobs (or other wind-tunnel workers), threads beyond a process's share
of the cores wait on each other; compare the same step at 1 thread and at the default:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_threads.py
    .venv/bin/python benchmarks/cpu_threads.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from xm2.config import ModelConfig
from xm2.model import Decoder
from xm2.optimizer import OptimizerConfig, build_adamw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    arguments = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(max_seq_len=arguments.seq_len)  # the nano preset
    model = Decoder(config)
    adamw = build_adamw(model, config, OptimizerConfig())
    tokens = torch.randint(0, config.vocab_size, (arguments.batch_size, arguments.seq_len + 1))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arguments.precision == "bf16"):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        adamw.step()

    step()  # the first step allocates AdamW's state
    started = time.perf_counter()
    for _ in range(arguments.steps):
        step()
    seconds = (time.perf_counter() - started) / arguments.steps
    print(f"nano, {arguments.batch_size} × {arguments.seq_len} tokens, {arguments.precision}, "
          f"{torch.get_num_threads()} thread(s): {seconds:.3f} s per step")


if __name__ == "__main__":
    main()
