"""Training and loading the SentencePiece Unigram tokenizer.

Settings follow Xmodel-2's released tokenizer: Unigram, byte fallback, digits split one by one,
identity normalisation that keeps whitespace (code indentation survives), and fixed special ids
unk=0, bos=1, eos=2, no pad.
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from xm2.data.corpus import read_documents, text_source_names
from xm2.errors import ConfigError, MissingFileError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def default_tokenizer_path(vocab_size: int, directory: str | Path = "artifacts/tokenizers") -> Path:
    return Path(directory) / f"unigram-{vocab_size}.model"


def _training_lines(
    corpus_dir: str | Path, sources: Sequence[str], max_lines: int, seed: int
) -> Iterator[str]:
    # SentencePiece learns from lines; newlines themselves go through byte fallback at encode time.
    lines = [
        line
        for source in sources
        for document in read_documents(corpus_dir, source, "train")
        for line in document.split("\n")
        if line.strip()
    ]
    random.Random(seed).shuffle(lines)
    yield from lines[:max_lines]


def train_tokenizer(
    vocab_size: int = 4096,
    corpus_dir: str | Path = "data/corpus",
    output: str | Path | None = None,
    sources: list[str] | None = None,
    max_lines: int = 1_000_000,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a Unigram tokenizer on the train split of the corpus and write ``output``.

    Args:
        vocab_size: Vocabulary size (the paper's is 65,280; nano uses 4096).
        corpus_dir: The bundled corpus.
        output: Model file to write; default ``artifacts/tokenizers/unigram-<vocab_size>.model``.
        sources: Corpus sources to learn from; default all of them.
        max_lines: Lines sampled (with a fixed seed) from the training text.
        seed: Seed of that sample.
        overwrite: Replace an existing, different tokenizer at ``output``. Checkpoints record
            the digest of the tokenizer they were trained with and refuse any other.
    """
    output = Path(output) if output else default_tokenizer_path(vocab_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sources = sources or text_source_names(corpus_dir)
    # Minutes at the paper's vocabulary on a laptop: say what is happening.
    print(f"xm2: training a {vocab_size}-piece Unigram tokenizer on up to {max_lines} lines of "
          f"{', '.join(sources)} ({corpus_dir}) for {output}", file=sys.stderr, flush=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(corpus_dir, sources, max_lines, seed),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    if output.is_file() and not overwrite:
        existing = file_digest(output)
        if existing == hashlib.sha256(model.getvalue()).hexdigest():
            return output  # the same tokenizer again: nothing changes
        raise ConfigError(
            f"tokenizer {output} exists (SHA-256 {existing[:12]}…) and differs from the one just "
            "trained; checkpoints trained with it would no longer load. Write to another --output, "
            "or pass --overwrite true"
        )
    # Write then rename, so a crash never leaves a truncated model behind.
    partial = output.with_suffix(".partial")
    partial.write_bytes(model.getvalue())
    partial.replace(output)
    return output


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"tokenizer {path} is missing; train one with `xm2 train-tokenizer --output {path}`"
        )
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise ConfigError(
            f"tokenizer {path} is not a SentencePiece model file ({' '.join(str(error).split())}); "
            "give a .model file written by SentencePiece, or train one with "
            f"`xm2 train-tokenizer --output {path}`") from None
    if processor.eos_id() != EOS_ID:
        raise ConfigError(f"tokenizer {path} has eos id {processor.eos_id()}; xm2 needs {EOS_ID}")
    return processor


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_mismatch(expected_sha256: str | None, path: str | Path) -> str | None:
    """Why the tokenizer at ``path`` is not the one with ``expected_sha256``; None if it is.

    A checkpoint without a recorded digest, or a tokenizer not yet trained, cannot be judged here.
    """
    path = Path(path)
    if expected_sha256 is None or not path.is_file():
        return None
    actual = file_digest(path)
    if actual == expected_sha256:
        return None
    return (f"was trained with the tokenizer of SHA-256 {expected_sha256[:12]}…, but "
            f"{path} has SHA-256 {actual[:12]}…; point data.tokenizer_path at the tokenizer the "
            "checkpoint was trained with")
