"""Checkpoint files: atomic saves, digest records, refused damage, orphans, kills mid-save."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import CORPUS, ROOT
from tests.test_errors import console, one_line_error
from xm2 import resume
from xm2.checkpoint import (
    VerifiedCheckpointIO,
    check_writable,
    find_last_checkpoint,
    load_checkpoint_file,
    partial_path,
    read_record,
    record_path,
    save_checkpoint_file,
    verify_checkpoint,
)
from xm2.data.tokenizer import train_tokenizer
from xm2.errors import CheckpointError, ConfigError


def checkpoint(step: int, size: int = 1000) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((size,), float(step))},
            "xm2": {"record": {"global_step": step, "run_name": "run", "experiment_name": "xm2"}}}


def test_a_saved_checkpoint_verifies_and_loads_with_its_record(tmp_path):
    path = tmp_path / "step=3.ckpt"
    record = save_checkpoint_file(checkpoint(3), path)
    assert read_record(path) == record and record["global_step"] == 3
    assert record["bytes"] == path.stat().st_size
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.full((1000,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.ckpt", "step=3.ckpt.json"]


def test_zeroed_bytes_and_truncation_are_refused_naming_the_file(tmp_path):
    damaged, truncated = tmp_path / "damaged.ckpt", tmp_path / "truncated.ckpt"
    for path in (damaged, truncated):
        save_checkpoint_file(checkpoint(5, size=100_000), path)
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # inside the tensor data: torch.load alone would not notice
    damaged.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])

    with pytest.raises(CheckpointError, match=f"checkpoint {damaged} is damaged"):
        load_checkpoint_file(damaged)
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is truncated"):
        load_checkpoint_file(truncated)
    # Without the record, a truncated file is still refused by name, not with a bare OSError.
    record_path(truncated).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} cannot be read"):
        load_checkpoint_file(truncated)


def test_a_kill_between_the_two_renames_leaves_the_old_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint_file(checkpoint(6), path)
    old_bytes = path.read_bytes()
    save_checkpoint_file(checkpoint(12), path)
    # The state a kill after the record's rename and before the checkpoint's leaves behind.
    path.write_bytes(old_bytes)
    assert verify_checkpoint(path)["global_step"] == 6
    assert load_checkpoint_file(path)["global_step"] == 6


SAVE_FOREVER = """
import sys, torch
from xm2.checkpoint import save_checkpoint_file
path = sys.argv[1]
step = 0
while True:
    step += 1
    save_checkpoint_file({"global_step": step, "w": torch.randn(4_000_000)}, path)
"""


def test_sigkill_during_saves_never_leaves_a_bad_checkpoint_and_orphans_are_cleared(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], env=env)
        deadline = time.monotonic() + 60
        # Kill while a new save is being written, once a complete one exists.
        while not (record_path(path).exists() and partial_path(path).exists()):
            assert time.monotonic() < deadline, "the writer never got to a second save"
            time.sleep(0.005)
        time.sleep(0.01 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        saved = load_checkpoint_file(path)  # verified against its record, or raises
        assert saved["w"].shape == (4_000_000,)
    VerifiedCheckpointIO().save_checkpoint(checkpoint(1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.json"]


FILL_THE_DISK = """
import resource, signal, sys, torch
from xm2.checkpoint import save_checkpoint_file
from xm2.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # a disk with 1 MB free
try:
    save_checkpoint_file({"w": torch.randn(1_000_000)}, sys.argv[1])
except CheckpointError as error:
    print(error)
"""


def test_a_save_that_runs_out_of_space_leaves_no_file_under_any_name(tmp_path):
    path = tmp_path / "step=9.ckpt"
    result = subprocess.run([sys.executable, "-c", FILL_THE_DISK, str(path)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert f"saving checkpoint {path} failed" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=f"checkpoint folder {blocker / 'runs'} is not writable"):
        check_writable(blocker / "runs")
    check_writable(tmp_path / "fine")


def test_last_finds_the_furthest_checkpoint_of_the_named_run(tmp_path):
    for folder, step, name in (("a", 6, "run"), ("a", 12, "run"), ("b", 30, "other")):
        data = checkpoint(step)
        data["xm2"]["record"]["run_name"] = name
        save_checkpoint_file(data, tmp_path / folder / f"step={step}.ckpt")
    assert find_last_checkpoint(tmp_path, "run", "xm2") == tmp_path / "a" / "step=12.ckpt"
    with pytest.raises(CheckpointError, match="no checkpoint of run 'missing'"):
        find_last_checkpoint(tmp_path, "missing", "xm2")


def test_training_a_tokenizer_never_overwrites_a_different_one(tmp_path):
    output = tmp_path / "unigram-512.model"
    train_tokenizer(512, CORPUS, output, max_lines=3000)
    before = output.read_bytes()
    assert train_tokenizer(512, CORPUS, output, max_lines=3000) == output  # same one: no-op
    with pytest.raises(ConfigError, match=f"tokenizer {output} exists"):
        train_tokenizer(512, CORPUS, output, max_lines=2000)
    assert output.read_bytes() == before
    train_tokenizer(512, CORPUS, output, max_lines=2000, overwrite=True)
    assert output.read_bytes() != before


def test_comparison_refuses_run_defining_changes_and_applies_the_rest():
    saved = resume.flatten({"model": {"architecture": {"hidden_size": 64}, "optimizer": {"lr": 0.01},
                                      "schedule": {"decay_start_step": 8, "warmup_steps": 2}},
                            "data": {"batch_size": 4, "num_workers": 0, "decay": {"code": 1.0}},
                            "trainer": {"max_steps": 12, "precision": "32-true"}})
    current = resume.flatten({"model": {"architecture": {"hidden_size": 64}, "optimizer": {"lr": 0.02},
                                        "schedule": {"decay_start_step": 6, "warmup_steps": 2}},
                              "data": {"batch_size": 4, "num_workers": 2, "decay": {"code": 1.0}},
                              "trainer": {"max_steps": 20, "precision": "32-true"}})
    as_resume = resume.compare(saved, current, "resume")
    assert set(as_resume.refused) == {"model.optimizer.lr", "model.schedule.decay_start_step"}
    assert set(as_resume.applied) == {"data.num_workers", "trainer.max_steps"}
    as_branch = resume.compare(saved, current, "branch")
    assert set(as_branch.refused) == {"model.optimizer.lr"}
    assert set(resume.compare(saved, current, "evaluate").refused) == set()
    message = resume.refusal_message("x.ckpt", "resume", as_resume.refused)
    assert "model.optimizer.lr: 0.01 in the checkpoint, 0.02 here" in message


def test_a_mismatched_tokenizer_is_refused_when_a_data_module_loads_the_checkpoint(tokenizer_path,
                                                                                  tmp_path):
    from xm2.data.datamodule import MixtureDataModule

    module = MixtureDataModule(corpus_dir=str(CORPUS), tokenizer_path=str(tokenizer_path),
                               vocab_size=512)
    module.load_state_dict(module.state_dict())
    with pytest.raises(CheckpointError, match="was trained with the tokenizer of SHA-256 0000"):
        module.load_state_dict({"tokenizer_sha256": "0" * 64})


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of ``path`` (by default the middle one, inside the tensor data)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_without_a_record_warns_once_per_file(tmp_path, capsys):
    path = tmp_path / "copied.ckpt"
    save_checkpoint_file(checkpoint(4), path)
    record_path(path).unlink()
    load_checkpoint_file(path, mmap=True)  # as validate/resume check --ckpt_path
    VerifiedCheckpointIO().load_checkpoint(path)  # Lightning's load then: no second warning
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"xm2: warning: checkpoint {path} has no record") and \
        "cannot be verified" in warning


def test_a_copy_without_its_record_is_loaded_only_with_a_warning_until_vouched_for(
        tiny_checkpoint, tmp_path):
    copied = tmp_path / "copied.ckpt"
    shutil.copy(tiny_checkpoint, copied)  # as `scp` without the .json beside it
    flip_byte(copied)
    generated = console("generate", str(copied), "--prompt", "Once", "--max_new_tokens", "2",
                        cwd=tmp_path)
    # Damage that torch.load does not notice: it still runs, but says it could not check.
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert ("xm2: warning: checkpoint " + str(copied) + " has no record (copied.ckpt.json), so "
            "it cannot be verified: damage to it would go unnoticed") in generated.stderr
    unverified = one_line_error(console("verify", str(copied), cwd=tmp_path))
    assert unverified == (f"xm2: error: checkpoint {copied} has no record (copied.ckpt.json), so "
                          "it cannot be verified; if you know where it came from and vouch for "
                          f"it, write one with `xm2 verify {copied} --write_record true`")

    vouched = tmp_path / "vouched.ckpt"
    shutil.copy(tiny_checkpoint, vouched)
    written = console("verify", str(vouched), "--write_record", "true", cwd=tmp_path)
    assert written.returncode == 0, written.stderr[-2000:]
    record = json.loads(record_path(vouched).read_text())
    assert record["sha256"] == json.loads(record_path(tiny_checkpoint).read_text())["sha256"]
    assert record["global_step"] == 7 and record["vouched_for"] == "xm2 verify --write_record"
    flip_byte(vouched)
    refused = one_line_error(console("generate", str(vouched), "--prompt", "Once",
                                     cwd=tmp_path))
    assert refused.startswith(f"xm2: error: checkpoint {vouched} is damaged: ")


EVIL = """
import os, sys, torch
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
torch.save({"global_step": 1, "state_dict": {}, "hook": RunsCode()}, sys.argv[1])
"""


SYSTEM = f"{os.system.__module__}.system"  # posix.system where the tests run


def write_file_that_runs_code(path: Path, marker: Path) -> None:
    """A torch file whose unpickling runs ``touch marker`` (what a hostile checkpoint does)."""
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], check=True)


def test_a_file_that_runs_code_is_refused_in_one_line_without_torchs_advice(tmp_path):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    write_file_that_runs_code(evil, marker)
    refusal = (f"xm2: error: checkpoint {evil} holds objects other than tensors and plain data "
               f"(such as {SYSTEM}), which can run code when loaded; xm2 does not load "
               "such files")
    result = console("verify", str(evil), "--write_record", "true", cwd=tmp_path)
    assert one_line_error(result) == refusal
    assert "weights_only" not in result.stderr  # torch's advice to retry without it is gone
    assert not marker.exists() and not record_path(evil).exists()
    with pytest.raises(CheckpointError) as caught:  # the path every loader takes
        load_checkpoint_file(evil)
    assert f"xm2: error: {caught.value}" == refusal and not marker.exists()


def test_consolidating_a_folder_whose_metadata_runs_code_is_refused_in_one_line(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step=6.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP saving without a process group says so
        dcp.save({"state_dict": {"model.w": torch.ones(4)}}, checkpoint_id=folder)
    marker = tmp_path / "code-ran"
    write_file_that_runs_code(folder / "meta.pt", marker)
    line = one_line_error(console("consolidate-checkpoint", str(folder), cwd=tmp_path))
    assert line == (f"xm2: error: checkpoint metadata {folder / 'meta.pt'} holds objects other "
                    f"than tensors and plain data (such as {SYSTEM}), which can run code "
                    "when loaded; xm2 does not load such files")
    assert not marker.exists() and not list(tmp_path.glob("*.consolidated.ckpt"))


def test_path_helpers_keep_partial_files_hidden_beside_the_target():
    assert partial_path(Path("/a/b/last.ckpt")) == Path("/a/b/.last.ckpt.partial")
    assert record_path(Path("/a/b/last.ckpt")) == Path("/a/b/last.ckpt.json")
