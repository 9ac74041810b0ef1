"""Reading the bundled corpus: ``<corpus>/<source>/{train,val}.jsonl.gz`` plus ``manifest.json``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "val")


def load_manifest(corpus_dir: str | Path) -> dict:
    """The corpus manifest; its ``sources`` maps each source name to its card entry."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus manifest {path} is missing; build the corpus with "
            "`python scripts/build_corpus.py --out data/corpus` or point data.corpus_dir at one"
        )
    return json.loads(path.read_text())


def source_names(corpus_dir: str | Path) -> list[str]:
    return sorted(load_manifest(corpus_dir)["sources"])


def split_path(corpus_dir: str | Path, source: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    path = Path(corpus_dir) / source / f"{split}.jsonl.gz"
    if not path.is_file():
        available = ", ".join(source_names(corpus_dir))
        raise FileNotFoundError(
            f"corpus file {path} is missing for source {source!r}; sources in the manifest: "
            f"{available}"
        )
    return path


def read_documents(corpus_dir: str | Path, source: str, split: str) -> Iterator[str]:
    """The documents of one source and split, in file order."""
    with gzip.open(split_path(corpus_dir, source, split), "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(
                    f"{split_path(corpus_dir, source, split)} line {line_number} is not a JSON "
                    f'object with a "text" field: {error}'
                ) from error
