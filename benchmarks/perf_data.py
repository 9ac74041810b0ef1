"""The data side of the performance suite: the batch stream's tokens/s, tokenizer training and
shard writing.

    .venv/bin/python benchmarks/perf_data.py [--sizes nano tiny] [--quick]

- pipeline: the training stream exactly as ``xm2 fit`` reads it (``MixtureDataModule``'s
  ``MixtureBatches`` over the memory-mapped shards, through a ``DataLoader`` with
  ``batch_size=None`` and no workers), in the stable phase and in the decay phase, tokens/s;
- tokenizer: ``xm2 train-tokenizer`` on the bundled corpus at the size's vocabulary, seconds
  (nano's by default; none with ``--quick``);
- shards: ``write_shards`` of every source and split with the existing tokenizer, seconds and
  tokens/s (into a temporary folder, so nothing in artifacts/ changes).

Prints one JSON line (perf_suite.py reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_loop import BATCH_ROWS, ROOT, architecture  # noqa: E402

from xm2.data.corpus import source_names  # noqa: E402
from xm2.data.datamodule import DEFAULT_DECAY, DEFAULT_STABLE  # noqa: E402
from xm2.data.mixture import MixtureBatches, PackedRows  # noqa: E402
from xm2.data.shards import open_shard, shard_dir, write_shards  # noqa: E402
from xm2.data.tokenizer import default_tokenizer_path, train_tokenizer  # noqa: E402

CORPUS = ROOT / "data" / "corpus"


def pipeline(size: str, seconds: float) -> dict:
    """Tokens/s of the training stream, stable and decay phases, for ``seconds`` each."""
    config = architecture(size)
    tokenizer = ROOT / default_tokenizer_path(config.vocab_size)
    directory = shard_dir(ROOT / "artifacts" / "shards", tokenizer)
    names = sorted(set(DEFAULT_STABLE) | set(DEFAULT_DECAY))
    rows = {name: PackedRows(open_shard(directory, name, "train"), config.max_seq_len, name)
            for name in names}
    decay_start = 10**9 // 2
    result = {}
    for phase, start_step in (("stable", 0), ("decay", decay_start)):
        stream = MixtureBatches(rows, DEFAULT_STABLE, DEFAULT_DECAY, BATCH_ROWS[size], decay_start,
                                seed=1234, start_step=start_step)
        loader = iter(DataLoader(stream, batch_size=None, num_workers=0))
        next(loader)
        batches, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            next(loader)
            batches += 1
        elapsed = time.perf_counter() - started
        result[phase] = BATCH_ROWS[size] * config.max_seq_len * batches / elapsed
    return {"tokens_per_s": min(result.values()), "by_phase": result,
            "batch": f"{BATCH_ROWS[size]}x{config.max_seq_len}"}


def tokenizer_and_shards(size: str, train: bool) -> dict:
    vocab_size = architecture(size).vocab_size
    tokenizer_s = None
    with tempfile.TemporaryDirectory(prefix="xm2-perf-data-") as folder:
        if train:
            started = time.perf_counter()
            train_tokenizer(vocab_size, CORPUS, Path(folder) / f"unigram-{vocab_size}.model")
            tokenizer_s = time.perf_counter() - started
        existing = ROOT / default_tokenizer_path(vocab_size)
        started = time.perf_counter()
        directory = write_shards(CORPUS, existing, Path(folder) / "shards", source_names(CORPUS))
        shards_s = time.perf_counter() - started
        tokens = sum(json.loads(meta.read_text())["tokens"] for meta in directory.glob("*/*.json"))
    return {"vocab_size": vocab_size, "tokenizer_training_s": tokenizer_s,
            "shard_writing_s": shards_s, "shard_tokens": tokens,
            "shard_tokens_per_s": tokens / shards_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["nano", "tiny"])
    parser.add_argument("--tokenizers", nargs="*", default=["nano"],
                        help="sizes whose tokenizer is trained (about a minute or two each)")
    parser.add_argument("--quick", action="store_true",
                        help="1 s per phase, no tokenizer training")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 3.0
    trained = [] if args.quick else args.tokenizers
    report = {"pipeline": {size: pipeline(size, seconds) for size in args.sizes},
              "preparation": {size: tokenizer_and_shards(size, size in trained)
                              for size in args.sizes}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
