"""Bad inputs give one line that names the key or file and the fix, and no traceback.

The data and configuration checks are tested in-process; a few representative cases go through
the real ``xm2`` console script, where the absence of a traceback is what is being tested.
"""

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT
from xm2 import errors, preflight
from xm2.cli import main
from xm2.data.corpus import load_manifest, read_documents, split_path
from xm2.data.shards import open_shard, shard_problem
from xm2.data.tokenizer import file_digest, load_tokenizer
from xm2.errors import ConfigError, DataError, TrackingError, Xm2Error
from xm2.lightning_cli import validate_command

CONSOLE_SCRIPT = Path(sys.executable).parent / "xm2"


def one_line_error(result) -> str:
    """The single error line of a failed command; fails if a traceback or more came with it."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("xm2: error: ")
    return line


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    """A private copy of the session's shards, to damage."""
    return Path(shutil.copytree(shards, tmp_path / shards.name))


def test_truncated_shard_is_refused_by_name(shard_copy):
    array = shard_copy / "prose" / "train.bin"
    array.write_bytes(array.read_bytes()[:1000])
    with pytest.raises(DataError, match=rf"token shard {array} is damaged: 1000 bytes.*"
                                        r"delete .*train.json and `xm2 fit` writes"):
        open_shard(shard_copy, "prose", "train")


def test_garbage_shard_is_found_before_a_batch_is_read(shard_copy):
    array = shard_copy / "code" / "val.bin"
    garbage = np.full(array.stat().st_size // 2, 65000, dtype=np.uint16)
    garbage.tofile(array)
    with pytest.raises(DataError, match="token id 65000 is outside its tokenizer's vocabulary "
                                        "of 512"):
        open_shard(shard_copy, "code", "val")


def test_corrupt_meta_file_is_named(shard_copy):
    meta = shard_copy / "docs" / "train.json"
    meta.write_text('{"dtype": "uint16", "tok')
    with pytest.raises(DataError, match=rf"token shard meta file {meta} is damaged"):
        open_shard(shard_copy, "docs", "train")


def test_tokenize_announces_and_rewrites_a_damaged_shard(shard_copy, tokenizer_path, tmp_path):
    # Shards are a cache of the corpus: a damaged one is written again, and says so in one line.
    array = shard_copy / "prose" / "val.bin"
    intact = array.read_bytes()
    array.write_bytes(intact[:10])
    result = console("tokenize", "--tokenizer_path", str(tokenizer_path), "--corpus_dir",
                     str(CORPUS), "--shards_dir", str(shard_copy.parent), "--sources", "[prose]",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"xm2: token shard {array} is damaged: 10 bytes, but its meta file records "
        f"{len(intact) // 2} uint16 tokens ({len(intact)} bytes); rewriting the shard from "
        f"{CORPUS}/prose/val.jsonl.gz"]
    assert array.read_bytes() == intact and shard_problem(array.with_suffix(".json")) is None


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    corpus = tmp_path / "corpus"
    (corpus / "prose").mkdir(parents=True)
    shutil.copy(CORPUS / "manifest.json", corpus)
    shutil.copy(CORPUS / "prose" / "val.jsonl.gz", corpus / "prose")
    return corpus


def test_truncated_corpus_file_is_named(corpus_copy):
    path = corpus_copy / "prose" / "val.jsonl.gz"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=rf"corpus file {path} is damaged .*EOFError.*Restore"):
        list(read_documents(corpus_copy, "prose", "val"))


def test_corpus_file_that_is_not_gzip_is_named(corpus_copy):
    path = corpus_copy / "prose" / "val.jsonl.gz"
    path.write_text('{"text": "plain, not compressed"}\n')
    with pytest.raises(DataError, match=rf"corpus file {path} is damaged .*BadGzipFile"):
        list(read_documents(corpus_copy, "prose", "val"))


def test_corrupt_manifest_is_named(corpus_copy):
    (corpus_copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        load_manifest(corpus_copy)


def test_text_file_given_as_tokenizer_is_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(ConfigError, match=rf"tokenizer {text} is not a SentencePiece model file"):
        load_tokenizer(text)


@pytest.mark.parametrize("value", [0, -2])
def test_accumulate_grad_batches_below_one_is_refused(value):
    with pytest.raises(ConfigError, match=rf"trainer.accumulate_grad_batches={value} must be an "
                                          "integer >= 1"):
        preflight.check_trainer({"accumulate_grad_batches": value, "max_steps": 10})


@pytest.mark.parametrize("devices", [0, "0", [], -2, "-3", "two", [0, -1], ","])
def test_devices_lightning_cannot_run_on_are_refused(devices):
    with pytest.raises(ConfigError, match=rf"trainer.devices={re.escape(str(devices))} must be "
                                          r"'auto', a number of devices >= 1, -1 \(every GPU\)"):
        preflight.check_trainer({"devices": devices, "accumulate_grad_batches": 1})


@pytest.mark.parametrize(("devices", "on_cpu"), [("auto", True), (1, True), ("2", True),
                                               (-1, False), ("-1", False), ([0, 1], False),
                                               ("0,", False), ("0,1", False)])
def test_devices_lightning_runs_on_are_accepted_and_gpu_ones_refused_on_cpu(devices, on_cpu):
    preflight.check_trainer({"devices": devices, "accumulate_grad_batches": 1})
    on_the_cpu = {"devices": devices, "accelerator": "cpu", "accumulate_grad_batches": 1}
    if on_cpu:
        preflight.check_trainer(on_the_cpu)
        return
    # -1 and device indices mean GPUs: with the CPU, Lightning raises a TypeError.
    with pytest.raises(ConfigError, match=rf"trainer.devices={re.escape(str(devices))} must be "
                                          "'auto' or a number of processes >= 1 with "
                                          r"trainer.accelerator=cpu \(-1 and device indices"):
        preflight.check_trainer(on_the_cpu)


def test_a_store_under_a_file_or_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("a file\n")
    with pytest.raises(TrackingError, match=rf"store {tmp_path}/notes.txt/runs/mlflow.db .*cannot "
                                            rf"be created: its parent {tmp_path}/notes.txt is a "
                                            "file, not a folder"):
        preflight.check_tracking_uri(f"sqlite:///{tmp_path}/notes.txt/runs/mlflow.db")
    with pytest.raises(TrackingError, match=rf"store {tmp_path} .*is a folder, not an SQLite file"):
        preflight.check_tracking_uri(f"sqlite:///{tmp_path}")


def test_unreachable_tracking_server_fails_in_seconds_naming_the_url():
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking server http://127.0.0.1:{port} does not "
                                            "answer"):
        preflight.check_tracking_uri(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10


def test_a_new_sqlite_store_says_where_runs_go(tmp_path, capsys):
    preflight.check_tracking_uri(f"sqlite:///{tmp_path}/typo/mlflow.db")
    assert f"new MLflow store {tmp_path}/typo/mlflow.db" in capsys.readouterr().err
    existing = tmp_path / "mlflow.db"
    existing.touch()
    preflight.check_tracking_uri(f"sqlite:///{existing}")
    assert capsys.readouterr().err == ""


def test_a_config_replacing_the_callback_list_is_named(tmp_path):
    adds, replaces = tmp_path / "adds.yaml", tmp_path / "replaces.yaml"
    adds.write_text("trainer:\n  callbacks+:\n    - class_path: callbacks.coord_check.CoordCheck\n")
    replaces.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.coord_check.CoordCheck\n")
    recipe = ROOT / "config" / "nano.yaml"
    assert preflight.replaced_callbacks([recipe, adds]) == []
    (note,) = preflight.replaced_callbacks([recipe, replaces])
    assert "dropping LearningRateMonitor, ModelCheckpoint, MixtureMonitor" in note
    assert "`callbacks+:`" in note


def test_errors_wrapped_by_other_libraries_are_unwrapped():
    def raise_wrapped():
        try:
            preflight.check_trainer({"accumulate_grad_batches": 0})
        except ConfigError as error:
            raise RuntimeError("Problem with given class_path") from error

    with pytest.raises(RuntimeError) as caught:
        raise_wrapped()
    assert isinstance(errors.user_error(caught.value), ConfigError)


@pytest.mark.parametrize("kind", [kind for kind in vars(errors).values()
                                  if isinstance(kind, type) and issubclass(kind, Xm2Error)])
def test_every_kind_of_xm2_error_is_one_line(kind):
    error = kind("the message")
    assert errors.user_error(error) is error
    assert errors.message(error) == "xm2: error: the message"


def test_a_built_in_error_raised_by_xm2_keeps_its_traceback():
    # A bug, or a failure xm2 did not foresee: split_path's split is always a literal of xm2's
    # callers, so a bad one is xm2's mistake, not the user's.
    with pytest.raises(ValueError) as unexpected:
        split_path(CORPUS, "prose", "test")
    assert unexpected.traceback[-1].path.is_relative_to(ROOT / "xm2")
    assert not isinstance(unexpected.value, Xm2Error)
    assert errors.user_error(unexpected.value) is None
    with pytest.raises(ValueError) as foreign:
        np.zeros(2).reshape(3)
    assert errors.user_error(foreign.value) is None


def test_validate_hint_starts_the_program_as_fit_was_started():
    command = [".venv/bin/xm2", "fit", "--config", "run.yaml", "--model.optimizer.lr", "0.02",
               "--ckpt_path", "old.ckpt", "--branch_decay_steps=4"]
    assert validate_command(command, "runs/last.ckpt") == (
        ".venv/bin/xm2 validate --config run.yaml --model.optimizer.lr 0.02 "
        "--ckpt_path runs/last.ckpt")
    started_as_module = validate_command(["/x/xm2/cli.py", "fit", "--config", "a b.yaml"], "l.ckpt")
    assert started_as_module == f"{sys.executable} -m xm2.cli validate --config 'a b.yaml' " \
                                "--ckpt_path l.ckpt"


# Through the console script: what a person at a terminal sees.


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_console_script_data_tool_error_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    result = console("tokenize", "--tokenizer_path", "notes.txt", "--corpus_dir", str(CORPUS),
                     cwd=tmp_path)
    assert "notes.txt is not a SentencePiece model file" in one_line_error(result)


def test_console_script_damaged_corpus_is_one_line_and_leaves_no_run(tmp_path, tokenizer_path,
                                                                     corpus_copy):
    shutil.copy(CORPUS / "prose" / "train.jsonl.gz", corpus_copy / "prose")
    damaged = corpus_copy / "prose" / "train.jsonl.gz"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    result = console(
        "fit", "--config", str(ROOT / "config" / "nano.yaml"),
        "--config", str(ROOT / "tests" / "configs" / "smoke.yaml"),
        "--data.corpus_dir", str(corpus_copy), "--data.tokenizer_path", str(tokenizer_path),
        "--data.shards_dir", str(tmp_path / "shards"), "--data.stable", "{prose: 1}",
        "--data.decay", "{prose: 1}",
        "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert f"corpus file {damaged} is damaged" in one_line_error(result)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_console_script_accumulation_of_zero_is_one_line_and_leaves_no_run(tmp_path):
    # (tests/test_cli.py runs the model and mixture errors through the console script.)
    result = console("fit", "--config", str(ROOT / "config" / "nano.yaml"),
                     "--trainer.accumulate_grad_batches", "0",
                     "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                     cwd=tmp_path)
    assert "trainer.accumulate_grad_batches=0" in one_line_error(result)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was even opened


@pytest.fixture
def prose_corpus(corpus_copy) -> Path:
    """A corpus whose prose source has the bundled held-out prose as both splits."""
    shutil.copy(corpus_copy / "prose" / "val.jsonl.gz", corpus_copy / "prose" / "train.jsonl.gz")
    return corpus_copy


def shard_bytes(tokenizer_path, corpus, source: str, split: str) -> int:
    """The size of the token shard of ``source``/``split``: uint16 ids, EOS after each document."""
    encoded = load_tokenizer(tokenizer_path).encode(list(read_documents(corpus, source, split)))
    return 2 * sum(len(ids) + 1 for ids in encoded)


def unmount(mount_point: Path) -> None:
    subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 KiB filesystem (tmpfs; tests run as root), smaller than any shard."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here ({mounted.stderr.strip()}); the file size "
                    "limit test covers the same message")
    yield mount_point
    unmount(mount_point)


def test_a_full_disk_names_the_shard_and_leaves_no_shard(tmp_path, tokenizer_path, prose_corpus,
                                                         small_disk):
    args = ("tokenize", "--tokenizer_path", str(tokenizer_path), "--corpus_dir", "corpus",
            "--shards_dir", "small_disk", "--sources", "[prose]")
    result = console(*args, cwd=tmp_path)
    shard = Path("small_disk", tokenizer_path.stem + "-" + file_digest(tokenizer_path)[:12],
                 "prose", "train.bin")
    assert re.fullmatch(
        rf"xm2: error: no room to write token shard {shard}: the disk is full \(ENOSPC\); it "
        rf"needs {shard_bytes(tokenizer_path, prose_corpus, 'prose', 'train'):,} bytes, "
        r"1[0-9,]+ bytes were written and 1[0-9,]+ bytes are free there\. The partial file was "
        r"removed; free space or point --shards_dir \(data\.shards_dir\) at a disk with room "
        r"and run the command again", one_line_error(result))
    assert [path for path in small_disk.rglob("*") if path.is_file()] == []
    unmount(small_disk)  # room again: the next run writes the shards whole
    assert console(*args, cwd=tmp_path).returncode == 0
    assert shard_problem(tmp_path / shard.with_suffix(".json")) is None


def test_a_file_size_limit_names_the_shard_and_leaves_no_shard(tmp_path, tokenizer_path,
                                                               prose_corpus):
    limit = 10_000
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "tokenize", "--tokenizer_path", str(tokenizer_path), "--corpus_dir",
         "corpus", "--shards_dir", "shards", "--sources", "[prose]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    shard = Path("shards", tokenizer_path.stem + "-" + file_digest(tokenizer_path)[:12], "prose",
                 "train.bin")
    assert re.fullmatch(
        rf"xm2: error: no room to write token shard {shard}: the file size limit is reached "
        rf"\(EFBIG\); it needs {shard_bytes(tokenizer_path, prose_corpus, 'prose', 'train'):,} "
        rf"bytes, {limit:,} bytes were written and .* bytes .*are free there\. The partial file "
        r"was removed; raise the limit \(`ulimit -f`\) or point --shards_dir "
        r"\(data\.shards_dir\) at a disk with room and run the command again",
        one_line_error(result))
    assert [path for path in (tmp_path / "shards").rglob("*") if path.is_file()] == []


def test_console_script_zero_devices_is_one_line_and_leaves_no_store(tmp_path):
    result = console("fit", "--config", str(ROOT / "config" / "nano.yaml"),
                     "--trainer.devices", "0",
                     "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                     cwd=tmp_path)
    assert one_line_error(result) == (
        "xm2: error: trainer.devices=0 must be 'auto', a number of devices >= 1, -1 (every GPU) "
        "or a list of GPU indices such as [0, 1]")
    assert not (tmp_path / "mlflow.db").exists()


def test_console_script_store_under_a_file_is_one_line(tmp_path):
    (tmp_path / "README.md").write_text("# a file, not a folder\n")
    result = console("fit", "--config", str(ROOT / "config" / "nano.yaml"),
                     "--trainer.logger.init_args.tracking_uri", "sqlite:///README.md/mlflow.db",
                     cwd=tmp_path)
    assert one_line_error(result) == (
        "xm2: error: the MLflow store README.md/mlflow.db (tracking_uri "
        "sqlite:///README.md/mlflow.db) cannot be created: its parent README.md is a file, not a "
        "folder; give --trainer.logger.init_args.tracking_uri a file in a folder, e.g. "
        "sqlite:///mlflow.db")


def test_traceback_shown_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv(errors.TRACEBACK_VARIABLE, "1")
    (tmp_path / "notes.txt").write_text("not a model\n")
    result = console("tokenize", "--tokenizer_path", "notes.txt", "--corpus_dir", str(CORPUS),
                     cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "ConfigError: tokenizer notes.txt is not a SentencePiece model file" in result.stderr


def test_an_unknown_command_is_named_before_lightning_is_imported():
    # `predict` is not offered: the recipe has no predict step or data.
    with pytest.raises(SystemExit, match="unknown command 'predict'; the commands are fit, "
                                         "validate, test, train-tokenizer"):
        main(["predict", "--config", "config/nano.yaml"])
