"""The presets ship inside xm2: a real wheel carries every config/ YAML file, and an installed xm2
finds `config/<name>` from any folder (xm2/presets.py)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xm2.presets import preset, preset_names, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
# What `pip wheel .` reads: the project's metadata and the folders its packages come from.
SOURCES = ("pyproject.toml", "README.md", "xm2", "callbacks", "config")


def config_files() -> list[str]:
    return sorted(path.relative_to(CONFIG).as_posix() for path in CONFIG.rglob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the checkout (the build writes build/ and egg-info
    next to its sources; a copy keeps that out of the working tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (found,) = out.glob("xm2-*.whl")
    return found


def test_wheel_carries_every_preset_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing_presets = [name for name in config_files() if f"xm2/_presets/{name}" not in names]
    assert not missing_presets, f"config/ files missing from the wheel: {missing_presets}"
    # pyproject.toml lists the packages (the presets package is mapped, not found): a new package
    # folder must be added there, or its modules silently stay out of the wheel.
    modules = [path.relative_to(ROOT).as_posix() for folder in ("xm2", "callbacks")
               for path in (ROOT / folder).rglob("*.py") if "__pycache__" not in path.parts]
    missing_modules = [name for name in modules if name not in names]
    assert not missing_modules, ("modules missing from the wheel (add their package to "
                                 f"[tool.setuptools] packages in pyproject.toml): {missing_modules}")


def test_installed_wheel_finds_presets_outside_a_checkout(wheel, tmp_path):
    """The wheel unpacked as site-packages, run from a folder with no config/ in it."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from xm2.presets import preset_names, resolve_config; "
              "print(resolve_config('config/model/tiny.yaml')); print(len(preset_names()))")
    # -S: no site-packages, so neither the checkout's editable install nor its folder is seen.
    result = subprocess.run([sys.executable, "-S", "-c", script, str(site)], cwd=elsewhere,
                            check=True, capture_output=True, text=True)
    path, count = result.stdout.split()
    assert Path(path) == site / "xm2" / "_presets" / "model" / "tiny.yaml"
    assert Path(path).read_text() == (CONFIG / "model" / "tiny.yaml").read_text()
    assert int(count) == len(config_files())


def test_resolve_config_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = (CONFIG / "model" / "tiny.yaml").read_text()
    assert Path(resolve_config("config/model/tiny.yaml")).read_text() == tiny
    assert Path(resolve_config("model/tiny.yaml")).read_text() == tiny
    assert preset_names() == config_files()
    assert preset("model/tiny.yaml").read_text() == tiny
    # A file of that name in the working folder wins over the shipped preset.
    local = tmp_path / "config" / "model" / "tiny.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("model: {}\n")
    assert resolve_config("config/model/tiny.yaml") == "config/model/tiny.yaml"
    # Anything else is the caller's parser's to read or reject (also an inline YAML string).
    assert resolve_config("config/model/huge.yaml") == "config/model/huge.yaml"
    assert resolve_config("{trainer: {max_steps: 2}}") == "{trainer: {max_steps: 2}}"
    with pytest.raises(ValueError, match="model/huge.yaml.*model/tiny.yaml"):
        preset("model/huge.yaml")
