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
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from xm2.errors import ConfigError, MissingPackageError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Names a saved DatasetDict may give its held-out split, in order of preference.
VALIDATION_SPLITS = ("validation", "val", "valid", "dev", "test")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _arrow_texts(folder: Path, text_field: str) -> Iterator[str]:
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
        yield from (text for text in table.column(text_field).to_pylist() if text)


def _saved_dataset_splits(path: Path, text_field: str) -> tuple[Iterator[str], Iterator | None]:
    """Train documents and, if the DatasetDict has one, validation documents."""
    if not (path / "dataset_dict.json").is_file():
        return _arrow_texts(path, text_field), None
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if "train" not in splits:
        raise ConfigError(f"saved dataset {path} has splits {splits} but no 'train' split")
    held_out = next((name for name in VALIDATION_SPLITS if name in splits), None)
    return (_arrow_texts(path / "train", text_field),
            _arrow_texts(path / held_out, text_field) if held_out else None)


def _folder_documents(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and (p.suffix in TEXT_SUFFIXES or p.name.endswith(JSONL_SUFFIXES)))
    if not files:
        raise ConfigError(f"{path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files "
                          "and is not a saved Hugging Face dataset")
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{file} line {number} is not a JSON object with a "
                                      f"{text_field!r} field; choose the field with "
                                      "--text_field") from None
                if text:
                    yield text


def _held_out(text: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _write_jsonl_gz(path: Path, documents: list[str]) -> None:
    partial = path.with_suffix(".partial")
    # As the bundled corpus: mtime 0 and no name in the header, so the bytes follow the content.
    with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   mtime=0) as out:
        for text in documents:
            out.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    partial.replace(path)


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
    """
    source_path, corpus = Path(path), Path(corpus_dir)
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"source name {name!r}: use lower-case letters, digits and "
                          "underscores, starting with a letter")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1")
    if not source_path.is_dir():
        raise ConfigError(f"{path} is not a folder; give a folder of text/JSONL files or a "
                          "saved Hugging Face dataset")
    manifest_path = corpus / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path} is missing; add sources to an existing corpus "
                          "(e.g. a copy of data/corpus)")
    manifest = json.loads(manifest_path.read_text())
    if name in manifest.get("sources", {}) and not overwrite:
        raise ConfigError(f"source {name!r} is already in {manifest_path}; choose another name "
                          "or pass --overwrite true")

    if _is_saved_dataset(source_path):
        train_iter, val_iter = _saved_dataset_splits(source_path, text_field)
        kind = "saved Hugging Face dataset"
    else:
        train_iter, val_iter = _folder_documents(source_path, text_field), None
        kind = "folder of text/JSONL files"
    print(f"xm2: reading {kind} {source_path}", file=sys.stderr, flush=True)
    documents = list(train_iter)
    if val_iter is not None:
        train, val = documents, list(val_iter)
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
    partial = manifest_path.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    partial.replace(manifest_path)
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
    manifest = json.loads(manifest_path.read_text())
    if name in manifest.get("sources", {}) and not overwrite:
        raise ConfigError(f"source {name!r} is already in {manifest_path}; choose another name "
                          "or pass --overwrite true")
    digest = file_digest(tokenizer_path)
    directory = shard_dir(shards_dir, tokenizer_path) / name
    directory.mkdir(parents=True, exist_ok=True)
    out_dtype = token_dtype(vocab_size)
    for split, array in (("train", train), ("val", val)):
        array_path = directory / f"{split}.bin"
        partial = array_path.with_suffix(".partial")
        np.asarray(array, dtype=out_dtype).tofile(partial)
        partial.replace(array_path)
        meta = {"source": name, "split": split, "documents": None, "tokens": int(len(array)),
                "dtype": out_dtype.name, "vocab_size": vocab_size,
                "tokenizer": str(tokenizer_path), "tokenizer_sha256": digest,
                "pretokenized_from": str(Path(val_tokens if split == "val" and val_tokens
                                              else tokens).resolve())}
        partial = array_path.with_suffix(".partial")
        partial.write_text(json.dumps(meta, indent=2))
        partial.replace(array_path.with_suffix(".json"))
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
    partial = manifest_path.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    partial.replace(manifest_path)
    print(f"xm2: source {name!r}: {len(train)} training and {len(val)} validation tokens in "
          f"{directory}", file=sys.stderr)
    return str(directory)
