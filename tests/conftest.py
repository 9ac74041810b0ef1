"""Shared fixtures: a small real tokenizer and its shards, built once per test session."""

from pathlib import Path

import pytest

from xm2.data.corpus import source_names
from xm2.data.shards import write_shards
from xm2.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 512-piece Unigram tokenizer trained on a sample of the bundled corpus."""
    directory = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(512, CORPUS, directory / "unigram-512.model", max_lines=30_000)


@pytest.fixture(scope="session")
def shards(tokenizer_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    return write_shards(CORPUS, tokenizer_path, root, source_names(CORPUS))
