"""Adding your own data as a corpus source, without writing a manifest by hand.

``xm2 add-source <name> <path>`` reads

- a folder of text files (``.txt``, ``.md``: one document per file) or JSON-lines files
  (``.jsonl``, ``.jsonl.gz``: one document per line, its text in ``--text_field``), or
- a Hugging Face dataset written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (read with pyarrow: neither the ``datasets`` package nor a network is needed),

and writes ``<corpus_dir>/<name>/{train,val}.jsonl.gz`` plus the source's entry in
``manifest.json``; the source can then be named in ``data.stable`` / ``data.decay``. A dataset's
own validation split is used as the held-out split; otherwise every document whose content hash
falls in ``val_fraction`` is held out (the same documents whatever their order).

Text is decoded strictly (``--encoding``, UTF-8 by default): a byte the encoding does not have is
refused with its file, line and column, never stored as U+FFFD. A ``.txt``/``.md`` file that holds
NUL bytes or many control characters is binary data, not text: it is skipped, and the files and
documents left out (binary, empty) are counted on one line each.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from xm2.data.corpus import load_manifest, write_whole
from xm2.errors import ConfigError, DataError, MissingPackageError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Names a saved DatasetDict may give its held-out split, in order of preference.
VALIDATION_SPLITS = ("validation", "val", "valid", "dev", "test")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
KINDS = ("pretraining", "instruction")
# Binary data, not text: a NUL, or more than this share of control characters other than
# backspace, tab, newlines, form feed and escape, in a file's first BINARY_SAMPLE characters.
# Random bytes hold about 10% of them, text next to none.
NON_TEXT = re.compile("[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f]")
NON_TEXT_SHARE = 0.05
BINARY_SAMPLE = 8192
ELSEWHERE = "give another --corpus_dir"


class Skipped:
    """The files and documents a source leaves out, by reason, for the lines that report them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files_seen = self.documents_seen = 0
        self.files: dict[str, list[str]] = {}
        self.documents: dict[str, int] = {}

    def file(self, reason: str, path: Path) -> None:
        self.files.setdefault(reason, []).append(str(path.relative_to(self.folder)))

    def document(self, reason: str) -> None:
        self.documents[reason] = self.documents.get(reason, 0) + 1

    def lines(self) -> list[str]:
        lines = []
        if self.files:
            parts = [f"{len(names)} {reason} ({', '.join(names[:5])}"
                     f"{f' and {len(names) - 5} more' if len(names) > 5 else ''})"
                     for reason, names in self.files.items()]
            skipped = sum(map(len, self.files.values()))
            lines.append(f"xm2: skipped {skipped} of {self.files_seen} files: {'; '.join(parts)}")
        if self.documents:
            parts = [f"{count} {reason}" for reason, count in self.documents.items()]
            lines.append(f"xm2: skipped {sum(self.documents.values())} of {self.documents_seen} "
                         f"documents: {'; '.join(parts)}")
        return lines


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _arrow_texts(folder: Path, text_field: str, skipped: Skipped) -> Iterator[str]:
    """The ``text_field`` column of one saved Dataset folder (its ``data-*.arrow`` files)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingPackageError(f"reading the saved dataset {folder} needs pyarrow: "
                                  "pip install pyarrow") from None
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    files = [folder / entry["filename"] for entry in state.get("_data_files", [])] or sorted(
        folder.glob("*.arrow"))
    if not files:
        raise ConfigError(f"saved dataset {folder} has no .arrow files")
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        if text_field not in table.column_names:
            raise ConfigError(f"saved dataset {folder} has no column {text_field!r}; its columns: "
                              f"{', '.join(table.column_names)}; choose one with --text_field")
        for text in table.column(text_field).to_pylist():
            yield from _document(text, f"saved dataset {folder} column {text_field!r}", skipped)


def _saved_dataset_splits(path: Path, text_field: str,
                          skipped: Skipped) -> tuple[Iterator[str], Iterator | None]:
    """Train documents and, if the DatasetDict has one, validation documents."""
    if not (path / "dataset_dict.json").is_file():
        return _arrow_texts(path, text_field, skipped), None
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if "train" not in splits:
        raise ConfigError(f"saved dataset {path} has splits {splits} but no 'train' split")
    held_out = next((name for name in VALIDATION_SPLITS if name in splits), None)
    return (_arrow_texts(path / "train", text_field, skipped),
            _arrow_texts(path / held_out, text_field, skipped) if held_out else None)


def _document(text, where: str, skipped: Skipped) -> Iterator[str]:
    """``text`` as a document: nothing if it is empty (counted), refused if it is not text."""
    skipped.documents_seen += 1
    if text is None or text == "":
        skipped.document("with an empty text field")
    elif not isinstance(text, str):
        raise DataError(f"{where} holds a {type(text).__name__}, not text; choose the field "
                        "with --text_field")
    else:
        yield text


def _ascii_compatible(encoding: str) -> bool:
    """Whether ``encoding`` writes ASCII as ASCII, so lines can be split before decoding."""
    sample = b'\n{"text": "a"}'
    try:
        return sample.decode(encoding) == sample.decode("ascii")
    except UnicodeDecodeError:
        return False


def _decoded(data: bytes, encoding: str, file: Path, line: int = 1) -> str:
    """``data`` (from ``line`` of ``file`` on) decoded; a byte that ``encoding`` does not have is
    refused naming the file, line and column, and so is UTF-8 text read as another encoding that
    would accept it garbled (latin-1 accepts any byte)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        before = data[:error.start].decode(encoding, errors="replace")
        line += before.count("\n")
        column = len(before) - before.rfind("\n")
        bad = data[error.start:error.end][:4]
        raise DataError(
            f"{file} line {line}, column {column}: {'byte' if len(bad) == 1 else 'bytes'} "
            f"{' '.join(f'0x{byte:02x}' for byte in bad)} {'is' if len(bad) == 1 else 'are'} "
            f"not valid {encoding}; name the files' encoding with --encoding (e.g. latin-1, "
            f"cp1252, utf-16) or convert the file to {encoding}") from None
    if data.isascii() or codecs.lookup(encoding).name in ("utf-8", "utf-8-sig") or (
            not _ascii_compatible(encoding)):
        return text
    try:
        as_utf8 = data.decode("utf-8")
    except UnicodeDecodeError:
        return text
    first = next(index for index, character in enumerate(as_utf8) if ord(character) >= 0x80)
    character = as_utf8[first]
    line += as_utf8.count("\n", 0, first)
    garbled = character.encode("utf-8").decode(encoding, errors="replace")
    raise DataError(
        f"{file} line {line} is UTF-8 text, not {encoding}: read as {encoding} its {character!r} "
        f"would become {garbled!r}; if the folder mixes encodings, convert its {encoding} files to "
        f"UTF-8 (iconv -f {encoding} -t utf-8) and add it without --encoding")


def _looks_binary(sample: str) -> bool:
    return "\x00" in sample or len(NON_TEXT.findall(sample)) > NON_TEXT_SHARE * len(sample)


def _text_file(file: Path, encoding: str, skipped: Skipped) -> Iterator[str]:
    """The document of one .txt/.md file; nothing, counted, if it is binary or empty."""
    data = file.read_bytes()
    byte_order_mark = next((name for name, mark in (
        ("UTF-32", codecs.BOM_UTF32_LE), ("UTF-32", codecs.BOM_UTF32_BE),
        ("UTF-16", codecs.BOM_UTF16_LE), ("UTF-16", codecs.BOM_UTF16_BE)) if data.startswith(mark)),
        None)
    if byte_order_mark and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        raise DataError(f"{file} starts with a {byte_order_mark} byte-order mark but is read as "
                        f"{encoding}; give --encoding {byte_order_mark.lower()}")
    ascii_compatible = _ascii_compatible(encoding)
    # Bytes as characters one to one: a binary file is found before its decoding fails.
    if ascii_compatible and _looks_binary(data[:BINARY_SAMPLE].decode("latin-1")):
        skipped.file("binary, with NUL bytes or control characters", file)
        return
    text = _decoded(data, encoding, file).removeprefix("\ufeff")
    if not ascii_compatible and _looks_binary(text[:BINARY_SAMPLE]):
        skipped.file("binary, with NUL bytes or control characters", file)
    elif not text.strip():
        skipped.file("empty", file)
    else:
        skipped.documents_seen += 1
        yield text


def _jsonl_lines(file: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Numbered, decoded lines of a .jsonl or .jsonl.gz file; a file that is not gzip where its
    name says so, or is cut short, is refused by name."""
    opener = gzip.open if file.name.endswith(".gz") else open
    number = 0
    try:
        with opener(file, "rb") as raw:
            if _ascii_compatible(encoding):
                for number, line in enumerate(raw, start=1):
                    yield number, _decoded(line, encoding, file, number)
            else:  # UTF-16/32: newlines are not single bytes, decode the whole file first
                yield from enumerate(_decoded(raw.read(), encoding, file).split("\n"), start=1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        found = f"({type(error).__name__}: {error})"
        if number == 0 and isinstance(error, gzip.BadGzipFile):
            raise DataError(f"{file} is not gzip-compressed {found}; a .jsonl.gz file holds "
                            "gzip-compressed JSON lines: compress it with gzip, or name a plain "
                            "JSON-lines file .jsonl") from None
        raise DataError(f"{file} is damaged or cut short after line {number} {found}; copy or "
                        "write it again") from None


def _folder_documents(path: Path, text_field: str, encoding: str,
                      skipped: Skipped) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and (p.suffix in TEXT_SUFFIXES or p.name.endswith(JSONL_SUFFIXES)))
    if not files:
        raise ConfigError(f"{path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files "
                          "and is not a saved Hugging Face dataset")
    for file in files:
        skipped.files_seen += 1
        if file.suffix in TEXT_SUFFIXES:
            yield from _text_file(file, encoding, skipped)
            continue
        for number, line in _jsonl_lines(file, encoding):
            line = line.removeprefix("\ufeff") if number == 1 else line
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{file} line {number} is not a JSON object with a "
                                  f"{text_field!r} field; choose the field with "
                                  "--text_field") from None
            yield from _document(text, f"{file} line {number} field {text_field!r}", skipped)


def _held_out(text: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _write_jsonl_gz(path: Path, documents: list[str]) -> None:
    # As the bundled corpus: mtime 0 and no name in the header, so the bytes follow the content.
    with write_whole(path, "corpus file", elsewhere=ELSEWHERE) as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0) as out:
        for text in documents:
            out.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_manifest(path: Path, manifest: dict) -> None:
    content = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with write_whole(path, "corpus manifest", len(content), ELSEWHERE) as file:
        file.write(content)


def add_source(
    name: str,
    path: str,
    corpus_dir: str = "data/corpus",
    text_field: str = "text",
    val_fraction: float = 0.05,
    licence: str = "unknown",
    description: str = "",
    kind: str = "pretraining",
    overwrite: bool = False,
    encoding: str = "utf-8",
) -> str:
    """Add a folder of text/JSONL files or a saved Hugging Face dataset as a corpus source.

    Args:
        name: Source name used in data.stable/data.decay (lower case, digits, underscores).
        path: A folder of .txt/.md files (a document each) or .jsonl/.jsonl.gz files (a
            document per line), or a folder written by datasets' save_to_disk.
        corpus_dir: The corpus to add the source to (its manifest.json is updated).
        text_field: The field (JSONL) or column (dataset) holding each document's text.
        val_fraction: Share of documents held out for validation when the data has no
            validation split (chosen by content hash, so stable across runs).
        licence: The data's licence, recorded in the manifest (see data/CARD.md).
        description: What the data is, recorded in the manifest.
        kind: pretraining or instruction, recorded in the manifest.
        overwrite: Replace an existing source of that name.
        encoding: The text encoding of the .txt/.md/.jsonl files (a Python codec name: utf-8,
            latin-1, cp1252, utf-16, ...); a byte it does not have is refused by file and line.
            A saved dataset holds Unicode already.
    """
    source_path, corpus = Path(path), Path(corpus_dir)
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"source name {name!r}: use lower-case letters, digits and "
                          "underscores, starting with a letter")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"encoding={encoding!r} is not a text encoding Python knows; give a "
                          "codec name such as utf-8, latin-1, cp1252 or utf-16") from None
    if not source_path.is_dir():
        raise ConfigError(f"{path} is not a folder; give a folder of text/JSONL files or a "
                          "saved Hugging Face dataset")
    manifest_path = corpus / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path} is missing; add sources to an existing corpus "
                          "(e.g. a copy of data/corpus)")
    manifest = load_manifest(corpus)
    if name in manifest["sources"] and not overwrite:
        raise ConfigError(f"source {name!r} is already in {manifest_path}; choose another name "
                          "or pass --overwrite true")

    skipped = Skipped(source_path)
    if _is_saved_dataset(source_path):
        train_iter, val_iter = _saved_dataset_splits(source_path, text_field, skipped)
        layout = "saved Hugging Face dataset"
    else:
        train_iter, val_iter = _folder_documents(source_path, text_field, encoding, skipped), None
        layout = f"folder of text/JSONL files ({encoding})"
    print(f"xm2: reading {layout} {source_path}", file=sys.stderr, flush=True)
    documents = list(train_iter)
    held_out = list(val_iter) if val_iter is not None else None
    for line in skipped.lines():
        print(line, file=sys.stderr, flush=True)
    if held_out is not None:
        train, val = documents, held_out
    else:
        train = [text for text in documents if not _held_out(text, val_fraction)]
        val = [text for text in documents if _held_out(text, val_fraction)]
        if not val and len(documents) > 1:  # tiny sources: hold out one document at least
            train, val = documents[:-1], documents[-1:]
    if not train or not val:
        raise ConfigError(f"{path} gave {len(train)} training and {len(val)} validation "
                          "documents; a source needs at least one of each")

    folder = corpus / name
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl_gz(folder / "train.jsonl.gz", train)
    _write_jsonl_gz(folder / "val.jsonl.gz", val)
    files = {split: {"path": f"{name}/{split}.jsonl.gz",
                     "gz_bytes": (folder / f"{split}.jsonl.gz").stat().st_size,
                     "sha256": hashlib.sha256((folder / f"{split}.jsonl.gz").read_bytes())
                     .hexdigest()} for split in ("train", "val")}
    manifest.setdefault("sources", {})[name] = {
        "kind": kind,
        "description": description or f"added by xm2 add-source from {source_path.resolve()}",
        "licence": licence,
        "origin": str(source_path.resolve()),
        "train_docs": len(train),
        "val_docs": len(val),
        "train_bytes": sum(len(text.encode()) for text in train),
        "val_bytes": sum(len(text.encode()) for text in val),
        "files": files,
    }
    _write_manifest(manifest_path, manifest)
    print(f"xm2: source {name!r}: {len(train)} training and {len(val)} validation documents in "
          f"{folder}; use it with --data.stable '{{{name}: 1.0, ...}}'", file=sys.stderr)
    return str(folder)


PRETOKENIZED = "pretokenized"


def add_tokens(
    name: str,
    tokens: str,
    tokenizer_path: str = "artifacts/tokenizers/unigram-4096.model",
    val_tokens: str | None = None,
    val_fraction: float = 0.05,
    dtype: str | None = None,
    corpus_dir: str = "data/corpus",
    shards_dir: str = "artifacts/shards",
    licence: str = "unknown",
    description: str = "",
    overwrite: bool = False,
) -> str:
    """Add a pre-tokenized token file as a corpus source, written straight into the shards.

    Args:
        name: Source name used in data.stable/data.decay (lower case, digits, underscores).
        tokens: Token ids of the training text: a .npy array, or a raw file of dtype integers,
            documents separated by the tokenizer's EOS id (2).
        tokenizer_path: The SentencePiece model the ids come from; training with another
            tokenizer refuses this source.
        val_tokens: Token ids of the held-out text; default: the last val_fraction of tokens
            (from a document boundary).
        val_fraction: Share held out when val_tokens is not given.
        dtype: Integer type of a raw file (uint16, uint32, int32, int64); not needed for .npy.
        corpus_dir: The corpus whose manifest lists the source.
        shards_dir: Root folder of the token shards (data.shards_dir).
        licence: The data's licence, recorded in the manifest.
        description: What the data is, recorded in the manifest.
        overwrite: Replace an existing source of that name.
    """
    import numpy as np

    from xm2.data.shards import shard_dir, token_dtype
    from xm2.data.tokenizer import EOS_ID, file_digest, load_tokenizer

    if not NAME_PATTERN.match(name):
        raise ConfigError(f"source name {name!r}: use lower-case letters, digits and "
                          "underscores, starting with a letter")
    vocab_size = load_tokenizer(tokenizer_path).vocab_size()

    def read(path: str) -> np.ndarray:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"token file {path} does not exist")
        if file.suffix == ".npy":
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        elif dtype is None:
            raise ConfigError(f"token file {path} is raw; give its --dtype (uint16, uint32, "
                              "int32 or int64), or save it with numpy.save as .npy")
        else:
            array = np.memmap(file, dtype=np.dtype(dtype), mode="r")
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise ConfigError(f"token file {path} holds {array.dtype} of shape {array.shape}; "
                              "a flat array of integer token ids is needed")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= vocab_size):
            raise ConfigError(f"token file {path} has ids from {int(array.min())} to "
                              f"{int(array.max())}, outside {tokenizer_path}'s vocabulary of "
                              f"{vocab_size}: it was tokenized with another tokenizer")
        return array

    train = read(tokens)
    if val_tokens:
        val = read(val_tokens)
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1")
        cut = int(len(train) * (1 - val_fraction))
        boundaries = np.flatnonzero(np.asarray(train[:cut]) == EOS_ID)
        cut = int(boundaries[-1]) + 1 if boundaries.size else cut
        train, val = train[:cut], train[cut:]
    if not len(train) or not len(val):
        raise ConfigError(f"{tokens} gave {len(train)} training and {len(val)} validation "
                          "tokens; a source needs some of each")

    manifest_path = Path(corpus_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path} is missing; add sources to an existing corpus")
    manifest = load_manifest(corpus_dir)
    if name in manifest["sources"] and not overwrite:
        raise ConfigError(f"source {name!r} is already in {manifest_path}; choose another name "
                          "or pass --overwrite true")
    digest = file_digest(tokenizer_path)
    directory = shard_dir(shards_dir, tokenizer_path) / name
    directory.mkdir(parents=True, exist_ok=True)
    out_dtype = token_dtype(vocab_size)
    elsewhere = "give another --shards_dir"
    for split, array in (("train", train), ("val", val)):
        array_path = directory / f"{split}.bin"
        ids = np.ascontiguousarray(array, dtype=out_dtype)
        with write_whole(array_path, "token shard", ids.nbytes, elsewhere) as file:
            file.write(memoryview(ids))  # a file object, not tofile: errors keep errno
        meta = {"source": name, "split": split, "documents": None, "tokens": int(len(array)),
                "dtype": out_dtype.name, "vocab_size": vocab_size,
                "tokenizer": str(tokenizer_path), "tokenizer_sha256": digest,
                "pretokenized_from": str(Path(val_tokens if split == "val" and val_tokens
                                              else tokens).resolve())}
        content = json.dumps(meta, indent=2).encode()
        with write_whole(array_path.with_suffix(".json"), "token shard meta file", len(content),
                         elsewhere) as file:
            file.write(content)
    manifest.setdefault("sources", {})[name] = {
        "kind": PRETOKENIZED,
        "description": description or f"token ids added by xm2 add-tokens from "
                                      f"{Path(tokens).resolve()}",
        "licence": licence,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": digest,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
    }
    _write_manifest(manifest_path, manifest)
    print(f"xm2: source {name!r}: {len(train)} training and {len(val)} validation tokens in "
          f"{directory}", file=sys.stderr)
    return str(directory)
