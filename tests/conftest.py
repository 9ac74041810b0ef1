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


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer_path, tmp_path_factory) -> Path:
    """An xm2 checkpoint file of a small random decoder over the session tokenizer, in the layout
    `xm2 fit` writes (state dict under `model.`, the architecture in hyper_parameters, a digest
    record naming the tokenizer)."""
    from dataclasses import asdict

    import torch

    from xm2.checkpoint import save_checkpoint_file
    from xm2.config import ModelConfig
    from xm2.data.tokenizer import file_digest
    from xm2.model import Decoder

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=64, dim_model_base=32)
    torch.manual_seed(0)
    model = Decoder(config)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.ckpt"
    save_checkpoint_file({
        "global_step": 7,
        "state_dict": {f"model.{name}": tensor for name, tensor in model.state_dict().items()},
        "hyper_parameters": {"architecture": asdict(config)},
        "xm2": {"record": {"global_step": 7, "tokenizer_path": str(tokenizer_path),
                           "tokenizer_sha256": file_digest(tokenizer_path)}},
    }, path)
    return path
