"""The LightningDataModule: stable mixture until the WSD decay start, decay mixture after it."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from xm2.data.corpus import source_names as corpus_source_names
from xm2.data.mixture import MixtureBatches, PackedRows, ValidationBatches, normalized_weights
from xm2.data.shards import open_shard, shard_dir, write_shards
from xm2.data.tokenizer import (
    default_tokenizer_path,
    file_digest,
    load_tokenizer,
    tokenizer_mismatch,
    train_tokenizer,
)
from xm2.errors import CheckpointError, ConfigError
from xm2.schedule import WSDSchedule

DEFAULT_STABLE = {"prose": 0.4, "code": 0.3, "docs": 0.3}
# About 64% instruction data in the decay phase, as in Xmodel-2.
DEFAULT_DECAY = {"instruct_math": 0.32, "instruct_code": 0.32, "prose": 0.12, "code": 0.12,
                 "docs": 0.12}


class TimedDataLoader(DataLoader):
    """A DataLoader that adds up, in ``fetch_seconds``, the time its iterators spend producing
    batches: the time the training loop waits for data (``callbacks.throughput`` reads it)."""

    fetch_seconds: float = 0.0

    def __iter__(self):
        batches = super().__iter__()
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.fetch_seconds += time.perf_counter() - started
            yield batch


class MixtureDataModule(L.LightningDataModule):
    """Named corpus sources mixed by weight, with a phase switch at ``decay_start_step``.

    Weights are sampling probabilities over packed rows of ``seq_len`` tokens, so they are the
    expected token fractions; they need not sum to 1. Validation uses each source's held-out split.
    """

    def __init__(
        self,
        stable: dict[str, float] = DEFAULT_STABLE,
        decay: dict[str, float] = DEFAULT_DECAY,
        corpus_dir: str = "data/corpus",
        tokenizer_path: str | None = None,
        shards_dir: str = "artifacts/shards",
        batch_size: int = 16,
        val_batches_per_source: int = 4,
        seed: int = 1234,
        num_workers: int = 0,
        vocab_size: int = 4096,
        seq_len: int = 256,
        decay_start_step: int = WSDSchedule.decay_start_step,
    ) -> None:
        """
        Args:
            stable: Source name to weight in the stable phase (and the warmup).
            decay: Source name to weight in the decay phase (from decay_start_step on); the
                default is about 64% instruction data, as in Xmodel-2.
            corpus_dir: The bundled corpus (see data/CARD.md).
            tokenizer_path: SentencePiece model; default artifacts/tokenizers/unigram-<vocab>.model,
                trained on first use.
            shards_dir: Where tokenized shards are written and read.
            batch_size: Sequences per micro-batch on each device.
            val_batches_per_source: Validation batches from each source's held-out split.
            seed: Seed of the mixture sampling.
            num_workers: DataLoader worker processes.
            vocab_size: Linked from model.architecture.vocab_size; the tokenizer must match it.
            seq_len: Linked from model.architecture.max_seq_len.
            decay_start_step: Linked from model.schedule.decay_start_step.
        """
        super().__init__()
        self.save_hyperparameters()
        known = corpus_source_names(corpus_dir)
        self.stable = normalized_weights(stable, known, "stable")
        self.decay = normalized_weights(decay, known, "decay")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("val_batches_per_source", val_batches_per_source)):
            if value < 1:
                raise ConfigError(f"data {name}={value} must be >= 1")
        self.source_names = sorted(set(self.stable) | set(self.decay))
        self.tokenizer_path = Path(tokenizer_path or default_tokenizer_path(vocab_size))
        self._tokenizer_sha256: str | None = None
        self._shards_checked = False

    @property
    def tokenizer_sha256(self) -> str | None:
        """Digest of the tokenizer file, recorded in checkpoints; None until it exists."""
        if self._tokenizer_sha256 is None and self.tokenizer_path.is_file():
            self._tokenizer_sha256 = file_digest(self.tokenizer_path)
        return self._tokenizer_sha256

    def state_dict(self) -> dict:
        return {"tokenizer_sha256": self.tokenizer_sha256}

    def load_state_dict(self, state_dict: dict) -> None:
        problem = tokenizer_mismatch(state_dict.get("tokenizer_sha256"), self.tokenizer_path)
        if problem:
            raise CheckpointError(f"the checkpoint being loaded {problem}")

    def prepare_data(self) -> None:
        """Train the tokenizer and write token shards, once, if they are not there yet."""
        if not self.tokenizer_path.is_file():
            if self.hparams.tokenizer_path:
                load_tokenizer(self.tokenizer_path)  # raises: a named tokenizer must exist
            train_tokenizer(self.hparams.vocab_size, self.hparams.corpus_dir, self.tokenizer_path)
        else:
            self._check_vocab()  # before shards are written with a tokenizer that will not fit
        write_shards(self.hparams.corpus_dir, self.tokenizer_path, self.hparams.shards_dir,
                     self.source_names)
        # Lightning opens the MLflow run after prepare_data: a bad tokenizer or shard found
        # here leaves no FAILED run behind.
        self._open_shards(check=True)

    def _check_vocab(self) -> None:
        vocab = load_tokenizer(self.tokenizer_path).vocab_size()
        if vocab != self.hparams.vocab_size:
            raise ConfigError(
                f"tokenizer {self.tokenizer_path} has vocab size {vocab} but the model has "
                f"vocab_size={self.hparams.vocab_size}; train a matching one with "
                f"`xm2 train-tokenizer --vocab_size {self.hparams.vocab_size}`"
            )

    def _open_shards(self, check: bool) -> None:
        directory = shard_dir(self.hparams.shards_dir, self.tokenizer_path)
        seq_len = self.hparams.seq_len
        self.train_rows = {name: PackedRows(open_shard(directory, name, "train", check), seq_len,
                                            name) for name in self.source_names}
        self.val_rows = {name: PackedRows(open_shard(directory, name, "val", check), seq_len, name)
                         for name in self.source_names}
        self._shards_checked = self._shards_checked or check

    def setup(self, stage: str) -> None:
        self._check_vocab()
        # Ranks other than each node's first did not run prepare_data: they check here.
        self._open_shards(check=not self._shards_checked)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        dataset = MixtureBatches(
            self.train_rows,
            self.stable,
            self.decay,
            batch_size=self.hparams.batch_size,
            decay_start_step=self.hparams.decay_start_step,
            seed=self.hparams.seed,
            microbatches_per_step=self.trainer.accumulate_grad_batches if self.trainer else 1,
            rank=rank,
            world_size=world_size,
            # A resumed run picks up the stream at the step it stopped at.
            start_step=self.trainer.global_step if self.trainer else 0,
        )
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        dataset = ValidationBatches(self.val_rows, self.hparams.batch_size,
                                    self.hparams.val_batches_per_source, rank, world_size)
        return self._loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset) -> DataLoader:
        # Datasets yield whole batches (batch_size=None): batch composition never depends on
        # how many workers there are.
        return TimedDataLoader(dataset, batch_size=None, num_workers=self.hparams.num_workers,
                               persistent_workers=self.hparams.num_workers > 0)
