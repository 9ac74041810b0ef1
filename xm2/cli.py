"""The ``xm2`` command: LightningCLI's ``fit``/``validate``/``test`` plus data and study tools.

    xm2 --help                                  # every command
    xm2 fit --config config/nano.yaml
    xm2 validate --config config/nano.yaml --ckpt_path <checkpoint>
    xm2 train-tokenizer --vocab_size 4096
    xm2 tokenize --tokenizer_path artifacts/tokenizers/unigram-4096.model

This module imports only what every command needs: a tool's module is imported when that tool
runs, and Lightning (seconds to import) only for fit/validate/test (xm2.run).
Errors xm2 raises on purpose print as one line (see xm2.errors).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from xm2 import errors

# Commands LightningCLI runs, with what they do.
LIGHTNING_COMMANDS = {
    "fit": "train a model (the recipe: --config config/nano.yaml)",
    "validate": "validation loss of a checkpoint on each source's held-out split",
    "test": "the same evaluation, logged as a test run",
}

# Tool name: "module:function", imported when the tool runs. A tool is a function whose signature
# and docstring jsonargparse turns into the command's options; its docstring's first paragraph is
# its line in `xm2 --help`.
TOOLS = {
    "train-tokenizer": "xm2.data.tokenizer:train_tokenizer",
    "tokenize": "xm2.cli:tokenize",
    "add-source": "xm2.data.sources:add_source",
    "add-tokens": "xm2.data.sources:add_tokens",
    "coord-check": "xm2.studies.coord_check:coord_check",
    "sweep": "xm2.studies.sweep:sweep",
    "windtunnel": "xm2.studies.windtunnel.command:windtunnel",
    "prepare-eval": "xm2.data.prepare_eval:prepare_eval",
    "evaluate": "xm2.eval.suite:evaluate",
    "branches": "xm2.tracking.lineage:print_branches",
    "decay-study": "xm2.studies.decay:decay_study",
    "tracking-sync": "xm2.tracking.guard:tracking_sync",
    "consolidate-checkpoint": "xm2.interop.sharded:consolidate_checkpoint",
    "verify": "xm2.checkpoint:verify_command",
    "memory": "xm2.memory:memory",
    "export-hf": "xm2.interop.hf_export:export_hf",
    "import-hf": "xm2.interop.hf_import:import_hf",
    "generate": "xm2.eval.generate:generate_command",
    "lm-eval": "xm2.eval.lm_eval:main",
}
PASS_THROUGH = ("lm-eval",)
"""Tools that parse their own options: they get every word after their name."""


def tool(name: str) -> Any:
    """The function behind tool ``name``."""
    module, function = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), function)


def tool_summary(name: str) -> str:
    """The first paragraph of tool ``name``'s docstring, read from its source without importing
    the module (a study's module imports torch: seconds)."""
    module, function = TOOLS[name].split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            paragraph = (ast.get_docstring(node) or "").split("\n\n")[0]
            return " ".join(paragraph.split()).replace("``", "")
    return ""


def tokenize(
    tokenizer_path: str = "artifacts/tokenizers/unigram-4096.model",
    corpus_dir: str = "data/corpus",
    shards_dir: str = "artifacts/shards",
    sources: list[str] | None = None,
) -> str:
    """Tokenize corpus sources into memory-mapped shards (EOS after every document).

    Args:
        tokenizer_path: SentencePiece model to encode with (one trained by `xm2 train-tokenizer`
            or an existing one; its eos id must be 2).
        corpus_dir: The corpus: the bundled one, or one with your sources (see README).
        shards_dir: Root folder of the shards.
        sources: Sources to tokenize; default all with text (not those added as token ids).
    """
    from xm2.data.corpus import text_source_names
    from xm2.data.shards import write_shards

    return str(write_shards(corpus_dir, tokenizer_path, shards_dir,
                            sources or text_source_names(corpus_dir)))


def print_help() -> None:
    width = max(map(len, [*LIGHTNING_COMMANDS, *TOOLS]))
    lines = ["usage: xm2 <command> [options]     (xm2 <command> --help for its options)", "",
             "Training and evaluation (LightningCLI; configs compose with --config):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Data, tracking and study tools:"]
    lines += [f"  {name:<{width}}  {tool_summary(name)}" for name in TOOLS]
    lines += ["", f"Errors print as one line; {errors.TRACEBACK_VARIABLE}=1 shows the traceback."]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``xm2`` console script; ``argv`` is for calls from Python."""
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] in ("-h", "--help"):
        print_help()
        return
    if not words[0].startswith("-") and words[0] not in (*LIGHTNING_COMMANDS, *TOOLS):
        # Answered before Lightning is imported: a typo costs a moment, not ten seconds.
        sys.exit(f"xm2: error: unknown command {words[0]!r}; the commands are "
                 f"{', '.join([*LIGHTNING_COMMANDS, *TOOLS])} (xm2 --help says what each does)")
    from xm2 import tracking

    tracking.use_quick_http_failures()
    try:
        from jsonargparse import CLI, set_parsing_settings

        # Field help comes from the docstrings under dataclass fields, too.
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        if words[0] in PASS_THROUGH:
            tool(words[0])(words[1:])
            return
        if words[0] in TOOLS:
            CLI({words[0]: tool(words[0])}, args=words)
            return
        from xm2.run import main as run_main

        run_main(words, [sys.argv[0], *sys.argv[1:]] if argv is None else ["xm2", *argv])
    except Exception as error:
        # Errors xm2 raises on purpose say all there is to say; anything else keeps its
        # traceback, and XM2_TRACEBACK=1 shows it for every error. Calls from Python get the
        # exception itself.
        found = errors.user_error(error) or tracking.unreachable_server(error)
        if found is None or os.environ.get(errors.TRACEBACK_VARIABLE) or argv is not None:
            raise
        sys.exit(errors.message(found))


if __name__ == "__main__":
    main()
