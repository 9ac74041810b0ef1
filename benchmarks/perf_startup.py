"""Where ``xm2 fit``'s start-up goes: seconds from the start of the process to its first training
step, by phase.

    .venv/bin/python benchmarks/perf_startup.py [--size nano] [--dtype bf16]

Runs the recipe as perf_suite.py's recipe row does (config/nano.yaml, validation, checkpoints and
analyses on) in this process, with timestamps around the phases Lightning and xm2 go through —
imports, building the CLI parser, parsing, the MLflow logger, the data checks, the callbacks'
set-up, the model summary, the sanity-check validation — and exits at the first training step.
Prints the cumulative wall and CPU seconds at each mark.
"""

from __future__ import annotations

import time

STARTED_WALL, STARTED_CPU = time.perf_counter(), time.process_time()

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

MARKS: list[tuple[str, float, float]] = []


def mark(name: str) -> None:
    MARKS.append((name, time.perf_counter() - STARTED_WALL, time.process_time() - STARTED_CPU))


def timed(owner, attribute: str, label: str) -> None:
    function = getattr(owner, attribute)

    @functools.wraps(function)  # jsonargparse reads signatures: keep them
    def wrapper(*args, **kwargs):
        mark(f"{label} start")
        try:
            return function(*args, **kwargs)
        finally:
            mark(f"{label} end")

    setattr(owner, attribute, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="nano")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning  # noqa: F401  (torch, torchmetrics and what they import)

    mark("import lightning")
    import perf_probe
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.trainer.trainer import Trainer
    from perf_suite import fit_config

    import xm2.lightning_cli
    from callbacks.calibration import Calibration
    from callbacks.context_law import ContextLaw
    from callbacks.throughput import Throughput
    from xm2.cli import main as xm2_main
    from xm2.data.datamodule import MixtureDataModule
    from xm2.module import Xm2Module

    mark("import xm2")
    for owner, attribute, label in [
        (LightningCLI, "setup_parser", "build the CLI parser"),
        (LightningCLI, "parse_arguments", "parse the configs"),
        (MLFlowLogger, "__init__", "MLflow logger (import, store)"),
        (LightningCLI, "instantiate_classes", "instantiate"),
        (MixtureDataModule, "prepare_data", "prepare_data (tokenizer, shard checks)"),
        (MixtureDataModule, "setup", "data setup"),
        (Throughput, "setup", "Throughput setup (peak matmul)"),
        (Calibration, "setup", "Calibration setup"),
        (ContextLaw, "setup", "ContextLaw setup"),
        (Xm2Module, "configure_model", "configure_model"),
        (ModelSummary, "on_fit_start", "model summary"),
        (MLFlowLogger, "log_hyperparams", "log parameters"),
        (Trainer, "_run_sanity_check", "sanity-check validation"),
    ]:
        timed(owner, attribute, label)
    del xm2.lightning_cli

    def first_step(self, *arguments, **kwargs) -> None:
        mark("first training step")
        previous = 0.0
        print("| wall s | + s | CPU s | mark |\n|---|---|---|---|")
        for name, wall, cpu in MARKS:
            print(f"| {wall:.2f} | {wall - previous:.2f} | {cpu:.2f} | {name} |")
            previous = wall
        sys.stdout.flush()
        os._exit(0)

    perf_probe.FitProbe.on_train_batch_start = first_step
    with tempfile.TemporaryDirectory(prefix="xm2-perf-startup-") as folder:
        config = fit_config(args.size, args.dtype, "none", 3, 8, Path(folder), recipe_row=True)
        sys.argv = ["xm2", "fit", "--config", str(config)]
        mark("start xm2 fit")
        xm2_main()


if __name__ == "__main__":
    main()
