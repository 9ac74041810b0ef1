"""The analysis callbacks end to end: `xm2 fit` and `xm2 validate --ckpt_path` with them on, the
MLflow run's metrics and artefacts, scoring of the real checkpoint, and notebooks/analysis.ipynb."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_analysis import assert_batched_scoring_equals_direct
from tests.test_cli import smoke_args, xm2
from tests.test_notebooks import execute, images, outputs
from xm2.config import ModelConfig
from xm2.data.eval_sets import load_eval_set
from xm2.data.tokenizer import load_tokenizer
from xm2.model import Decoder

# The smoke run (12 steps, decay from step 8) with the analyses every 4 steps, at the decay start
# and at the end, on small subsets.
ANALYSIS_CONFIG = f"""
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        save_top_k: 0
        every_n_train_steps: 6
    - class_path: callbacks.throughput.Throughput
      init_args:
        window_size: 3
    - class_path: callbacks.calibration.Calibration
      init_args:
        tasks: [mmlu:letter, arc_easy:cloze]
        limit: 24
        every_n_steps: 4
        data_dir: {ROOT / "data" / "eval"}
    - class_path: callbacks.context_law.ContextLaw
      init_args:
        max_windows: 8
        every_n_steps: 4
"""
TASK_KEYS = ["calibration/mmlu_letter", "calibration/arc_easy_cloze"]
FIT_KEYS = ["a", "b", "c", "a_se", "b_se", "c_se", "r2", "rmse", "extrapolation_error"]


def artefact_paths(client, run_id, folder=None) -> list[str]:
    paths = []
    for entry in client.list_artifacts(run_id, folder):
        paths += artefact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return paths


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tokenizer_path, shards) -> dict:
    directory = tmp_path_factory.mktemp("analysed")
    (directory / "analysis.yaml").write_text(ANALYSIS_CONFIG)
    args = [*smoke_args(directory, tokenizer_path, shards), "--config", "analysis.yaml"]
    fit = xm2("fit", *args, cwd=directory)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (checkpoint,) = (directory / "runs").rglob("last.ckpt")
    validate = xm2("validate", *args, "--ckpt_path", str(checkpoint), cwd=directory)
    assert validate.returncode == 0, validate.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{directory}/mlflow.db")
    experiment = client.get_experiment_by_name("xm2").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    return {"client": client, "fit": runs[0], "validate": runs[1], "checkpoint": checkpoint,
            "db": directory / "mlflow.db"}


@pytest.mark.slow
def test_fit_logs_calibration_context_law_and_throughput_by_step(analysed):
    client, run = analysed["client"], analysed["fit"]
    run_id = run.info.run_id
    for key in TASK_KEYS:
        # Every 4 steps, the decay start (8) being one of them, and at the end.
        ece = {m.step: m.value for m in client.get_metric_history(run_id, f"{key}/ece")}
        assert sorted(ece) == [4, 8, 12] and all(0 <= v <= 1 for v in ece.values())
        accuracy = run.data.metrics[f"{key}/accuracy"]
        assert 0 <= accuracy <= 1 and run.data.metrics[f"{key}/chance"] == 0.25
    for key in FIT_KEYS + ["loss_first", "loss_last", "fit_ok", "seconds"]:
        history = client.get_metric_history(run_id, f"context_law/{key}")
        assert sorted(m.step for m in history) == [4, 8, 12], key
    metrics = run.data.metrics
    assert metrics["context_law/loss_first"] > 0 and metrics["context_law/loss_last"] > 0
    curve = Path(client.download_artifacts(run_id, "context_law/step000012.csv")).read_text()
    # One row per position of the smoke model's 64-token context, after the header.
    assert curve.splitlines()[0] == "t,loss,sem,fit" and len(curve.splitlines()) == 1 + 64
    assert metrics["train/device/items_per_sec"] > 0 and 0 < metrics["train/device/mfu"] < 1
    assert 0 <= metrics["throughput/data_wait_share"] < 1 and metrics["throughput/peak_flops"] > 1e9
    paths = artefact_paths(client, run_id)
    for step in (4, 8, 12):
        for key in TASK_KEYS:
            assert f"{key}/step{step:06d}.png" in paths and f"{key}/step{step:06d}.json" in paths
        for suffix in ("png", "csv", "json"):
            assert f"context_law/step{step:06d}.{suffix}" in paths
    table = json.loads(Path(client.download_artifacts(
        run_id, "calibration/arc_easy_cloze/step000012.json")).read_text())
    assert sum(row["count"] for row in table["bins"]) == table["items"] == 24
    assert table["ece"] == pytest.approx(metrics["calibration/arc_easy_cloze/ece"])


@pytest.mark.slow
def test_validate_runs_the_analyses_on_the_checkpoint_at_its_step(analysed):
    client, fit, run = analysed["client"], analysed["fit"], analysed["validate"]
    for key in TASK_KEYS:
        (point,) = client.get_metric_history(run.info.run_id, f"{key}/ece")
        assert point.step == 12
        # The same weights and the same subset give the same numbers as at the end of the fit.
        assert point.value == pytest.approx(fit.data.metrics[f"{key}/ece"], abs=1e-6)
    assert run.data.metrics["context_law/b"] == pytest.approx(fit.data.metrics["context_law/b"],
                                                              rel=1e-6)
    assert run.data.metrics["validate/device/items_per_sec"] > 0
    paths = artefact_paths(client, run.info.run_id)
    assert {"calibration/mmlu_letter/step000012.png", "context_law/step000012.png",
            "context_law/step000012.csv"} <= set(paths)


@pytest.mark.slow
def test_scoring_a_real_checkpoint_equals_a_forward_pass_per_option(analysed, tokenizer_path):
    saved = torch.load(analysed["checkpoint"], weights_only=True)
    config = ModelConfig(**saved["hyper_parameters"]["architecture"])
    model = Decoder(config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved["state_dict"].items()})
    items = load_eval_set("arc_easy", ROOT / "data" / "eval", limit=5) + load_eval_set(
        "mmlu", ROOT / "data" / "eval", limit=3)
    assert_batched_scoring_equals_direct(model.eval(), load_tokenizer(tokenizer_path), items,
                                         config.max_seq_len)


@pytest.mark.slow
def test_analysis_notebook_executes_on_the_run(analysed, monkeypatch):
    monkeypatch.setenv("XM2_TRACKING_URI", f"sqlite:///{analysed['db']}")
    notebook = execute(ROOT / "notebooks" / "analysis.ipynb")
    assert len(images(notebook)) >= 5
    text = "\n".join(outputs(cell) for cell in notebook.cells)
    assert "decay starts at step 8; calibration of arc_easy_cloze, mmlu_letter at steps [4, 8, 12]" in text
    assert "before the decay" in text and "after the decay" in text
    assert "checkpoints evaluated by xm2 validate: [(12, " in text
    ece = analysed["fit"].data.metrics["calibration/mmlu_letter/ece"]
    assert f"{ece:.3f} (step 12)" in text and np.isfinite(ece)
