"""The SentencePiece tokenizer and token shards, on the real bundled corpus."""

import json

import numpy as np
import pytest

from tests.conftest import CORPUS
from xm2.data.corpus import read_documents, source_names
from xm2.data.shards import open_shard, token_dtype
from xm2.data.tokenizer import load_tokenizer


def test_round_trip_is_exact_on_held_out_text_of_every_source(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    for source in source_names(CORPUS):
        for document in list(read_documents(CORPUS, source, "val"))[:20]:
            assert tokenizer.decode(tokenizer.encode(document)) == document, source


def test_special_ids_digits_and_byte_fallback(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    assert (tokenizer.unk_id(), tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()) == (
        0, 1, 2, -1)
    assert tokenizer.vocab_size() == 512
    pieces = tokenizer.encode("x = 12345", out_type=str)
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["1", "2", "3", "4", "5"]
    text = "def f():\n\tif a:\n        return '日本語 → ∑'\r\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unk_id() not in tokenizer.encode("日本語 → ∑")  # bytes, never <unk>


def test_shards_hold_documents_separated_by_eos(tokenizer_path, shards):
    tokenizer = load_tokenizer(tokenizer_path)
    tokens = open_shard(shards, "instruct_math", "val")
    meta = json.loads((shards / "instruct_math" / "val.json").read_text())
    assert tokens.dtype == np.uint16 == token_dtype(512)
    assert int(np.sum(tokens == tokenizer.eos_id())) == meta["documents"]
    first_end = int(np.argmax(tokens == tokenizer.eos_id()))
    first_document = next(read_documents(CORPUS, "instruct_math", "val"))
    assert tokenizer.decode(tokens[:first_end].tolist()) == first_document


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65280) == np.uint16 and token_dtype(65537) == np.uint32


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus manifest .*manifest.json is missing"):
        source_names(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer .*nope.model is missing"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="token shard .*prose/train.json is missing"):
        open_shard(tmp_path, "prose", "train")
