"""What the analysis callbacks of a recipe cost, against the training they run in.

    .venv/bin/python benchmarks/analysis_overhead.py [--config config/nano.yaml] [--steps 6]
    .venv/bin/python benchmarks/analysis_overhead.py --run_id <run> [--tracking_uri sqlite:///mlflow.db]

Without ``--run_id``: reads the Calibration and ContextLaw settings from the recipe, times one
evaluation of each on the recipe's model (bf16 autocast, as the recipe trains), and times training
steps of real batches in the same process, so that both see the same machine load. It prints the
seconds of each analysis, how many times the recipe runs it, and the total as a share of
``max_steps`` training steps. Weights are freshly initialised: the cost depends on shapes, not
values. Needs the recipe's tokenizer and shards (`make train` creates them).

With ``--run_id``: the same share measured in a finished run: the ``*/seconds`` each analysis
logged, summed, against the run's wall time in MLflow.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import fields

import torch
import yaml

from xm2.analysis.context_law import fit_power_law, per_position_loss, text_windows
from xm2.analysis.flops import measure_peak_flops
from xm2.analysis.multiple_choice import evaluate_multiple_choice
from xm2.config import ModelConfig
from xm2.data.corpus import read_documents
from xm2.data.datamodule import DEFAULT_STABLE
from xm2.data.eval_sets import load_eval_set
from xm2.data.mixture import MixtureBatches, PackedRows
from xm2.data.shards import open_shard, shard_dir
from xm2.data.tokenizer import EOS_ID, default_tokenizer_path, load_tokenizer
from xm2.model import Decoder
from xm2.optimizer import OptimizerConfig, build_adamw


def callback_args(recipe: dict, name: str) -> dict | None:
    for entry in recipe["trainer"].get("callbacks", []):
        if entry["class_path"].endswith(name):
            return entry.get("init_args", {}) or {}
    return None


def runs_per_fit(args: dict, max_steps: int, decay_start: int) -> int:
    every = args.get("every_n_steps")
    steps = set(range(every, max_steps, every)) if every else set()
    if args.get("at_decay_start", True):
        steps.add(decay_start)
    if args.get("at_end", True):
        steps.add(max_steps)
    return len(steps)


def from_recipe(options) -> None:
    torch.set_num_threads(options.threads)
    recipe = yaml.safe_load(open(options.config))
    architecture = {f.name for f in fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in recipe["model"]["architecture"].items()
                            if k in architecture})
    max_steps = recipe["trainer"]["max_steps"]
    decay_start = recipe["model"]["schedule"]["decay_start_step"]
    batch_size = recipe["data"]["batch_size"]
    tokenizer_path = options.tokenizer or default_tokenizer_path(config.vocab_size)
    tokenizer = load_tokenizer(tokenizer_path)
    model = Decoder(config)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    # Training steps on real batches, as the recipe runs them.
    rows = {name: PackedRows(open_shard(shard_dir("artifacts/shards", tokenizer_path), name,
                                        "train"), config.max_seq_len, name)
            for name in DEFAULT_STABLE}
    stream = iter(MixtureBatches(rows, DEFAULT_STABLE, DEFAULT_STABLE, batch_size, 10**9, seed=0))
    optimizer = build_adamw(model, config, OptimizerConfig())
    step_times = []
    for step in range(options.steps + 2):  # two warm-up steps
        tokens = next(stream)["tokens"]
        start = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            step_times.append(time.perf_counter() - start)
    step_time = statistics.median(step_times)
    training = step_time * max_steps
    print(f"training: {step_time:.3f} s/step (median of {options.steps}) × {max_steps} steps = "
          f"{training:.0f} s")

    model.eval()
    total = 0.0
    calibration = callback_args(recipe, "Calibration")
    if calibration is not None:
        times = runs_per_fit(calibration, max_steps, decay_start)
        for task in calibration.get("tasks", ["mmlu:letter", "arc_easy:cloze"]):
            name, _, format = task.rpartition(":")
            items = load_eval_set(name, calibration.get("data_dir", "data/eval"),
                                  calibration.get("limit", 200), calibration.get("subjects"))
            start = time.perf_counter()
            with torch.no_grad(), autocast:
                evaluate_multiple_choice(model, tokenizer, items, format,
                                         calibration.get("shots", 0), config.max_seq_len, EOS_ID,
                                         calibration.get("batch_size", 32),
                                         continuation_style=name == "hellaswag")
            seconds = time.perf_counter() - start
            total += times * seconds
            print(f"calibration {task} ({len(items)} items): {seconds:.1f} s × {times} runs")
    law = callback_args(recipe, "ContextLaw")
    if law is not None:
        times = runs_per_fit(law, max_steps, decay_start)
        start = time.perf_counter()
        documents = list(read_documents(recipe["data"].get("corpus_dir", "data/corpus"),
                                        law.get("source", "prose"), "val"))
        windows = text_windows(tokenizer.encode(documents), config.max_seq_len,
                               law.get("max_windows", 32))
        with torch.no_grad(), autocast:
            loss, sem = per_position_loss(model, windows, law.get("batch_size", 8))
        fit_power_law(loss, sem, law.get("n_bins", 40))
        seconds = time.perf_counter() - start
        total += times * seconds
        print(f"context law ({len(windows)} windows): {seconds:.1f} s × {times} runs")
    if callback_args(recipe, "Throughput") is not None:
        start = time.perf_counter()
        measure_peak_flops(torch.bfloat16, size=2048, repeats=5)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"throughput: peak measurement {seconds:.1f} s once")
    print(f"analyses: {total:.1f} s = {100 * total / training:.1f}% of the {max_steps} training "
          "steps (validation and start-up not counted, so the share of make train's wall time is "
          "smaller)")


def from_run(options) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(options.tracking_uri)
    run = client.get_run(options.run_id)
    wall = (run.info.end_time - run.info.start_time) / 1000
    total = 0.0
    for key in sorted(k for k in run.data.metrics if k.endswith("/seconds")):
        history = client.get_metric_history(options.run_id, key)
        seconds = sum(m.value for m in history)
        total += seconds
        print(f"{key.removesuffix('/seconds')}: {seconds:.1f} s over steps "
              f"{[int(m.step) for m in history]}")
    print(f"analyses: {total:.1f} s of the run's {wall:.0f} s in MLflow = {100 * total / wall:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config/nano.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--run_id", default=None)
    parser.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    options = parser.parse_args()
    if options.run_id:
        from_run(options)
    else:
        from_recipe(options)


if __name__ == "__main__":
    main()
