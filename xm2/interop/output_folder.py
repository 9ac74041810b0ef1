"""Output folders written whole or not at all: staged beside the target, then renamed in."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xm2.errors import ConfigError


def unwritable(output: Path, error: OSError) -> ConfigError:
    """The one-line error for an output folder that a failed write (``error``) cannot make."""
    where = f" ({error.filename})" if error.filename else ""
    fix = {errno.ENOSPC: "free some space, or give --output a folder on another disk",
           errno.ENOTDIR: "a part of its path is a file: give --output a folder"
           }.get(error.errno, "give --output a folder on a filesystem you can write")
    return ConfigError(f"cannot write the output folder {output}: {error.strerror or error}"
                       f"{where}; nothing was written there; {fix}")


def _is_output_error(error: OSError, output: Path) -> bool:
    """Whether ``error`` is about the output (the folder, its staging copy beside it, their files)
    rather than about an input read while writing."""
    if not error.filename:
        return True
    return Path(error.filename).resolve().is_relative_to(output.parent.resolve())


def staging_folder(output: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``output``; refuses to replace a non-empty folder silently."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} exists and is not empty; name a new folder or pass "
                          "--overwrite true to replace it")
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise unwritable(output, error) from error
    return staging


def publish_folder(staging: Path, output: Path) -> None:
    """Put the finished staging folder in place of ``output``: never a half-written folder."""
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        if old.exists() and not output.exists():
            old.rename(output)  # the previous folder back in its place
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def written_whole(output: Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder to write ``output`` into, put in its place when the block ends.

    If the block raises, the staging folder is removed and ``output`` is as it was; a failed
    write there (read-only filesystem, full disk) is an error naming ``output``.
    """
    staging = staging_folder(output, overwrite)
    try:
        yield staging
        publish_folder(staging, output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and _is_output_error(error, output):
            raise unwritable(output, error) from error
        raise
