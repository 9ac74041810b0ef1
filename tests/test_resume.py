"""Resume, branch and faults end to end: real `xm2` processes, SIGKILLs, MLflow stores and servers."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_cli import smoke_args, xm2
from xm2.checkpoint import load_checkpoint_file, record_path
from xm2.data.tokenizer import train_tokenizer
from xm2.tracking.lineage import branches

FP32 = ["--trainer.precision", "32-true"]


def only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def history(client: MlflowClient, run_id: str, metric: str) -> dict[int, list[float]]:
    values: dict[int, list[float]] = {}
    for point in client.get_metric_history(run_id, metric):
        values.setdefault(int(point.step), []).append(point.value)
    return values


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_path, shards):
    """A 12-step smoke run (decay from step 8) with checkpoints at steps 6 and 12."""
    folder = tmp_path_factory.mktemp("finished")
    result = xm2("fit", *smoke_args(folder, tokenizer_path, shards), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(f"sqlite:///{folder}/mlflow.db")
    (midway,) = folder.rglob("step=6.ckpt")
    (end,) = folder.rglob("step=12.ckpt")
    return {"folder": folder, "run_id": run.info.run_id, "midway": midway, "end": end}


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run_step_for_step(tmp_path, tokenizer_path,
                                                                        shards):
    run_length = ["--trainer.max_steps", "16", *FP32]
    straight = xm2("fit", *smoke_args(tmp_path / "a", tokenizer_path, shards), *run_length,
                   cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    args = [*smoke_args(tmp_path / "b", tokenizer_path, shards), *run_length,
            # Slow enough that the kill lands mid-run, after the step-6 checkpoint.
            "--trainer.callbacks+", "tests.faults.SlowSteps", "--trainer.callbacks.seconds", "0.2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([sys.executable, "-m", "xm2.cli", "fit", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").rglob("step=6.ckpt.json")):
        assert victim.poll() is None and time.monotonic() < deadline, "run ended before step 6"
        time.sleep(0.02)
    # At once: the moment between a checkpoint and its step's metrics reaching MLflow, when a
    # kill would lose them unless the checkpoint carries them.
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    resumed = xm2("fit", *smoke_args(tmp_path / "b", tokenizer_path, shards), *run_length,
                  "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the run's last checkpoint" in resumed.stderr

    client_a, run_a = only_run(f"sqlite:///{tmp_path}/a/mlflow.db")
    # The resume continued the killed run: one MLflow run, now FINISHED.
    client_b, run_b = only_run(f"sqlite:///{tmp_path}/b/mlflow.db")
    assert run_b.info.status == "FINISHED"
    expected = history(client_a, run_a.info.run_id, "train/loss")
    actual = history(client_b, run_b.info.run_id, "train/loss")
    assert sorted(actual) == sorted(expected) == list(range(16))
    # Steps logged twice (before the kill and after the resume) must agree as well.
    differences = [abs(value - expected[step][0]) for step, values in actual.items() for value in values]
    print(f"max |loss difference| after a SIGKILL resume: {max(differences):.3g}")
    assert max(differences) <= 1e-6, max(differences)
    phases = history(client_b, run_b.info.run_id, "data/phase")
    assert set(phases[7]) == {0.0} and set(phases[8]) == {1.0}
    # A finished phase's mixture fractions stop being logged when the phase ends.
    assert max(history(client_b, run_b.info.run_id, "mixture/stable/prose")) == 7
    assert min(history(client_b, run_b.info.run_id, "mixture/decay/prose")) == 8


@pytest.mark.parametrize(
    "subcommand, override, difference",
    [
        ("fit", ["--model.architecture.hidden_size", "128"],
         "model.architecture.hidden_size: 64 in the checkpoint, 128 here"),
        ("fit", ["--model.architecture.scale_emb", "6"],
         "model.architecture.scale_emb: 12.0 in the checkpoint, 6.0 here"),
        ("fit", ["--model.schedule.decay_start_step", "10"],
         "model.schedule.decay_start_step: 8 in the checkpoint, 10 here"),
        ("fit", ["--model.optimizer.lr", "0.02"], "model.optimizer.lr: 0.01 in the checkpoint, 0.02 here"),
        ("validate", ["--model.architecture.num_layers", "3"],
         "model.architecture.num_layers: 2 in the checkpoint, 3 here"),
    ],
)
def test_a_mismatched_resume_or_validate_is_refused_naming_each_difference(
        finished_run, tokenizer_path, shards, tmp_path, subcommand, override, difference):
    result = xm2(subcommand, *smoke_args(tmp_path, tokenizer_path, shards),
                 "--ckpt_path", str(finished_run["midway"]), *override, cwd=tmp_path)
    assert result.returncode == 1
    assert difference in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened


@pytest.mark.parametrize("override, message", [
    (["--model.optimizer.lr", ".inf"], "optimizer lr=inf must be a finite number > 0"),
    (["--model.optimizer.weight_decay", ".nan"], "weight_decay=nan must be a finite number >= 0"),
    (["--model.architecture.scale_emb", ".nan"], "model scale_emb=nan must be a finite number > 0"),
])
def test_nonfinite_hyperparameters_are_refused_up_front(tmp_path, tokenizer_path, shards, override,
                                                       message):
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards), *override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_checkpoint_is_refused_with_another_tokenizer(finished_run, shards, tmp_path):
    other = train_tokenizer(512, ROOT / "data" / "corpus", tmp_path / "other.model", max_lines=5000)
    result = xm2("validate", *smoke_args(tmp_path, other, shards), "--ckpt_path",
                 str(finished_run["midway"]), cwd=tmp_path)
    assert result.returncode == 1
    assert "was trained with the tokenizer of SHA-256" in result.stderr
    assert f"but {other} has SHA-256" in result.stderr


def test_a_damaged_checkpoint_is_refused_by_name(finished_run, tokenizer_path, shards, tmp_path):
    damaged = tmp_path / "step=6.ckpt"
    shutil.copy(finished_run["midway"], damaged)
    shutil.copy(record_path(finished_run["midway"]), record_path(damaged))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2: len(data) // 2 + 32] = bytes(32)
    damaged.write_bytes(bytes(data))
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards), "--ckpt_path", str(damaged),
                 cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"xm2: error: checkpoint {damaged} is damaged")
    assert "Traceback" not in result.stderr


def test_a_branch_decays_from_its_source_step_into_a_new_tagged_run(finished_run, tokenizer_path,
                                                                     shards, tmp_path):
    args = smoke_args(tmp_path, tokenizer_path, shards)
    args[args.index("--trainer.logger.init_args.tracking_uri") + 1] = (
        f"sqlite:///{finished_run['folder']}/mlflow.db")
    result = xm2("fit", *args, "--branch_from", str(finished_run["midway"]),
                 "--branch_decay_steps", "4", "--model.schedule.decay_style", "linear",
                 "--data.decay", "{instruct_math: 1.0}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    uri = f"sqlite:///{finished_run['folder']}/mlflow.db"
    (row,) = branches(finished_run["run_id"], uri)
    assert (row["source_step"], row["decay_steps"], row["decay_style"]) == (6, 4, "linear")
    assert row["source_tokens"] == 6 * 4 * 64
    client = MlflowClient(uri)
    run = client.get_run(row["run_id"])
    assert run.info.run_name == "nano-wsd-decay-from-6" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == finished_run["run_id"]
    # The first decay step runs at the peak LR the source step had (no re-warmup), then decays.
    lr = {step: values[-1] for step, values in history(client, row["run_id"], "lr-AdamW/embedding").items()}
    assert lr[6] == pytest.approx(0.01) and lr[7] == pytest.approx(0.0075)
    assert lr[9] == pytest.approx(0.0025)
    phase = history(client, row["run_id"], "data/phase")
    assert phase[6] == [1.0]
    assert history(client, row["run_id"], "mixture/decay/instruct_math")[6] == [1.0]
    (end,) = tmp_path.rglob("last.ckpt")
    assert load_checkpoint_file(end)["global_step"] == 10

    listed = xm2("branches", finished_run["run_id"], "--tracking_uri", uri, cwd=tmp_path)
    assert "nano-wsd-decay-from-6" in listed.stdout, listed.stderr[-2000:]


def test_a_branch_must_start_in_the_stable_phase(finished_run, tokenizer_path, shards, tmp_path):
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards),
                 "--branch_from", str(finished_run["end"]), "--branch_decay_steps", "4", cwd=tmp_path)
    assert result.returncode == 1
    assert "at step 12, outside its run's stable phase (steps 2 to 7)" in result.stderr


@pytest.mark.slow
def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path,
                                                                         shards):
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards),
                 "--trainer.callbacks+", "tests.faults.PoisonWeights",
                 "--trainer.callbacks.at_step", "8", cwd=tmp_path)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("xm2: error: the training loss is nan at step 8")
    assert "Traceback" not in result.stderr
    (last,) = tmp_path.rglob("last.ckpt")
    saved = load_checkpoint_file(last)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    _, run = only_run(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_skip_mode_steps_over_a_nonfinite_loss(tmp_path, tokenizer_path, shards):
    result = xm2("fit", *smoke_args(tmp_path, tokenizer_path, shards),
                 "--model.on_nonfinite_loss", "skip",
                 "--trainer.callbacks+", "tests.faults.PoisonWeights",
                 "--trainer.callbacks.at_step", "3", "--trainer.callbacks.restore_after", "true",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.data.metrics["train/skipped_steps"] == 1.0
    (last,) = tmp_path.rglob("last.ckpt")
    saved = load_checkpoint_file(last)
    assert saved["global_step"] == 12
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{folder}/server.db", "--default-artifact-root", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)


def kill_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@pytest.mark.slow
def test_training_outlives_the_tracking_server_and_its_metrics_are_sent_later(
        tmp_path, tokenizer_path, shards):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    args = smoke_args(tmp_path, tokenizer_path, shards)
    args[args.index("--trainer.logger.init_args.tracking_uri") + 1] = uri
    args += ["--trainer.max_steps", "24", "--trainer.callbacks+", "tests.faults.SlowSteps",
             "--trainer.callbacks.seconds", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-m", "xm2.cli", "fit", *args], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = MlflowClient(f"sqlite:///{tmp_path}/server.db")  # the server's own store, read directly
    deadline = time.monotonic() + 300
    try:
        while True:
            runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
            if runs and len(store.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                break
            assert run.poll() is None and time.monotonic() < deadline, "the run never logged"
            time.sleep(0.2)
    finally:
        kill_server(server)
    killed_at = time.monotonic()
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert "stopped answering (connection refused). Training goes on" in stderr
    assert time.monotonic() - killed_at < 120
    # Checkpoints went on being written after the server died.
    assert {p.name for p in tmp_path.rglob("step=*.ckpt")} == {f"step={s}.ckpt" for s in (6, 12, 18, 24)}
    (backlog,) = tmp_path.rglob("mlflow-backlog-*.jsonl")
    assert f"xm2 tracking-sync {backlog} --tracking_uri {uri}" in stderr

    server = start_mlflow_server(tmp_path, port)
    try:
        sync = xm2("tracking-sync", str(backlog), "--tracking_uri", uri, cwd=tmp_path)
        assert sync.returncode == 0, sync.stderr[-2000:]
        client = MlflowClient(uri)
        (finished,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
        assert finished.info.status == "FINISHED"
        assert sorted(history(client, finished.info.run_id, "train/loss")) == list(range(24))
        assert "val/loss" in finished.data.metrics
    finally:
        kill_server(server)
    assert not backlog.exists()


def test_a_resume_extends_the_same_run_and_applies_safe_changes(finished_run, tokenizer_path,
                                                                  shards):
    folder = finished_run["folder"]
    result = xm2("fit", *smoke_args(folder, tokenizer_path, shards), "--ckpt_path", "last",
                 "--trainer.max_steps", "14", "--data.val_batches_per_source", "1", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Applied: trainer.max_steps: 12 (checkpoint) -> 14" in result.stderr
    assert "Applied: data.val_batches_per_source: 2 (checkpoint) -> 1" in result.stderr
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    run = client.get_run(finished_run["run_id"])
    assert run.info.status == "FINISHED"
    assert max(history(client, run.info.run_id, "train/loss")) == 13
    # MLflow keeps the value a run started with; the change is on record as a tag.
    assert run.data.params["data/val_batches_per_source"] == "2"
    assert run.data.tags["xm2.changed_on_resume.data/val_batches_per_source"] == "2 -> 1"
