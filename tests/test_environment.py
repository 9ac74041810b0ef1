"""environment.yml (for conda users) lists the same dependencies as pyproject.toml."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's.
CONDA_NAMES = {"torch": "pytorch"}
# What the jsonargparse[signatures] extra pulls in on PyPI.
EXTRA_PACKAGES = {"docstring_parser", "typeshed_client"}


def split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)$", requirement).groups()
    return name.lower().replace("-", "_"), spec.replace(" ", "")


def test_conda_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(split(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    wanted = {CONDA_NAMES.get(name, name): spec for name, spec in wanted.items()}
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(split(d) for d in environment["dependencies"]
                 if isinstance(d, str) and not d.startswith(("python=", "pip")))
    assert set(conda) - EXTRA_PACKAGES == set(wanted)
    for name, spec in wanted.items():
        assert conda[name] == spec, f"{name}: environment.yml says {conda[name]!r}, pyproject {spec!r}"
