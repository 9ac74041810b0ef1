"""The layers of xm2, checked from the source: every .py under xm2/ and callbacks/ is parsed with
`ast` (nothing is imported), and an import that crosses a layer the wrong way fails.

docs/architecture.md explains the layers; LAYERS and RULES below are the same tables.
"""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xm2", "callbacks")

# The layers, lowest first. A module may import modules of its own layer and of the layers
# before it in this table, never of a layer after it.
LAYERS = [
    ("foundation", "the error kinds, the shipped presets",
     ("xm2/__init__.py", "xm2/errors.py", "xm2/presets.py")),
    ("model core", "the decoder in plain PyTorch, its config, and µP's parameter roles, init "
     "and learning rates (the decoder initialises itself by them)",
     ("xm2/config.py", "xm2/mup.py", "xm2/model.py")),
    ("optimizer, schedule", "AdamW over the µP groups; WSD",
     ("xm2/optimizer.py", "xm2/schedule.py")),
    ("training pieces", "the LightningModule and DataModule, corpus and shards, FSDP2, "
     "checkpoint files, resume rules, run tracking, the memory estimate",
     ("xm2/module.py", "xm2/data/", "xm2/parallel.py", "xm2/checkpoint.py", "xm2/resume.py",
      "xm2/tracking/", "xm2/memory.py")),
    ("analysis", "computations on numbers and models, shared by callbacks, studies, eval and "
     "notebooks: FLOPs, calibration, the context law, multiple-choice scoring",
     ("xm2/analysis/",)),
    ("launch path", "one run built from its configs: LightningCLI, preflight checks, the run API",
     ("xm2/lightning_cli.py", "xm2/preflight.py", "xm2/run.py")),
    ("studies, eval, interop", "many runs; evaluation of checkpoints; other checkpoint formats",
     ("xm2/studies/", "xm2/eval/", "xm2/interop/")),
    ("cli", "the `xm2` command", ("xm2/cli.py",)),
    ("callbacks", "beside the package: what a run records; they import xm2, xm2 never imports "
     "them", ("callbacks/",)),
]

LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
STDLIB = tuple(sorted(sys.stdlib_module_names))


@dataclass(frozen=True)
class Rule:
    """Files (paths, or folders ending in /) that must not import ``forbidden`` (module
    prefixes), or, with ``only``, import nothing but the standard library and ``only``. The
    check covers each import and what the imported xm2 module loads in turn at import time.
    ``module_level``: only imports that run when the file is imported count (imports inside
    functions are how a command starts fast)."""

    files: tuple[str, ...]
    why: str
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    module_level: bool = False


RULES = [
    Rule(("xm2/model.py",), only=("torch", "xm2.config", "xm2.mup", "xm2.errors"),
         why="the decoder is plain PyTorch, readable in one sitting: torch, the standard "
             "library, its config, µP's init rules and the error kinds"),
    Rule(("xm2/config.py", "xm2/mup.py", "xm2/schedule.py"), forbidden=LIGHTNING,
         why="the model's shape, µP and the schedule work without a training framework"),
    Rule(("xm2/",), forbidden=("callbacks",),
         why="callbacks record what a run did; xm2 never depends on them"),
    Rule(("xm2/analysis/",),
         forbidden=(*LIGHTNING, "xm2.studies", "xm2.eval", "xm2.interop", "xm2.cli"),
         why="analyses are computations that callbacks, studies and notebooks share"),
    Rule(("xm2/errors.py",), only=(),
         why="everything raises these: a leaf that imports nothing of xm2 or beyond"),
    Rule(("xm2/cli.py",), forbidden=(*LIGHTNING, "torch"), module_level=True,
         why="`xm2 --help` and the data tools start in a fraction of a second"),
]


@dataclass(frozen=True)
class Import:
    name: str  # the module imported, absolute
    line: int
    module_level: bool  # runs when the file is imported


def path_of(module: str) -> Path | None:
    """The file of an in-tree module, or None."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path``: statements, and import_module/__import__ of a literal name."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, module_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from xm2 import mup` imports the module xm2.mup.
                name = f"{base}.{alias.name}" if path_of(f"{base}.{alias.name}") else base
                found.append(Import(name, node.lineno, module_level))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(
                function, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, node.lineno, module_level))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children_level = False  # annotations only: never runs
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            children_level = False
        else:
            children_level = module_level
        for child in ast.iter_child_nodes(node):
            visit(child, children_level)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def loaded_with(module: str, cache: dict[str, list[str]] | None = None) -> list[str]:
    """What importing the in-tree ``module`` loads: its parent packages, its module-level
    imports, and theirs in turn (in-tree modules are followed; others are listed, not opened)."""
    seen: list[str] = []
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.append(name)
        parts = name.split(".")
        pending += [".".join(parts[:index]) for index in range(1, len(parts))]
        path = path_of(name)
        if path is not None:
            pending += [found.name for found in imports_of(path) if found.module_level]
    return seen


def matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def python_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def covered(path: str, entries: tuple[str, ...]) -> bool:
    return any(path == entry or (entry.endswith("/") and path.startswith(entry))
               for entry in entries)


def breaks(rule: Rule, name: str) -> bool:
    if rule.only is None:
        return matches(name, rule.forbidden)
    # Importing xm2.config runs xm2/__init__.py too: parents of allowed modules are allowed.
    return name.split(".")[0] not in STDLIB and not matches(name, rule.only) and not any(
        allowed.startswith(name + ".") for allowed in rule.only)


def violations(rule: Rule) -> list[str]:
    found = []
    for path in python_files():
        relative = path.relative_to(ROOT).as_posix()
        if not covered(relative, rule.files):
            continue
        for direct in imports_of(path):
            if rule.module_level and not direct.module_level:
                continue
            loaded = loaded_with(direct.name) if path_of(direct.name) else [direct.name]
            bad = [name for name in loaded if breaks(rule, name)]
            if direct.name in bad:
                found.append(f"{relative}:{direct.line} imports {direct.name}")
            else:
                found += [f"{relative}:{direct.line} imports {name} (through {direct.name})"
                          for name in bad]
    return sorted(set(found))


def layer_of(relative: str) -> list[int]:
    return [index for index, (_, _, files) in enumerate(LAYERS) if covered(relative, files)]


def test_every_module_belongs_to_one_layer():
    """The layer table stays complete: a new module gets a row (and a line in the docs)."""
    for path in python_files():
        relative = path.relative_to(ROOT).as_posix()
        layers = [LAYERS[index][0] for index in layer_of(relative)]
        assert len(layers) == 1, f"{relative} is in layers {layers}; add it to LAYERS once"


def test_no_module_imports_a_later_layer():
    broken = []
    for path in python_files():
        relative = path.relative_to(ROOT).as_posix()
        (layer,) = layer_of(relative)
        for found in imports_of(path):
            target = path_of(found.name)
            if target is None:
                continue
            (target_layer,) = layer_of(target.relative_to(ROOT).as_posix())
            if target_layer > layer:
                broken.append(f"{relative}:{found.line} ({LAYERS[layer][0]}) imports "
                              f"{found.name} ({LAYERS[target_layer][0]})")
    assert not broken, "\n".join(broken)


def test_imports_respect_the_layers():
    broken = {rule.why: violations(rule) for rule in RULES}
    broken = {why: found for why, found in broken.items() if found}
    assert not broken, "\n".join(f"{why}:\n  " + "\n  ".join(found)
                                 for why, found in broken.items())


def test_the_checker_sees_imports_of_every_kind(tmp_path, monkeypatch):
    """Relative imports, `from package import module`, imports in functions and literal
    import_module calls are all found; TYPE_CHECKING blocks do not run."""
    module = ROOT / "xm2" / "data" / "datamodule.py"
    names = {found.name for found in imports_of(module)}
    assert {"lightning", "xm2.data.mixture", "xm2.errors"} <= names
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nimport importlib\nfrom xm2 import mup\n"
        "if TYPE_CHECKING:\n    import lightning\n"
        "def later():\n    import torch\n    importlib.import_module('callbacks.progress')\n")
    monkeypatch.setattr(sys.modules[__name__], "module_of", lambda path: "xm2.probe")
    found = {(item.name, item.module_level) for item in imports_of(source)}
    assert found >= {("xm2.mup", True), ("lightning", False), ("torch", False),
                     ("callbacks.progress", False)}
    assert "xm2.config" in loaded_with("xm2.mup") and "xm2" in loaded_with("xm2.mup")
    # What a module loads in turn counts: the LightningModule brings Lightning.
    assert any(matches(name, LIGHTNING) for name in loaded_with("xm2.module"))
