"""Local MLflow stores (xm2/tracking/store.py): made once however many processes start on a new
one, and a store that stops taking writes mid-run stops the run in one line, checkpoints kept.

Everything is real: processes started together behind a barrier file, `xm2 fit` commands, SQLite
stores made read-only the way that stops root too (``chattr +i``; ``chmod`` for other users).
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_cli import smoke_args
from tests.test_errors import console, one_line_error
from xm2 import preflight
from xm2.checkpoint import load_checkpoint_file
from xm2.errors import TrackingError
from xm2.tracking.store import LOCK_SUFFIX

# MLflow's own line, printed by the one process that creates a new store's tables.
CREATING_TABLES = "Creating initial MLflow database tables"


def set_read_only(path: Path, read_only: bool = True) -> None:
    """Make ``path`` refuse writes, or take that back. ``chmod`` does not stop root (the tests
    run as root in CI), an immutable file does."""
    if os.geteuid() != 0:
        path.chmod(0o444 if read_only else 0o644)
        return
    subprocess.run(["chattr", "+i" if read_only else "-i", str(path)], check=True,
                   capture_output=True)


@pytest.fixture
def read_only_possible(tmp_path):
    probe = tmp_path / "probe"
    probe.touch()
    try:
        set_read_only(probe)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make a file read-only for this user here ({error})")
    set_read_only(probe, False)


class FreezeStoreAt(L.Callback):
    """Makes the run's SQLite store read-only before step ``at_step``, from inside the run."""

    def __init__(self, path: str, at_step: int) -> None:
        self.path, self.at_step = Path(path), at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            set_read_only(self.path)


# A process that waits for the barrier file, then opens a run in the store, as a study does.
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from xm2.tracking.runs import TrackedRun
    uri, barrier, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    (barrier.parent / f"ready-{name}").touch()
    while not barrier.exists():
        time.sleep(0.001)
    with TrackedRun.start(uri, "xm2", name) as run:
        run.log_metrics({"m": 1.0})
""")


def test_processes_opening_a_new_store_at_the_same_moment_all_succeed(tmp_path):
    # Without the lock, 15 of 20 such processes (4 at a time, 5 new stores) died in MLflow's
    # migrations: "table runs already exists", "duplicate column name: step".
    count, uri, barrier = 4, f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(barrier), f"worker{i}"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(count)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < count:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.05)
    barrier.touch()
    outputs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * count, outputs
    assert sum(CREATING_TABLES in output for output in outputs) == 1  # made once
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"worker{i}" for i in range(count)]
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert (tmp_path / f"mlflow.db{LOCK_SUFFIX}").exists()


@pytest.mark.slow
def test_fits_started_together_on_a_new_store_all_finish(tmp_path, tokenizer_path, shards):
    # Without the lock, all four of these died in MLflow's migrations
    # ("table _alembic_tmp_model_versions already exists").
    count, env = 4, {**os.environ, "PYTHONPATH": str(ROOT)}
    fits = []
    for index in range(count):
        args = smoke_args(tmp_path, tokenizer_path, shards)
        args[args.index("--trainer.default_root_dir") + 1] = str(tmp_path / f"runs{index}")
        fits.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "xm2"), "fit", *args, "--trainer.max_steps", "2",
             "--model.schedule.warmup_steps", "1", "--model.schedule.decay_start_step", "1",
             "--trainer.logger.init_args.run_name", f"fit{index}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [fit.communicate(timeout=600)[1] for fit in fits]
    assert [fit.returncode for fit in fits] == [0] * count, [out[-2000:] for out in outputs]
    assert sum(CREATING_TABLES in output for output in outputs) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"fit{i}" for i in range(count)]
    assert {run.info.status for run in runs} == {"FINISHED"}


def test_a_read_only_store_is_refused_before_the_run(tmp_path, read_only_possible):
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()
    set_read_only(store)
    try:
        with pytest.raises(TrackingError, match=rf"the MLflow store {store} .* cannot be written: "
                                                rf"{store} is read-only"):
            preflight.check_tracking_uri(f"sqlite:///{store}")
    finally:
        set_read_only(store, False)


@pytest.mark.slow
def test_a_store_made_read_only_mid_run_stops_it_in_one_line_and_the_resume_continues(
        tmp_path, tokenizer_path, shards, read_only_possible):
    store = tmp_path / "mlflow.db"
    args = smoke_args(tmp_path, tokenizer_path, shards)
    try:
        stopped = console("fit", *args, "--trainer.callbacks+",
                          "tests.test_tracking_store.FreezeStoreAt", "--trainer.callbacks.path",
                          str(store), "--trainer.callbacks.at_step", "8", cwd=tmp_path)
    finally:
        set_read_only(store, False)
    line = one_line_error(stopped)
    (folder,) = {path.parent for path in tmp_path.rglob("step=6.ckpt")}
    assert line == (f"xm2: error: the MLflow store {store} refused a write at step 8 (disk I/O "
                    f"error); training stopped and its checkpoints in {folder} are kept: make the "
                    "store writable, then resume this run with --ckpt_path last")
    # What was written before the stop is whole: the checkpoints load (their digests are checked).
    assert load_checkpoint_file(folder / "step=6.ckpt")["global_step"] == 6
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 6

    resumed = console("fit", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    assert run.info.status == "FINISHED"
    steps = {int(point.step) for point in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(12))
