"""Output folders written whole or not at all: staged beside the target, then renamed in."""

from __future__ import annotations

import shutil
from pathlib import Path

from xm2.errors import ConfigError


def staging_folder(output: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``output``; refuses to replace a non-empty folder silently."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} exists and is not empty; name a new folder or pass "
                          "--overwrite true to replace it")
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_folder(staging: Path, output: Path) -> None:
    """Put the finished staging folder in place of ``output``: never a half-written folder."""
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)
