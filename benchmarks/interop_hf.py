"""Time `xm2 export-hf` and `xm2 import-hf` on the Xmodel-2 1.2B shape (or fewer of its layers).

    .venv/bin/python benchmarks/interop_hf.py [--layers 48] [--verify] [--keep DIR]

Writes an xm2 checkpoint of the ``xmodel2-1.2b`` preset with freshly initialised weights (the
cost depends on shapes, not values) and the tokenizer of `make train`, then runs `xm2 export-hf`
(llama, then granite) and `xm2 import-hf` of the Llama export, each as its own process as a user
would, and prints each command's wall time (Python start-up included), the size it wrote and its
peak resident memory. ``--layers`` keeps the
preset's width and vocabulary with fewer blocks (time and size are linear in them beyond the
65,280 × 1,536 embedding); ``--verify`` adds the logit check of each export (a transformers
load and forward pass).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from xm2.checkpoint import save_checkpoint_file
from xm2.config import ModelConfig
from xm2.data.tokenizer import file_digest
from xm2.model import Decoder

ROOT = Path(__file__).resolve().parents[1]


def run(*words: str) -> tuple[float, float]:
    """Run ``xm2 <words>``; its wall seconds and peak resident GiB."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "xm2.cli", *words], cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"xm2 {' '.join(words)} failed")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20


def folder_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--tokenizer", default=str(ROOT / "artifacts/tokenizers/unigram-4096.model"))
    parser.add_argument("--keep", default=None, help="write here and keep the files")
    args = parser.parse_args()
    preset = yaml.safe_load((ROOT / "config/model/xmodel2-1.2b.yaml").read_text())
    config = ModelConfig(**{**preset["model"]["architecture"], "num_layers": args.layers})
    work = Path(args.keep or tempfile.mkdtemp(prefix="interop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        torch.manual_seed(0)
        model = Decoder(config)
        parameters = model.num_parameters()
        checkpoint = work / "model.ckpt"
        save_checkpoint_file({
            "global_step": 0,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"architecture": config.to_dict()},
            "xm2": {"record": {"global_step": 0, "tokenizer_path": args.tokenizer,
                               "tokenizer_sha256": file_digest(args.tokenizer)}},
        }, checkpoint)
        del model
        print(f"{args.layers} layers, {parameters:,} parameters; checkpoint "
              f"{checkpoint.stat().st_size / 2**30:.2f} GiB written in "
              f"{time.perf_counter() - started:.1f} s")
        verify = ["--verify", str(args.verify).lower()]
        for target in ("llama", "granite"):
            seconds, peak = run("export-hf", str(checkpoint), "--output", str(work / target),
                                "--target", target, *verify)
            print(f"xm2 export-hf --target {target}: {seconds:.1f} s, "
                  f"{folder_gib(work / target):.2f} GiB written, peak RSS {peak:.1f} GiB")
        shutil.rmtree(work / "granite")
        seconds, peak = run("import-hf", str(work / "llama"), "--output", str(work / "imported"))
        print(f"xm2 import-hf (the llama export): {seconds:.1f} s, "
              f"{folder_gib(work / 'imported'):.2f} GiB written, peak RSS {peak:.1f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
