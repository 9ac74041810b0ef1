"""The µTransfer sweep: its summary logic on a hand-made table, and a real tiny sweep into MLflow."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import CORPUS
from xm2.studies.sweep import LossTail, SweepRun, optimum_shift, summarize, summary_markdown, sweep

# µP: the optimum stays at 2^-6 for every width and wider is better there.
# SP: the optimum moves from 2^-6 to 2^-8 as the width grows 4×; width 128 diverged at 2^-4.
LOSSES = {
    ("mup", 64): {-8: 4.0, -6: 3.5, -4: 3.9},
    ("mup", 128): {-8: 3.8, -6: 3.3, -4: 3.7},
    ("mup", 256): {-8: 3.7, -6: 3.2, -4: 3.6},
    ("sp", 64): {-8: 4.0, -6: 3.5, -4: 3.9},
    ("sp", 128): {-8: 3.4, -6: 3.3, -4: math.inf},
    ("sp", 256): {-8: 3.2, -6: 3.4, -4: math.inf},
}


def hand_made_runs(seeds=(0, 1)) -> list[SweepRun]:
    # Seeds straddle the mean by ±0.05, so only the mean decides the argmin.
    return [
        SweepRun(param, width, log2_lr, seed, train_loss=loss, val_loss=loss + (0.05 if seed else -0.05))
        for (param, width), by_lr in LOSSES.items()
        for log2_lr, loss in by_lr.items()
        for seed in seeds
    ]


def test_summary_finds_the_optimum_per_width_its_shift_and_wider_is_better():
    summary = summarize(hand_made_runs())
    assert summary["log2_lr_grid"] == [-8, -6, -4]
    assert summary["argmin_log2_lr"] == {"mup": {64: -6, 128: -6, 256: -6},
                                         "sp": {64: -6, 128: -6, 256: -8}}
    assert summary["argmin_lr"]["sp"][256] == 2.0**-8
    assert summary["optimum_shift_grid_steps"] == {
        "mup": {"narrow_to_wide": 0, "spread": 0},
        "sp": {"narrow_to_wide": -1, "spread": 1},
    }
    check = summary["wider_is_better"]
    assert check["log2_lr"] == -6 and check["passed"]
    assert check["losses"] == pytest.approx({64: 3.5, 128: 3.3, 256: 3.2})
    markdown = summary_markdown(summary, hand_made_runs())
    assert "| sp | 2^-6 | 2^-6 | 2^-8 | -1 | 1 |" in markdown
    assert "**PASS**" in markdown and "diverged" in markdown


def test_wider_is_better_fails_when_a_wider_model_is_worse_beyond_the_tolerance():
    runs = [run for run in hand_made_runs() if run.parametrization == "mup"]
    for run in runs:
        if run.width == 256 and run.log2_lr == -6:
            run.val_loss += 0.15  # 3.35 > 3.3 at width 128
    assert not summarize(runs)["wider_is_better"]["passed"]
    assert summarize(runs, tolerance=0.1)["wider_is_better"]["passed"]


def test_a_width_whose_runs_all_diverged_has_no_optimum_and_no_shift():
    assert optimum_shift({64: -6, 128: None}, [-8, -6]) == {"narrow_to_wide": None,
                                                           "spread": None}


def test_a_non_finite_loss_stops_the_run_and_makes_its_loss_infinite():
    tail, trainer = LossTail(), SimpleNamespace(should_stop=False)
    for loss in [5.0, 4.0, 3.0]:
        tail.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)
    assert tail.final_loss(tail_fraction=0.5) == pytest.approx(3.5) and not trainer.should_stop
    tail.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 0)
    assert trainer.should_stop and tail.final_loss() == math.inf


@pytest.mark.slow
def test_a_tiny_real_sweep_logs_every_run_and_its_summary_to_mlflow(
    tmp_path, tokenizer_path, shards, monkeypatch
):
    # MLflow puts artifacts of a new experiment under the working directory.
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # 2^12 diverges within a step or two: the sweep must record it and go on.
    widths, log2_lrs, diverging = (32, 64, 128), (-9, -5, 12), 12
    summary = sweep(
        name="tiny", widths=widths, log2_lrs=log2_lrs, seeds=(0,), head_dim=32, num_layers=2,
        vocab_size=512, seq_len=32, batch_size=4, steps=6, val_batches_per_source=1,
        corpus_dir=str(CORPUS), tokenizer_path=str(tokenizer_path),
        shards_dir=str(shards.parent), output_dir=str(tmp_path / "sweeps"),
        experiment_name="sweep-test", tracking_uri=tracking_uri,
    )

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("sweep.role") == "summary"]
    children = [run for run in runs if run is not parent]
    assert len(children) == len(widths) * len(log2_lrs) * 2
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert {(run.data.params["sweep/parametrization"], int(run.data.params["sweep/width"]),
             float(run.data.params["sweep/log2_lr"]), run.data.params["sweep/seed"])
            for run in children} == {(p, w, lr, "0") for p in ("mup", "sp") for w in widths
                                     for lr in log2_lrs}
    for run in children:
        assert run.info.status == "FINISHED"
        diverged = float(run.data.params["sweep/log2_lr"]) == diverging
        assert run.data.tags["diverged"] == str(diverged)
        # MLflow stores an infinite loss as the largest float.
        assert (run.data.metrics["final/val_loss"] > 1e300) == diverged
        assert (run.data.metrics["final/train_loss"] > 1e300) == diverged
        assert run.data.params["optimizer/lr"] == str(2.0 ** float(run.data.params["sweep/log2_lr"]))
        assert run.data.params["schedule/decay_start_step"] == "5"

    # At the base width µP and SP are the same model, so with the same seed the same losses.
    base = {run.data.params["sweep/parametrization"]: run.data.metrics["final/val_loss"]
            for run in children
            if run.data.params["sweep/width"] == "32" and run.data.params["sweep/log2_lr"] == "-5"}
    assert base["mup"] == pytest.approx(base["sp"], rel=1e-6)

    assert parent.info.status == "FINISHED"
    logged = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert {"runs.csv", "loss_vs_lr.png", "summary.json", "summary.md"} <= logged
    output = tmp_path / "sweeps" / "tiny"
    assert (output / "loss_vs_lr.png").read_bytes().startswith(b"\x89PNG")
    with (output / "runs.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(children)
    for param in ("mup", "sp"):
        assert set(summary["argmin_log2_lr"][param]) == set(widths)
        assert set(summary["argmin_log2_lr"][param].values()) <= {-9, -5}
    assert json.loads((output / "summary.json").read_text())["argmin_log2_lr"]["sp"]["128"] in (-9, -5)
