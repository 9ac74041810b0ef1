"""End to end through the real `xm2` console script, MLflow store and SentencePiece model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT

XM2 = [sys.executable, "-m", "xm2.cli"]
SOURCES = ["code", "docs", "instruct_code", "instruct_math", "prose"]


def xm2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*XM2, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def smoke_args(tmp_path: Path, tokenizer_path: Path, shards: Path) -> list[str]:
    return [
        "--config", str(ROOT / "config" / "nano.yaml"),
        "--config", str(ROOT / "tests" / "configs" / "smoke.yaml"),
        "--data.corpus_dir", str(CORPUS),
        "--data.tokenizer_path", str(tokenizer_path),
        "--data.shards_dir", str(shards.parent),
        "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ]


@pytest.mark.slow
def test_printed_config_trains_through_both_phases_into_mlflow(tmp_path, tokenizer_path, shards):
    printed = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards), "--print_config",
                  cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "run.yaml").write_text(printed.stdout)

    fit = xm2("fit", "--config", "run.yaml", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Evaluate it with: xm2 validate --config run.yaml --ckpt_path " in fit.stdout
    assert "LeafSpec" not in fit.stderr and "Tip:" not in fit.stderr + fit.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["architecture/hidden_size"] == "64"
    assert run.data.params["schedule/decay_start_step"] == "8"
    metrics = run.data.metrics
    for name in ["train/loss", "train/tokens_seen", "lr-AdamW/hidden", "lr-AdamW/embedding",
                 "val/loss", "mixture/stable/prose", "mixture/decay/instruct_math",
                 *(f"val/loss_{s}" for s in SOURCES)]:
        assert name in metrics, name
    assert metrics["mixture/decay/code"] > 0 and metrics["mixture/stable/instruct_code"] == 0
    phases = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, "data/phase")}
    assert phases[7] == 0.0 and phases[8] == 1.0
    hidden_lr = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id,
                                                                          "lr-AdamW/hidden")}
    # m = 64/32 = 2: hidden matrices run at half the base LR (0.01) in the stable phase.
    assert hidden_lr[5] == pytest.approx(0.005)
    assert hidden_lr[11] < hidden_lr[8]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts

    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 12 and saved["mup"]["width_multiplier"] == 2.0

    validate = xm2("validate", "--config", "run.yaml", "--ckpt_path", str(checkpoint),
                   cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "val/loss_prose" in validate.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.architecture.num_heads", "3"], "hidden_size=64 is not divisible by num_heads=3"),
        (["--model.schedule.decay_start_step", "40"], "decay_start_step=40 is outside the run"),
        (["--data.stable", "{prose: 1, wiki: 2}"], "unknown source 'wiki' in the stable mixture"),
        (["--model.architecture.vocab_size", "1024"], "has vocab size 512 but the model has vocab_size=1024"),
    ],
)
def test_bad_input_fails_before_training_with_the_bad_value(tmp_path, tokenizer_path, shards,
                                                            override, message):
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards), *override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_resuming_from_a_mid_run_checkpoint_is_exact(tmp_path, tokenizer_path, shards):
    straight = xm2("fit", *smoke_args(tmp_path / "a", tokenizer_path, shards), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (midway,) = (tmp_path / "a").rglob("step=6.ckpt")
    (end,) = (tmp_path / "a").rglob("step=12.ckpt")

    resumed = xm2("fit", *smoke_args(tmp_path / "b", tokenizer_path, shards),
                  "--ckpt_path", str(midway), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resumed_end,) = (tmp_path / "b").rglob("step=12.ckpt")

    expected, actual = (torch.load(p, weights_only=True) for p in (end, resumed_end))
    assert actual["global_step"] == 12
    # Weights, optimizer moments, LR schedule and the data stream all came back from step 6:
    # any of them restored wrongly would move at least one weight.
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    assert actual["lr_schedulers"] == expected["lr_schedulers"]
    mixture = "MixtureMonitor"
    assert all(torch.equal(actual["callbacks"][mixture][phase], counts)
               for phase, counts in expected["callbacks"][mixture].items())
