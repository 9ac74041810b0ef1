"""What the wind tunnel costs beyond training: per trial, and per study.

Runs a real miniature study (a 2-layer, 64-wide model, ``--steps`` steps of 4 × 32 tokens per
trial) with ``xm2.studies.windtunnel.command.windtunnel`` into a temporary journal file and
MLflow store, then splits each trial's wall time into the time inside ``Trainer.fit`` and the
rest (config parsing and instantiation through the ``xm2 fit`` parser), and the study's wall
time into trials and the rest (Optuna storage, MLflow parent, figures and best.yaml).

    .venv/bin/python benchmarks/windtunnel_overhead.py --trials 6 --steps 8
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()

    from xm2.data.corpus import source_names
    from xm2.data.shards import write_shards
    from xm2.data.tokenizer import train_tokenizer
    from xm2.studies.windtunnel.command import windtunnel
    from xm2.studies.windtunnel.settings import Pruner, Runs, Sampler

    corpus = ROOT / "data" / "corpus"
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer = train_tokenizer(512, corpus, folder / "unigram-512.model", max_lines=30_000)
        write_shards(corpus, tokenizer, folder / "shards", source_names(corpus))
        overrides = {
            "model.architecture.vocab_size": 512, "model.architecture.hidden_size": 64,
            "model.architecture.intermediate_size": 160, "model.architecture.num_layers": 2,
            "model.architecture.num_heads": 2, "model.architecture.max_seq_len": 32,
            "data.batch_size": 4, "data.val_batches_per_source": 1,
            "data.corpus_dir": str(corpus), "data.tokenizer_path": str(tokenizer),
            "data.shards_dir": str(folder / "shards"), "trainer.precision": "32-true",
        }
        started = time.perf_counter()
        windtunnel(
            name="overhead", trials=arguments.trials, baseline=False,
            proxy=Runs(configs=(str(ROOT / "config" / "nano.yaml"),),
                       tokens=4 * 32 * arguments.steps, validations=2, overrides=overrides),
            sampler=Sampler(startup_trials=arguments.trials), pruner=Pruner(kind="none"),
            torch_threads=arguments.threads, output_dir=str(folder / "out"),
            tracking_uri=f"sqlite:///{folder}/mlflow.db",
        )
        study_seconds = time.perf_counter() - started
        with (folder / "out" / "overhead" / "trials.csv").open() as handle:
            rows = list(csv.DictReader(handle))

    seconds = [float(row["seconds"]) for row in rows]
    fit = [float(row["fit_seconds"]) for row in rows]
    outside = [total - inside for total, inside in zip(seconds, fit, strict=True)]
    print(f"\n{len(rows)} trials of {arguments.steps} steps, {arguments.threads} thread(s)")
    print(f"per trial: {statistics.median(seconds):.2f} s median, of which Trainer.fit "
          f"{statistics.median(fit):.2f} s and parsing/instantiation "
          f"{statistics.median(outside):.2f} s")
    print(f"study: {study_seconds:.1f} s, of which trials {sum(seconds):.1f} s and storage, "
          f"MLflow and summary {study_seconds - sum(seconds):.1f} s")


if __name__ == "__main__":
    main()
