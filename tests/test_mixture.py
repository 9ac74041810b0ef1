"""Mixture sampling: weights, the exact phase switch, determinism across workers, ranks and resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from xm2.data.mixture import MixtureBatches, PackedRows, normalized_weights

SEQ_LEN = 8


def rows(count: int, offset: int, name: str) -> PackedRows:
    # Token values encode their source (offset), so a row tells where it came from.
    return PackedRows(np.arange(offset, offset + count * SEQ_LEN + 1), SEQ_LEN, name)


SOURCES = {"a": rows(50, 0, "a"), "b": rows(30, 10_000, "b"), "sft": rows(20, 20_000, "sft")}


def stream(**overrides) -> MixtureBatches:
    settings = dict(sources=SOURCES, stable_weights={"a": 0.7, "b": 0.3},
                    decay_weights={"sft": 0.64, "a": 0.36}, batch_size=4, decay_start_step=10,
                    seed=7)
    return MixtureBatches(**{**settings, **overrides})


def take(dataset, count: int) -> list[dict]:
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_packed_rows_overlap_by_one_token_for_the_targets():
    packed = rows(3, 0, "x")
    assert len(packed) == 3
    assert packed[1].tolist() == list(range(8, 17))


def test_realised_fractions_match_the_weights():
    dataset = stream(batch_size=64)
    stable = np.concatenate([dataset.batch(m)["source_ids"].numpy() for m in range(10)])
    decay = np.concatenate([dataset.batch(m)["source_ids"].numpy() for m in range(10, 60)])
    # 640 and 3200 draws: three binomial standard deviations are below 0.06 and 0.03.
    assert np.mean(stable == 0) == pytest.approx(0.7, abs=0.06)
    assert np.mean(decay == 2) == pytest.approx(0.64, abs=0.03)
    assert not np.any(stable == 2) and not np.any(decay == 1)


def test_rows_belong_to_the_sampled_source():
    batch = stream().batch(3)
    offsets = batch["tokens"][:, 0] // 10_000
    names = np.array(["a", "b", "sft"])[batch["source_ids"].numpy()]
    assert [("a", "b", "sft")[o] for o in offsets.tolist()] == names.tolist()


@pytest.mark.parametrize("accumulation, world_size", [(1, 1), (4, 1), (2, 3)])
def test_phase_switches_at_the_exact_optimizer_step(accumulation, world_size):
    for rank in range(world_size):
        dataset = stream(microbatches_per_step=accumulation, rank=rank, world_size=world_size)
        batches = take(dataset, 12 * accumulation)
        steps = [b["step"] for b in batches]
        assert steps == [s for s in range(12) for _ in range(accumulation)]
        assert [b["phase"] for b in batches] == ["stable" if s < 10 else "decay" for s in steps]


def test_a_restarted_stream_continues_where_the_first_stopped():
    first = take(stream(microbatches_per_step=2), 20)
    resumed = take(stream(microbatches_per_step=2, start_step=6), 8)
    for a, b in zip(first[12:], resumed, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and a["step"] == b["step"]


def test_ranks_draw_different_batches():
    rank0, rank1 = stream(world_size=2, rank=0).batch(0), stream(world_size=2, rank=1).batch(0)
    assert not torch.equal(rank0["tokens"], rank1["tokens"])


def test_worker_processes_keep_the_stream_order():
    expected = take(stream(), 6)
    loader = DataLoader(stream(), batch_size=None, num_workers=2)
    for a, b in zip(expected, take(loader, 6), strict=True):
        assert torch.equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"prose": 1.0, "wiki": 1.0}, "unknown source 'wiki' in the stable mixture; allowed: code, prose"),
        ({"prose": -0.5}, "stable mixture weight prose=-0.5 must be a finite number >= 0"),
        ({"prose": 0.0, "code": 0}, "are all zero"),
        ({}, "the stable mixture is empty"),
    ],
)
def test_bad_mixtures_are_refused_with_the_bad_value(weights, message):
    with pytest.raises(ValueError, match=message):
        normalized_weights(weights, ["code", "prose"], "stable")


def test_weights_are_normalised():
    assert normalized_weights({"a": 3, "b": 1}, ["a", "b"], "decay") == {"a": 0.75, "b": 0.25}


def test_a_source_shorter_than_one_row_is_refused():
    with pytest.raises(ValueError, match="source 'tiny' has 5 tokens, fewer than one row"):
        PackedRows(np.arange(5), SEQ_LEN, "tiny")
