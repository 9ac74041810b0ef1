"""Weighted mixtures of sources, packed into fixed-length rows, switched at the decay start.

Mixture weights are sampling probabilities over *packed rows* of equal length, so they are also
the expected token fractions. Each micro-batch is a pure function of (seed, global micro-batch
index): the phase switch happens at an exact optimizer step whatever the number of workers or
ranks, and a run restarted at step k sees the same batches as one that never stopped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from xm2.errors import ConfigError
from xm2.schedule import data_phase

PHASES = ("stable", "decay")


def normalized_weights(weights: Mapping[str, float], known: Sequence[str], phase: str) -> dict:
    """Check a phase's mixture weights against the known sources and scale them to sum to 1."""
    if not weights:
        raise ConfigError(f"the {phase} mixture is empty; give weights for some of: {', '.join(known)}")
    for name, weight in weights.items():
        if name not in known:
            raise ConfigError(
                f"unknown source {name!r} in the {phase} mixture; allowed: {', '.join(known)}"
            )
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"{phase} mixture weight {name}={weight!r} must be a finite number >= 0"
            )
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"the {phase} mixture weights {dict(weights)} are all zero")
    return {name: weight / total for name, weight in weights.items()}


class PackedRows:
    """Row r of a token array is tokens[r*L : r*L + L + 1]: L inputs and their L next tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.num_rows = (len(tokens) - 1) // seq_len
        if self.num_rows < 1:
            raise ConfigError(
                f"source {name!r} has {len(tokens)} tokens, fewer than one row of seq_len={seq_len}"
            )

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> np.ndarray:
        start = row * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)


class MixtureBatches(IterableDataset):
    """An endless stream of this rank's micro-batches, drawn from the stable or decay mixture.

    Yields dicts with ``tokens`` (batch, seq_len+1), ``source_ids`` (batch,) indexing
    ``source_names``, ``phase`` and ``step`` (the optimizer step the micro-batch belongs to).
    """

    def __init__(
        self,
        sources: Mapping[str, PackedRows],
        stable_weights: Mapping[str, float],
        decay_weights: Mapping[str, float],
        batch_size: int,
        decay_start_step: int,
        seed: int,
        microbatches_per_step: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        self.source_names = list(sources)
        self.rows = [sources[name] for name in self.source_names]
        self.probabilities = {
            "stable": np.array([stable_weights.get(n, 0.0) for n in self.source_names]),
            "decay": np.array([decay_weights.get(n, 0.0) for n in self.source_names]),
        }
        self.batch_size, self.decay_start_step, self.seed = batch_size, decay_start_step, seed
        self.microbatches_per_step = microbatches_per_step
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step

    def phase(self, step: int) -> str:
        return data_phase(step, self.decay_start_step)

    def batch(self, microbatch: int) -> dict:
        """This rank's ``microbatch``-th micro-batch since step 0."""
        step = microbatch // self.microbatches_per_step
        phase = self.phase(step)
        rng = np.random.default_rng([self.seed, microbatch * self.world_size + self.rank])
        source_ids = rng.choice(len(self.rows), size=self.batch_size, p=self.probabilities[phase])
        rows = [self.rows[s][int(rng.integers(len(self.rows[s])))] for s in source_ids]
        return {
            "tokens": torch.from_numpy(np.stack(rows)),
            "source_ids": torch.from_numpy(source_ids),
            "phase": phase,
            "step": step,
        }

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # The loader takes batches from its workers in turn, so worker w serves every
        # num_workers-th micro-batch and the stream keeps its order.
        first = self.start_step * self.microbatches_per_step
        for microbatch in itertools.count(first + worker_id, num_workers):
            yield self.batch(microbatch)


class ValidationBatches(IterableDataset):
    """The first rows of each source's held-out split, in order, as ``{"tokens", "source"}``.

    With several ranks, the batches of all sources are dealt out in turn, and ranks left with
    fewer get padding batches (``source`` None, tokens of a real batch) until all have the same
    number: a sharded model gathers its parameters from every rank in each forward pass, so a
    rank with one batch more would wait for ever. The loss sums ignore padding.
    """

    def __init__(
        self, sources: Mapping[str, PackedRows], batch_size: int, batches_per_source: int,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.sources, self.batch_size = sources, batch_size
        self.batches_per_source = batches_per_source
        self.rank, self.world_size = rank, world_size

    def _all_batches(self) -> Iterator[dict]:
        for name, rows in self.sources.items():
            count = min(len(rows), self.batch_size * self.batches_per_source)
            for start in range(0, count, self.batch_size):
                block = [rows[r] for r in range(start, min(start + self.batch_size, count))]
                yield {"tokens": torch.from_numpy(np.stack(block)), "source": name}

    def rank_batches(self) -> Iterator[dict]:
        """This rank's batches: every world_size-th one, padded to the same count on all ranks."""
        total = sum(math.ceil(min(len(rows), self.batch_size * self.batches_per_source)
                              / self.batch_size) for rows in self.sources.values())
        served = 0
        for batch in itertools.islice(self._all_batches(), self.rank, None, self.world_size):
            served += 1
            yield batch
        padding = next(self._all_batches())["tokens"]
        for _ in range(math.ceil(total / self.world_size) - served):
            yield {"tokens": padding, "source": None}

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return itertools.islice(self.rank_batches(), worker_id, None, num_workers)
