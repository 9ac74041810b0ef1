"""Token shards: each source and split tokenized once into a flat memory-mapped array.

Documents are concatenated with EOS after each one, so packing a shard into fixed-length rows
puts EOS between documents. The dtype is the smallest unsigned integer that holds the vocabulary.
A ``meta.json`` beside the arrays records the tokenizer's digest so stale shards are never used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from xm2.data.corpus import (
    SPLITS,
    load_manifest,
    read_documents,
    split_path,
    text_source_names,
    write_whole,
)
from xm2.data.tokenizer import EOS_ID, file_digest, load_tokenizer
from xm2.errors import ConfigError, DataError, MissingFileError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_dir(shards_root: str | Path, tokenizer_path: str | Path) -> Path:
    """Shards live under a folder named for the tokenizer file and its digest."""
    return Path(shards_root) / f"{Path(tokenizer_path).stem}-{file_digest(tokenizer_path)[:12]}"


def write_shards(
    corpus_dir: str | Path, tokenizer_path: str | Path, shards_root: str | Path, sources: list[str]
) -> Path:
    """Tokenize every split of ``sources``; skip those already written for this tokenizer.

    A damaged shard (see :func:`shard_problem`) of a text source, or one tokenized from another
    version of its corpus file (``xm2 add-source --overwrite``: the manifest's sha256 changed),
    is written again from the corpus, announced with one line naming it; a damaged shard added as
    token ids cannot be, and is refused by name.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    directory = shard_dir(shards_root, tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size())
    text_sources = text_source_names(corpus_dir)
    entries = load_manifest(corpus_dir)["sources"]
    for source in sources:
        for split in SPLITS:
            array_path = directory / source / f"{split}.bin"
            meta_path = array_path.with_suffix(".json")
            corpus_sha256 = _recorded_sha256(entries.get(source), split)
            problem = (shard_problem(meta_path) or _stale(meta_path, corpus_sha256)
                       if meta_path.is_file() else None)
            if meta_path.is_file() and problem is None:
                continue
            if source not in text_sources:
                if problem:
                    raise DataError(
                        f"{problem}; source {source!r} was added as token ids, so xm2 cannot "
                        f"write it again: add its tokens again with `xm2 add-tokens {source} "
                        f"<token file> --tokenizer_path {tokenizer_path} --overwrite true`")
                raise ConfigError(
                    f"source {source!r} was added as token ids (xm2 add-tokens) for another "
                    f"tokenizer: there is no {array_path} for {tokenizer_path}; train with the "
                    "tokenizer recorded in its manifest entry, or add its tokens again")
            corpus_file = split_path(corpus_dir, source, split)
            if problem:
                print(f"xm2: {problem}; rewriting the shard from {corpus_file}", file=sys.stderr,
                      flush=True)
                meta_path.unlink()  # until the new array is whole, no meta vouches for it
            else:
                print(f"xm2: tokenizing {source}/{split} into {array_path}", file=sys.stderr,
                      flush=True)
            documents = list(read_documents(corpus_dir, source, split))
            encoded = tokenizer.encode(documents)
            tokens = np.fromiter(
                (token for ids in encoded for token in (*ids, EOS_ID)),
                dtype=dtype,
                count=sum(len(ids) + 1 for ids in encoded),
            )
            array_path.parent.mkdir(parents=True, exist_ok=True)
            # Array first, meta last and each renamed into place: meta.json marks a complete shard.
            elsewhere = "point --shards_dir (data.shards_dir) at a disk with room"
            with write_whole(array_path, "token shard", tokens.nbytes, elsewhere) as file:
                file.write(memoryview(tokens))  # a file object, not tofile: errors keep errno
            meta = {
                "source": source,
                "split": split,
                "documents": len(documents),
                "tokens": int(tokens.size),
                "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size(),
                "tokenizer": str(tokenizer_path),
                "tokenizer_sha256": file_digest(tokenizer_path),
                "corpus_sha256": corpus_sha256,
            }
            content = json.dumps(meta, indent=2).encode()
            with write_whole(meta_path, "token shard meta file", len(content), elsewhere) as file:
                file.write(content)
    return directory


def _recorded_sha256(entry, split: str) -> str | None:
    """The SHA-256 of a source's corpus file as its manifest entry records it; None if not."""
    files = entry.get("files") if isinstance(entry, dict) else None
    recorded = files.get(split) if isinstance(files, dict) else None
    return recorded.get("sha256") if isinstance(recorded, dict) else None


def _stale(meta_path: Path, corpus_sha256: str | None) -> str | None:
    """What says the shard was tokenized from another version of its corpus file; None if
    nothing does (also when either side recorded no digest)."""
    written_from = _read_meta(meta_path).get("corpus_sha256")
    if corpus_sha256 is None or written_from is None or written_from == corpus_sha256:
        return None
    return (f"token shard {meta_path.with_suffix('.bin')} was tokenized from another version of "
            f"its corpus file (sha256 {written_from[:12]}, now {corpus_sha256[:12]} in the "
            "manifest)")


def _read_meta(meta_path: Path) -> dict:
    """A shard's meta file, checked to name a dtype and token count."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype, tokens = np.dtype(meta["dtype"]), int(meta["tokens"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"token shard meta file {meta_path} is damaged ({error!r})") from None
    if dtype.kind != "u" or tokens < 0:
        raise DataError(f"token shard meta file {meta_path} is damaged (dtype {meta['dtype']!r}, "
                        f"tokens {tokens})")
    return meta


def shard_problem(meta_path: str | Path) -> str | None:
    """What is wrong with the shard of ``meta_path`` (meta file, array size, token ids); None if
    nothing. A damaged shard is found here, before a batch is read from it."""
    meta_path = Path(meta_path)
    array_path = meta_path.with_suffix(".bin")
    try:
        meta = _read_meta(meta_path)
    except DataError as error:
        return str(error)
    dtype, tokens = np.dtype(meta["dtype"]), int(meta["tokens"])
    expected = tokens * dtype.itemsize
    actual = array_path.stat().st_size if array_path.is_file() else None
    if actual != expected:
        found = "missing" if actual is None else f"{actual} bytes"
        return (f"token shard {array_path} is damaged: {found}, but its meta file records "
                f"{tokens} {dtype.name} tokens ({expected} bytes)")
    vocab_size = meta.get("vocab_size")
    if isinstance(vocab_size, int) and tokens:
        array = np.memmap(array_path, dtype=dtype, mode="r", shape=(tokens,))
        # Chunked: a multi-gigabyte shard is scanned without reading it into memory at once.
        largest = max(int(array[start:start + 2**24].max()) for start in range(0, tokens, 2**24))
        if largest >= vocab_size:
            return (f"token shard {array_path} is damaged: token id {largest} is outside its "
                    f"tokenizer's vocabulary of {vocab_size}")
    return None


def _rebuild_hint(meta_path: Path) -> str:
    source = meta_path.parent.name
    return (f"delete {meta_path} and `xm2 fit` writes the shard again (or `xm2 tokenize "
            f"--tokenizer_path <its tokenizer> --sources '[{source}]'`)")


def open_shard(directory: str | Path, source: str, split: str, check: bool = True) -> np.memmap:
    """The token array of one source and split, memory-mapped read-only.

    With ``check``, a damaged shard (see :func:`shard_problem`) is refused by name.
    """
    meta_path = Path(directory) / source / f"{split}.json"
    if not meta_path.is_file():
        raise MissingFileError(
            f"token shard {meta_path} is missing; `xm2 fit` writes shards in prepare_data, or run "
            "`xm2 tokenize`"
        )
    problem = shard_problem(meta_path) if check else None
    if problem:
        raise DataError(f"{problem}; {_rebuild_hint(meta_path)}")
    meta = _read_meta(meta_path)
    return np.memmap(meta_path.with_suffix(".bin"), dtype=meta["dtype"], mode="r",
                     shape=(meta["tokens"],))
