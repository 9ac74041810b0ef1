"""Token shards: each source and split tokenized once into a flat memory-mapped array.

Documents are concatenated with EOS after each one, so packing a shard into fixed-length rows
puts EOS between documents. The dtype is the smallest unsigned integer that holds the vocabulary.
A ``meta.json`` beside the arrays records the tokenizer's digest so stale shards are never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xm2.data.corpus import SPLITS, read_documents
from xm2.data.tokenizer import EOS_ID, file_digest, load_tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_dir(shards_root: str | Path, tokenizer_path: str | Path) -> Path:
    """Shards live under a folder named for the tokenizer file and its digest."""
    return Path(shards_root) / f"{Path(tokenizer_path).stem}-{file_digest(tokenizer_path)[:12]}"


def write_shards(
    corpus_dir: str | Path, tokenizer_path: str | Path, shards_root: str | Path, sources: list[str]
) -> Path:
    """Tokenize every split of ``sources``; skip those already written for this tokenizer."""
    tokenizer = load_tokenizer(tokenizer_path)
    directory = shard_dir(shards_root, tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size())
    for source in sources:
        for split in SPLITS:
            array_path = directory / source / f"{split}.bin"
            meta_path = array_path.with_suffix(".json")
            if meta_path.is_file():
                continue
            documents = list(read_documents(corpus_dir, source, split))
            encoded = tokenizer.encode(documents)
            tokens = np.fromiter(
                (token for ids in encoded for token in (*ids, EOS_ID)),
                dtype=dtype,
                count=sum(len(ids) + 1 for ids in encoded),
            )
            array_path.parent.mkdir(parents=True, exist_ok=True)
            # Array first, meta last and each renamed into place: meta.json marks a complete shard.
            partial = array_path.with_suffix(".partial")
            tokens.tofile(partial)
            partial.replace(array_path)
            meta = {
                "source": source,
                "split": split,
                "documents": len(documents),
                "tokens": int(tokens.size),
                "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size(),
                "tokenizer": str(tokenizer_path),
                "tokenizer_sha256": file_digest(tokenizer_path),
            }
            meta_partial = meta_path.with_suffix(".partial")
            meta_partial.write_text(json.dumps(meta, indent=2))
            meta_partial.replace(meta_path)
    return directory


def open_shard(directory: str | Path, source: str, split: str) -> np.memmap:
    """The token array of one source and split, memory-mapped read-only."""
    meta_path = Path(directory) / source / f"{split}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"token shard {meta_path} is missing; `xm2 fit` writes shards in prepare_data, or run "
            "`xm2 tokenize`"
        )
    meta = json.loads(meta_path.read_text())
    return np.memmap(meta_path.with_suffix(".bin"), dtype=meta["dtype"], mode="r",
                     shape=(meta["tokens"],))
