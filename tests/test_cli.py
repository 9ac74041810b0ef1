"""End to end through the real `xm2` console script, MLflow store and SentencePiece model."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT
from xm2.cli import TOOLS, main, tool

# The console script a user runs (as `make train` does); `python -m xm2.cli` where it is absent.
CONSOLE_SCRIPT = Path(sys.executable).parent / "xm2"
XM2 = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "xm2.cli"]
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

    fit = xm2("fit", "--config", "run.yaml", "--data.val_batches_per_source", "2", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    # The printed command starts xm2 as this fit was started and keeps its overrides.
    (hint,) = [line for line in fit.stdout.splitlines() if line.startswith("Evaluate it with: ")]
    validate_words = shlex.split(hint.removeprefix("Evaluate it with: "))
    assert validate_words[:len(XM2) + 6] == [*XM2, "validate", "--config", "run.yaml",
                                              "--data.val_batches_per_source", "2", "--ckpt_path"]
    assert "LeafSpec" not in fit.stderr and "Tip:" not in fit.stderr + fit.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["architecture/hidden_size"] == "64"
    assert params["schedule/decay_start_step"] == "8"
    # Data, trainer and seed under their own prefixes; LightningCLI's internals not at all.
    assert params["data/batch_size"] == "4" and params["data/stable/prose"] == "0.4"
    assert params["trainer/max_steps"] == "12" and params["trainer/precision"] == "bf16-mixed"
    assert params["trainer/accumulate_grad_batches"] == "1" and params["seed_everything"] == "1234"
    assert not [key for key in params if key.startswith("_") or key == "batch_size"]
    assert len(tags["xm2.git_commit"]) == 40 and tags["xm2.git_dirty"] in ("true", "false")
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

    assert Path(validate_words[-1]).resolve() == checkpoint.resolve()
    validate = subprocess.run(validate_words, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "val/loss_prose" in validate.stdout
    # The evaluation is its own run, named for and linked to the run that made the checkpoint.
    (evaluation,) = [r for r in client.search_runs([run.info.experiment_id])
                     if r.info.run_id != run.info.run_id]
    assert evaluation.info.run_name == "nano-wsd-validate-step12"
    assert evaluation.data.tags["xm2.checkpoint_run_id"] == run.info.run_id
    assert evaluation.data.params["trainer/max_steps"] == "12"


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
    # One line that names the bad value, and no traceback (XM2_TRACEBACK=1 would show it).
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("xm2: error: ")]
    assert message in line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    # Found before the MLflow run was opened: the store holds no FAILED run.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_help_lists_every_command_and_starts_fast(tmp_path):
    start = time.monotonic()
    result = xm2("--help", cwd=tmp_path)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == {"fit", "validate", "test", *TOOLS}
    for name in TOOLS:  # each listed tool resolves to its function and documents it
        assert tool(name).__doc__.split()[0] in result.stdout
    # Lightning alone takes seconds to import; --help must not import it (measured:
    # benchmarks/startup.py). Generous bound for a loaded machine.
    assert seconds < 5, seconds


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


def test_a_second_config_adds_a_callback_and_keeps_the_recipes(tmp_path, capsys):
    adds = tmp_path / "adds.yaml"
    adds.write_text("trainer:\n  callbacks+:\n    - class_path: callbacks.coord_check.CoordCheck\n"
                    "      init_args: {every_n_steps: 50}\n")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(ROOT / "config" / "nano.yaml"), "--config", str(adds),
              "--print_config"])
    assert stopped.value.code in (0, None)
    callbacks = [entry["class_path"] for entry in
                 yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]]
    assert callbacks[:3] == ["lightning.pytorch.callbacks.LearningRateMonitor",
                             "lightning.pytorch.callbacks.ModelCheckpoint",
                             "callbacks.mixture.MixtureMonitor"]
    assert callbacks[-1] == "callbacks.coord_check.CoordCheck"


@pytest.mark.parametrize("precision", [16, "16", "bf16", 32, "32", 64, "64", "16-mixed",
                                       "bf16-mixed", "32-true", "64-true", "bf16-true", "16-true"])
def test_precision_names_are_the_ones_lightning_records(precision):
    """xm2 compares a resume's precision with the checkpoint's by Lightning's own name; its
    table must agree with Lightning's conversion (a private function: checked here, not used)."""
    import warnings

    from lightning.fabric.connector import _convert_precision_to_unified_args

    from xm2.lightning_cli import unified_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert unified_precision(precision) == str(_convert_precision_to_unified_args(precision))


def test_an_installed_xm2_finds_its_presets_from_any_folder(tmp_path):
    result = xm2("fit", "--config", "config/nano.yaml", "--config", "config/model/tiny.yaml",
                 "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hidden_size: 512" in result.stdout
