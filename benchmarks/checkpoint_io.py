"""What trusted checkpoints cost: Lightning's save against xm2's atomic, digested save and check.

    .venv/bin/python benchmarks/checkpoint_io.py [--sizes_mb 75 600] [--repeats 3]

For each size, a checkpoint of that many MB of fp32 tensors is saved with Lightning's
``TorchCheckpointIO`` and with ``xm2.checkpoint.VerifiedCheckpointIO`` (write beside the target,
fsync, SHA-256 record, rename), then loaded by each (xm2's verifies the digest first). Prints the
median seconds and the overhead; the temporary files go in ``--folder`` (default: a folder under
artifacts/, so on the disk checkpoints use).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from xm2.checkpoint import VerifiedCheckpointIO


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[75, 600])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="artifacts/benchmarks/checkpoint_io")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    print("| checkpoint | Lightning save | xm2 save | Lightning load | xm2 verify + load |")
    print("|---:|---:|---:|---:|---:|")
    try:
        for size in args.sizes_mb:
            numel = size * 2**20 // 4
            state = {"state_dict": {f"w{i}": torch.randn(numel // 8) for i in range(8)},
                     "global_step": 1}
            results = {}
            for name, io in (("lightning", TorchCheckpointIO()), ("xm2", VerifiedCheckpointIO())):
                path = folder / f"{name}-{size}.ckpt"
                saves = [timed(lambda io=io, path=path, state=state: io.save_checkpoint(state, path))
                         for _ in range(args.repeats)]
                loads = [timed(lambda io=io, path=path: io.load_checkpoint(path))
                         for _ in range(args.repeats)]
                results[name] = (statistics.median(saves), statistics.median(loads))
            (ls, ll), (xs, xl) = results["lightning"], results["xm2"]
            print(f"| {size} MB | {ls:.2f} s | {xs:.2f} s ({xs / ls:.2f}×) | {ll:.2f} s | "
                  f"{xl:.2f} s ({xl / ll:.2f}×) |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
