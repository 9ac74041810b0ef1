"""Checkpoint files you can trust: atomic on any filesystem, verified by a digest beside each.

A checkpoint ``P`` is written as ``.P.partial`` in the same folder, fsynced, and renamed over ``P``,
so a reader sees the old file or the new one, never a part of one, whatever the filesystems of the
temporary folder and the checkpoints (a rename across filesystems is a copy that a kill can cut).
Beside it, ``P.json`` records the file's SHA-256 and size and what the run was (step, tokens,
MLflow run); it is written before the rename and keeps the previous digest too, so a kill between
the two renames leaves a pair that still verifies. Loading checks the digest and refuses a damaged
or truncated file by name; a checkpoint without a record (copied without it) loads only with a
warning that it cannot be verified, until ``xm2 verify <ckpt> --write_record true`` writes one.
Every file is loaded with ``weights_only=True``; one that needs more is refused, never retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from xm2.errors import CheckpointError

PARTIAL_PREFIX, PARTIAL_SUFFIX = ".", ".partial"
SHARDED_METADATA = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor state


def record_path(path: str | Path) -> Path:
    """The JSON record written beside checkpoint ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{path.name}{PARTIAL_SUFFIX}")


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the folder entry is on disk.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_partial(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through ``write(file)`` into a fsynced partial file beside ``path``; return it.

    On any failure (a full disk, an interrupt) the partial file is removed: nothing half-written
    survives under any name.
    """
    partial = partial_path(path)
    try:
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def read_record(path: str | Path) -> dict | None:
    """The record beside checkpoint ``path``, or None for a checkpoint written without one."""
    record = record_path(path)
    if not record.is_file():
        return None
    try:
        found = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        found = error
    if not (isinstance(found, dict) and isinstance(found.get("sha256"), str)
            and isinstance(found.get("bytes"), int)):
        reason = found if isinstance(found, Exception) else "no sha256 and bytes"
        raise CheckpointError(
            f"checkpoint record {record} is damaged ({reason}); restore it from where the "
            f"checkpoint came from, or, if you vouch for {Path(path).name}, delete the record and "
            f"write a new one with `xm2 verify {path} --write_record true`")
    return found


def _write_record(path: Path, record: dict) -> None:
    """Write ``record`` beside checkpoint ``path`` atomically (partial file, fsync, rename)."""
    target = record_path(path)
    _write_partial(target, lambda file: file.write(json.dumps(record, indent=2).encode())
                   ).replace(target)


def save_checkpoint_file(checkpoint: dict, path: str | Path) -> dict:
    """Write ``checkpoint`` to ``path`` atomically with its digest record; return the record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        _write_partial(path, lambda file: torch.save(checkpoint, file))
        try:
            previous = read_record(path) if path.exists() else None
        except CheckpointError:
            previous = None  # a damaged record vouches for nothing
        record = {
            "file": path.name,
            "sha256": sha256_of(partial),
            "bytes": partial.stat().st_size,
            **checkpoint.get("xm2", {}).get("record", {}),
            # A kill between the two renames below leaves the old file with the new record:
            # the old record, kept here, still vouches for it.
            "previous": {k: v for k, v in previous.items() if k != "previous"} if previous else None,
        }
        _write_record(path, record)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise  # an interrupt stays an interrupt
        raise CheckpointError(
            f"saving checkpoint {path} failed ({type(error).__name__}: {error}); nothing was written "
            "under its name and earlier checkpoints are intact. Is the disk full?"
        ) from error
    partial.replace(path)
    _fsync_dir(path.parent)
    return record


_verified_digests: dict[tuple[str, int, int], str] = {}


def verify_checkpoint(path: str | Path) -> dict | None:
    """Check ``path`` against its record; raise :class:`CheckpointError` naming the file if not.

    Returns the record that matches the file, or None for a checkpoint without one (copied
    without it, or written before records existed), which cannot be checked:
    :func:`load_checkpoint_file` loads it with a warning, ``xm2 verify`` can give it a record.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    record = read_record(path)
    if record is None:
        return None
    stat = path.stat()
    size = stat.st_size
    # The CLI checks a checkpoint before Lightning loads it: hash each unchanged file once.
    key = (str(path.resolve()), size, stat.st_mtime_ns)
    digest = _verified_digests.get(key) or sha256_of(path)
    _verified_digests[key] = digest
    if digest == record["sha256"] and size == record["bytes"]:
        return record
    previous = record.get("previous")
    if previous and digest == previous["sha256"] and size == previous["bytes"]:
        # The save after this one was cut between its two renames: this file is the intact one.
        return previous
    what = "truncated" if size < record["bytes"] else "damaged"
    raise CheckpointError(
        f"checkpoint {path} is {what}: {size} bytes with SHA-256 {digest[:16]}…, but it was written "
        f"as {record['bytes']} bytes with SHA-256 {record['sha256'][:16]}…; resume from another "
        "checkpoint of the run"
    )


_WEIGHTS_ONLY_FAILURE = "Weights only load failed"  # how torch.load words such a refusal


def load_weights_only(path: str | Path, what: str | None = None, map_location: Any = "cpu",
                      mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a file holding other objects is refused by name
    (``what``, default ``checkpoint <path>``).

    torch's own refusal advises retrying with ``weights_only=False``, which runs whatever code
    such a file carries: the wrong advice for a file from elsewhere, so it is not passed on.
    Other failures (a truncated file, not a torch file) are torch's errors, for the caller to word.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if _WEIGHTS_ONLY_FAILURE not in str(error):
            raise
        wanted = re.search(r"GLOBAL (\S+)", str(error))
        asks = f" (such as {wanted.group(1)})" if wanted else ""
        raise CheckpointError(
            f"{what or f'checkpoint {path}'} holds objects other than tensors and plain data"
            f"{asks}, which can run code when loaded; xm2 does not load such files") from None


def _read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """:func:`load_weights_only`, with torch's other failures worded as a damaged checkpoint."""
    try:
        return load_weights_only(path, map_location=map_location, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is truncated "
            "or not a checkpoint"
        ) from error


_warned_unverified: set[str] = set()


def warn_unverified(path: str | Path) -> None:
    """Say, once per file and process, that checkpoint ``path`` has no record to check it by."""
    key = str(Path(path).resolve())
    if key in _warned_unverified:
        return
    _warned_unverified.add(key)
    print(f"xm2: warning: checkpoint {path} has no record ({record_path(path).name}), so it "
          "cannot be verified: damage to it would go unnoticed. If you know where it came from "
          f"and vouch for it, write its record with `xm2 verify {path} --write_record true`",
          file=sys.stderr, flush=True)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Verify and load a checkpoint with ``weights_only=True``; errors name the file.

    A checkpoint without a record loads with a warning (:func:`warn_unverified`).
    """
    if verify_checkpoint(path) is None:
        warn_unverified(path)
    return _read_checkpoint(path, map_location=map_location, mmap=mmap)


def verify_command(checkpoint: str, write_record: bool = False) -> dict:
    """Check a checkpoint file against its digest record, or write a record for one you vouch for.

    A checkpoint passes when its size and SHA-256 are those its record (<checkpoint>.json)
    was written with and it holds only tensors and plain data (it loads with weights_only=True).
    A checkpoint copied without its record loads only with a warning; give it one here.

    Args:
        checkpoint: A checkpoint file (.ckpt).
        write_record: The file has no record and you vouch for it as it is (you know where it
            came from): write <checkpoint>.json with its digest, after checking that it loads
            with weights_only=True. From then on any change to the file is refused.
    """
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a sharded checkpoint folder, which has no xm2 record (its shards are "
            f"torch.distributed.checkpoint's); join it into one file with `xm2 consolidate-"
            f"checkpoint {path}` and verify that")
    mismatch = None
    try:
        record = verify_checkpoint(path)
    except CheckpointError as error:
        if not (write_record and record_path(path).is_file() and path.is_file()):
            raise
        mismatch = error
    if mismatch is not None:  # raised outside the handler: this message, not the one it extends
        raise CheckpointError(f"{mismatch}. It has a record already: if you vouch for the file "
                              f"as it is, delete {record_path(path)} and run this again")
    if record is None and not write_record:
        raise CheckpointError(
            f"checkpoint {path} has no record ({record_path(path).name}), so it cannot be "
            "verified; if you know where it came from and vouch for it, write one with "
            f"`xm2 verify {path} --write_record true`")
    loaded = _read_checkpoint(path, mmap=True)  # mapped, not read: any size is checked quickly
    step = loaded.get("global_step") if isinstance(loaded, dict) else None
    if record is not None:
        print(f"{path}: matches its record ({record['bytes']:,} bytes, SHA-256 "
              f"{record['sha256'][:16]}…, step {record.get('global_step', step)}) and holds only "
              "tensors and plain data")
        return record
    embedded = ((loaded.get("xm2") or {}).get("record") or {}) if isinstance(loaded, dict) else {}
    record = {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size,
              **embedded, "previous": None, "vouched_for": "xm2 verify --write_record"}
    _write_record(path, record)
    print(f"{path}: wrote {record_path(path).name} ({record['bytes']:,} bytes, SHA-256 "
          f"{record['sha256'][:16]}…, step {record.get('global_step', step)}); it loads without a "
          "warning from now on, and any change to it is refused")
    return record


def remove_partial_files(directory: str | Path) -> list[Path]:
    """Delete partial files that a killed save left in ``directory``; return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    orphans = [p for p in directory.iterdir()
               if p.name.startswith(PARTIAL_PREFIX) and p.name.endswith(PARTIAL_SUFFIX)]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def check_writable(directory: str | Path) -> None:
    """Refuse to start training into a checkpoint folder that cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f"{PARTIAL_PREFIX}write-probe-{os.getpid()}{PARTIAL_SUFFIX}"
        probe.write_bytes(b"xm2")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"checkpoint folder {directory} is not writable ({error.strerror}); set "
            "trainer.default_root_dir (or the ModelCheckpoint dirpath) to a folder you can write"
        ) from error


def sharded_metadata(path: str | Path) -> dict:
    """The non-tensor part of a sharded (distributed) checkpoint folder: its ``meta.pt``.

    A sharded checkpoint is a folder of DCP shards written by all ranks; its integrity is DCP's
    (``.metadata``), and xm2's record lives in ``meta.pt`` under ``xm2``.
    """
    meta = Path(path) / SHARDED_METADATA
    if not meta.is_file():
        raise CheckpointError(f"checkpoint folder {path} has no {SHARDED_METADATA}; it is not a "
                              "sharded xm2 checkpoint, or its save was interrupted")
    try:
        return load_weights_only(meta, what=f"checkpoint metadata {meta}")
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint metadata {meta} cannot be read ({type(error).__name__}: "
                              f"{error}); the folder's save was interrupted or it was damaged; "
                              "use another checkpoint of the run") from error


def find_checkpoints(root: str | Path) -> list[tuple[Path, dict]]:
    """Every checkpoint under ``root`` with a record (files) or metadata (sharded folders)."""
    found = []
    for record_file in Path(root).rglob("*.ckpt.json"):
        checkpoint = record_file.with_name(record_file.name[: -len(".json")])
        if checkpoint.is_file():
            try:
                found.append((checkpoint, json.loads(record_file.read_text())))
            except json.JSONDecodeError:
                continue
    for meta in Path(root).rglob(f"*.ckpt/{SHARDED_METADATA}"):
        try:
            record = (sharded_metadata(meta.parent).get("xm2") or {}).get("record")
        except CheckpointError:
            continue
        if record:
            found.append((meta.parent, record))
    return found


def find_last_checkpoint(root: str | Path, run_name: str | None, experiment: str | None) -> Path:
    """The checkpoint of the furthest step among runs named ``run_name`` under ``root``.

    This is what ``--ckpt_path last`` means in a fresh process: the checkpoint folder follows the
    MLflow run id, which a new process does not know until it has found the checkpoint.
    """
    candidates = [
        (record.get("global_step", -1), path.stat().st_mtime, path)
        for path, record in find_checkpoints(root)
        if (run_name is None or record.get("run_name") == run_name)
        and (experiment is None or record.get("experiment_name") in (None, experiment))
    ]
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no checkpoint of run {run_name!r} (experiment {experiment!r}) "
            f"under {root}; give a checkpoint path, or check trainer.default_root_dir and the "
            "logger's run_name"
        )
    return max(candidates)[2]


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic saves, digest records and verified loads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("VerifiedCheckpointIO takes no storage_options")
        remove_partial_files(Path(path).parent)
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)
