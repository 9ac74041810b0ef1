"""Every trainer preset that fits one GPU, through the run API that `xm2 fit` and the studies use.

    python benchmarks/gpu_run_api.py [--steps 60] [--json results.json]

Runs the nano recipe (`config/nano.yaml`, bf16-mixed) for a few steps under each preset of
`config/trainer/` that one device can run: `single`, `fsdp1` (Lightning's FSDPStrategy, which
refuses CPUs, so CI never runs it) and `fsdp2` (xm2's ModelParallelStrategy), each with
`xm2.run.run` in this process, the way a study builds its runs. Prints, per preset: the run's
status, optimizer steps, final validation loss, wall time of the whole run and of the part after
the trainer exists, and training tokens per second over that part. Needs a CUDA device; MLflow is
not needed (the logger is switched off, so nothing is tracked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("single", "fsdp1", "fsdp2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--root", type=Path, default=Path("artifacts/gpu-run-api"))
    options = parser.parse_args()

    import torch

    from xm2.run import resolve, run

    if not torch.cuda.is_available():
        sys.exit("gpu_run_api: no CUDA device")
    recipe = resolve("fit", [ROOT / "config" / "nano.yaml"])
    tokens_per_step = (recipe["data"]["batch_size"]
                       * recipe["model"]["architecture"]["max_seq_len"])
    rows = []
    for preset in PRESETS:
        started = time.perf_counter()
        result = run("fit", [ROOT / "config" / "nano.yaml",
                             ROOT / "config" / "trainer" / f"{preset}.yaml"], [
            "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.logger=false",
            f"--trainer.max_steps={options.steps}",
            f"--trainer.val_check_interval={options.steps // 2}",
            f"--model.schedule.warmup_steps={options.steps // 10}",
            f"--model.schedule.decay_start_step={options.steps * 4 // 5}",
            f"--trainer.default_root_dir={options.root / preset}",
        ], quiet=True)
        rows.append({
            "preset": preset, "status": result.status, "steps": result.steps,
            "val_loss": result.metrics.get("val/loss"), "seconds": round(result.seconds, 1),
            "fit_seconds": round(result.fit_seconds, 1),
            "tokens_per_s": round(result.steps * tokens_per_step / result.fit_seconds),
            "wall_including_checks_s": round(time.perf_counter() - started, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "error": result.error,
        })
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{tokens_per_step} tokens per step")
    print(f"{'preset':<8} {'status':<9} {'steps':>5} {'val/loss':>8} {'run s':>6} "
          f"{'fit s':>6} {'tokens/s':>9} {'peak GiB':>8}")
    for row in rows:
        loss = "" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        print(f"{row['preset']:<8} {row['status']:<9} {row['steps']:>5} {loss:>8} "
              f"{row['seconds']:>6} {row['fit_seconds']:>6} {row['tokens_per_s']:>9} "
              f"{row['peak_memory_gib']:>8}")
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
