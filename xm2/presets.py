"""The presets shipped inside xm2: the YAML files of the top-level ``config/`` folder.

``config/`` stays where a reader of the repository expects it, and pyproject.toml maps it into
the package as ``xm2._presets``, so a wheel carries it and an editable install reads the checkout's
files. Code finds a preset here with :mod:`importlib.resources`, never by walking up from
``__file__``, so an installed xm2 finds its presets from any folder.

A preset's name is its path below ``config/``: ``nano.yaml``, ``model/tiny.yaml``,
``trainer/fsdp2.yaml``. This module imports only the standard library and xm2.errors: the
command's start-up stays fast.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from xm2.errors import ConfigError

if TYPE_CHECKING:
    from importlib.abc import Traversable

PACKAGE = "xm2._presets"
# The folder the recipes and the docs name the presets by: `--config config/nano.yaml`.
FOLDER = "config"


def preset_names() -> list[str]:
    """Every shipped preset, by its name below config/ (``model/tiny.yaml``), sorted."""
    names = []
    pending = [(resources.files(PACKAGE), PurePosixPath())]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                pending.append((entry, prefix / entry.name))
            elif entry.name.endswith((".yaml", ".yml")):
                names.append(str(prefix / entry.name))
    return sorted(names)


def preset(name: str) -> Traversable:
    """The shipped preset ``name`` (its path below config/, e.g. ``model/tiny.yaml``)."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"no preset {name!r} ships with xm2; the presets are: "
                          f"{', '.join(names)}")
    found = resources.files(PACKAGE)
    # One part at a time: Python 3.11's namespace-package path joins a single name.
    for part in PurePosixPath(name).parts:
        found = found / part
    return found


def preset_name(path: str) -> str | None:
    """The shipped preset that ``path`` names (``config/<name>`` or ``<name>``), else None."""
    posix = Path(path).as_posix()
    names = preset_names()
    for candidate in (posix, posix.removeprefix(f"{FOLDER}/")):
        if candidate in names:
            return candidate
    return None


def resolve_config(path: str) -> str:
    """The config file to read for ``path``: ``path`` itself when it exists (relative to the
    working folder, or absolute), else the shipped preset it names as ``config/<name>`` or
    ``<name>``, so ``xm2 fit --config config/nano.yaml`` works from any folder.

    Anything else comes back unchanged, for the caller's parser to read or reject (jsonargparse
    also takes a YAML string in place of a file).
    """
    try:
        if Path(path).exists():
            return path
    except (OSError, ValueError):  # a YAML string too long, or with a NUL, for a file name
        return path
    name = preset_name(path)
    if name is None:
        return path
    found = preset(name)
    if not isinstance(found, Path):
        raise ConfigError(f"preset {name!r} is inside {found}, which is not a folder on disk; "
                          "install xm2 from a wheel or a checkout (pip install -e .)")
    return str(found)
