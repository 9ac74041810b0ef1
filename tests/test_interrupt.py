"""Interrupted runs, through the real `xm2` command and real signals: SIGTERM (what a scheduler
sends before it kills a job) and Ctrl-C save the step, print the command that resumes it and exit
128 + the signal; the printed command resumes exactly, a decay branch's included."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_cli import XM2, smoke_args, xm2
from tests.test_resume import history, only_run
from xm2.checkpoint import load_checkpoint_file, verify_checkpoint
from xm2.tracking.lineage import branches

# A checkpoint line and a resume line, as the interrupted run prints them.
INTERRUPTED = re.compile(r"^Interrupted by (SIG\w+) at step (\d+): checkpoint (.+)$", re.M)
RESUME = re.compile(r"^Resume with: (.+)$", re.M)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer_path, shards):
    """The uninterrupted 12-step smoke run (checkpoints at steps 6 and 12, decay from step 8)."""
    folder = tmp_path_factory.mktemp("straight")
    result = xm2("fit", *smoke_args(folder, tokenizer_path, shards), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(f"sqlite:///{folder}/mlflow.db")
    return {"folder": folder, "run_id": run.info.run_id, "losses": history(client, run.info.run_id,
                                                                           "train/loss"),
            "midway": next(folder.rglob("step=6.ckpt")), "end": next(folder.rglob("step=12.ckpt"))}


def interrupt(args: list[str], cwd: Path, once: Path, pattern: str, number: int,
              delay: float) -> subprocess.CompletedProcess:
    """Run `xm2 fit <args>`, send it signal ``number`` ``delay`` s after a file named
    ``pattern`` appears under ``once`` (a checkpoint's record), and wait for it to end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([*XM2, "fit", *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(once.rglob(pattern)):
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
        time.sleep(0.02)
    time.sleep(delay)  # into the next steps: the interrupted step is one no ModelCheckpoint kept
    assert victim.poll() is None, "the run finished before it could be interrupted"
    victim.send_signal(number)
    stdout, stderr = victim.communicate(timeout=300)
    return subprocess.CompletedProcess(victim.args, victim.returncode, stdout, stderr)


def printed(stopped: subprocess.CompletedProcess, args: list[str], name: str) -> tuple[Path, list[str]]:
    """The checkpoint and resume command an interrupted run printed, checked against ``args``."""
    (said,) = INTERRUPTED.findall(stopped.stderr)
    (command,) = RESUME.findall(stopped.stderr)
    signal_name, step, checkpoint = said
    assert signal_name == name
    checkpoint = Path(checkpoint)
    # The command line as started, with --ckpt_path of the checkpoint it just saved.
    assert shlex.split(command) == [*XM2, "fit", *args, "--ckpt_path", str(checkpoint)]
    assert checkpoint.name == f"step={step}.ckpt" and int(step) not in (6, 12), step
    assert verify_checkpoint(checkpoint)["global_step"] == int(step)  # atomic, with its record
    return checkpoint, shlex.split(command)


@pytest.mark.slow
def test_sigterm_saves_the_step_exits_143_and_the_printed_command_resumes_exactly(
        straight, tmp_path, tokenizer_path, shards):
    args = [*smoke_args(tmp_path, tokenizer_path, shards),
            "--trainer.callbacks+", "tests.faults.SlowSteps", "--trainer.callbacks.seconds", "0.3"]
    stopped = interrupt(args, tmp_path, tmp_path, "step=6.ckpt.json", signal.SIGTERM, 0.5)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    checkpoint, command = printed(stopped, args, "SIGTERM")
    assert "Traceback" not in stopped.stderr

    resumed = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Weights, optimizer, schedule and data position came back from the interrupted step.
    expected, actual = (torch.load(path, weights_only=True)
                        for path in (straight["end"], next(tmp_path.rglob("step=12.ckpt"))))
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    assert actual["lr_schedulers"] == expected["lr_schedulers"]
    # One MLflow run, FINISHED, with the uninterrupted run's loss at every step.
    client, run = only_run(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.info.status == "FINISHED"
    losses = history(client, run.info.run_id, "train/loss")
    assert sorted(losses) == sorted(straight["losses"]) == list(range(12))
    assert all(values == [straight["losses"][step][0]] * len(values)
               for step, values in losses.items()), (losses, straight["losses"])


@pytest.mark.slow
def test_a_branch_stopped_by_ctrl_c_resumes_by_its_printed_command_or_its_config_yaml(
        straight, tmp_path, tokenizer_path, shards):
    # A checkpoint every 2 steps tells the test the branch is under way (steps 6 to 10).
    (tmp_path / "every2.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {filename: '{step}', save_last: true, save_top_k: -1, "
        "every_n_train_steps: 2}\n"
        "    - class_path: tests.faults.SlowSteps\n      init_args: {seconds: 0.3}\n")
    uri = f"sqlite:///{straight['folder']}/mlflow.db"
    args = smoke_args(tmp_path, tokenizer_path, shards)
    args[args.index("--trainer.logger.init_args.tracking_uri") + 1] = uri
    args += ["--config", str(tmp_path / "every2.yaml"), "--branch_from", str(straight["midway"]),
             "--branch_decay_steps", "4", "--model.schedule.decay_style", "linear"]
    stopped = interrupt(args, tmp_path, tmp_path, "step=8.ckpt.json", signal.SIGINT, 0.4)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    checkpoint, command = printed(stopped, args, "SIGINT")
    (row,) = branches(straight["run_id"], uri)
    client = MlflowClient(uri)
    logged = Path(client.download_artifacts(row["run_id"], "config.yaml", str(tmp_path)))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming the decay branch from step 6 of {straight['midway']}" in resumed.stderr
    (row,) = branches(straight["run_id"], uri)  # the same branch run, not a second one
    assert (row["source_step"], row["decay_steps"], row["status"]) == (6, 4, "FINISHED")
    end = load_checkpoint_file(next(tmp_path.rglob("last.ckpt")))
    assert end["global_step"] == 10

    # The killed branch's own config.yaml from MLflow (it names --branch_from and, as
    # ckpt_path, the source) resumes it too, with --ckpt_path of the branch's checkpoint.
    again = xm2("fit", "--config", str(logged), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming the decay branch from step 6" in again.stderr
    same = load_checkpoint_file(next(tmp_path.rglob("last.ckpt")))
    assert all(torch.equal(same["state_dict"][name], tensor)
               for name, tensor in end["state_dict"].items())
