"""Reading the bundled corpus: ``<corpus>/<source>/{train,val}.jsonl.gz`` plus ``manifest.json``;
and writing corpus and shard files whole (:func:`write_whole`)."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from xm2.errors import DataError, EnvironmentProblem, MissingFileError

SPLITS = ("train", "val")
# Write failures that mean "no room": what each means and what to do.
NO_ROOM = {
    errno.ENOSPC: ("the disk is full (ENOSPC)", "free space"),
    errno.EDQUOT: ("the disk quota is used up (EDQUOT)", "free space"),
    errno.EFBIG: ("the file size limit is reached (EFBIG)", "raise the limit (`ulimit -f`)"),
}


def _size(byte_count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if byte_count >= scale:
            return f"{byte_count:,} bytes ({byte_count / scale:.1f} {unit})"
    return f"{byte_count:,} bytes"


@contextmanager
def write_whole(path: Path, what: str, needed: int | None = None,
                elsewhere: str = "") -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only once it is complete.

    It is written as ``<path>.partial`` and renamed over ``path`` when the block ends; on any
    failure the partial file is removed, so nothing cut short lies under either name. A full disk,
    a used-up quota or a file size limit is an :class:`EnvironmentProblem` naming ``what`` and
    ``path``, the bytes ``needed`` (when known), those written and the space left; ``elsewhere``
    says how to write to another disk instead.
    """
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            yield file
    except OSError as error:
        written = partial.stat().st_size if partial.exists() else 0
        partial.unlink(missing_ok=True)
        if error.errno not in NO_ROOM:
            raise
        free = shutil.disk_usage(path.parent).free
        cause, remedy = NO_ROOM[error.errno]
        need = f"it needs {_size(needed)}, " if needed is not None else ""
        raise EnvironmentProblem(
            f"no room to write {what} {path}: {cause}; {need}{_size(written)} were written and "
            f"{_size(free)} are free there. The partial file was removed; {remedy}"
            f"{f' or {elsewhere}' if elsewhere else ''} and run the command again") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)


def load_manifest(corpus_dir: str | Path) -> dict:
    """The corpus manifest; its ``sources`` maps each source name to its card entry."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise MissingFileError(
            f"corpus manifest {path} is missing; build the corpus with "
            "`python scripts/build_corpus.py --out data/corpus` or point data.corpus_dir at one"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"corpus manifest {path} is not valid JSON ({error}); restore it "
                        "(`git checkout data/corpus`) or rebuild the corpus with "
                        "`python scripts/build_corpus.py --out data/corpus`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
        raise DataError(f'corpus manifest {path} has no "sources" object naming the sources '
                        "(see data/CARD.md for what a source needs)")
    return manifest


def source_names(corpus_dir: str | Path) -> list[str]:
    return sorted(load_manifest(corpus_dir)["sources"])


def text_source_names(corpus_dir: str | Path) -> list[str]:
    """Sources with text files, i.e. all but those added as token ids (``xm2 add-tokens``)."""
    return sorted(name for name, entry in load_manifest(corpus_dir)["sources"].items()
                  if not (isinstance(entry, dict) and entry.get("kind") == "pretokenized"))


def split_path(corpus_dir: str | Path, source: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    path = Path(corpus_dir) / source / f"{split}.jsonl.gz"
    if not path.is_file():
        available = ", ".join(source_names(corpus_dir))
        raise MissingFileError(
            f"corpus file {path} is missing for source {source!r}; sources in the manifest: "
            f"{available}"
        )
    return path


def read_documents(corpus_dir: str | Path, source: str, split: str) -> Iterator[str]:
    """The documents of one source and split, in file order."""
    path = split_path(corpus_dir, source, split)
    line_number = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataError(
                        f"{path} line {line_number} is not a JSON object with a \"text\" field: "
                        f"{error}"
                    ) from error
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as error:
        raise DataError(
            f"corpus file {path} is damaged after line {line_number} ({type(error).__name__}: "
            f"{error}); a corpus file is gzip-compressed JSON lines. Restore it (`git checkout "
            f"{path}` for the bundled corpus) or write it again"
        ) from None
