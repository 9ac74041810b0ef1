"""Checks on the committed corpus in data/corpus (built by scripts/build_corpus.py).

Stdlib + pytest only, and fast: the whole corpus is about 6 MB of gzip.  Set XM2_CORPUS_DIR to
check another build (e.g. a fresh one in /tmp) against the same rules.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

CORPUS = Path(os.environ.get("XM2_CORPUS_DIR",
                             Path(__file__).resolve().parents[1] / "data" / "corpus"))
SOURCES = {"prose": "pretraining", "code": "pretraining", "docs": "pretraining",
           "instruct_code": "instruction", "instruct_math": "instruction"}
INSTRUCTION_RE = re.compile(r"\AQuestion:\n(?P<q>.+?)\n\nAnswer:\n(?P<a>.+)\Z", re.S)
SPLITS = ("train", "val")


def normalise(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus(manifest) -> dict[str, dict[str, list[str]]]:
    """{source: {split: [text, ...]}}, read straight from the .jsonl.gz files."""
    data: dict[str, dict[str, list[str]]] = {}
    for name in manifest["sources"]:
        data[name] = {}
        for split in SPLITS:
            docs = []
            with gzip.open(CORPUS / name / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    assert list(record) == ["text"], f"{name}/{split}: keys {list(record)}"
                    assert isinstance(record["text"], str) and record["text"].strip()
                    docs.append(record["text"])
            data[name][split] = docs
    return data


def test_sources_and_kinds(manifest):
    sources = manifest["sources"]
    for name, kind in SOURCES.items():
        assert name in sources, f"missing source {name}"
        assert sources[name]["kind"] == kind
    kinds = [entry["kind"] for entry in sources.values()]
    assert set(kinds) <= {"pretraining", "instruction"}
    assert kinds.count("pretraining") >= 3
    assert kinds.count("instruction") >= 1
    for name, entry in sources.items():
        for key in ("description", "origin", "licence"):
            assert isinstance(entry[key], str) and entry[key], f"{name}: empty {key}"


def test_manifest_matches_files(manifest, corpus):
    for name, entry in manifest["sources"].items():
        for split in SPLITS:
            docs = corpus[name][split]
            assert docs, f"{name}/{split} is empty"
            assert entry[f"{split}_docs"] == len(docs), f"{name}/{split} doc count"
            assert entry[f"{split}_bytes"] == sum(len(d.encode("utf-8")) for d in docs), \
                f"{name}/{split} byte count"
            path = CORPUS / name / f"{split}.jsonl.gz"
            recorded = entry.get("files", {}).get(split)
            if recorded:
                assert recorded["gz_bytes"] == path.stat().st_size
                assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_val_splits_are_big_enough(manifest):
    # Every held-out split must be large enough for a stable loss estimate (~40 KB).
    for name, entry in manifest["sources"].items():
        assert entry["val_bytes"] >= 40_000, f"{name}: val only {entry['val_bytes']} bytes"
        assert entry["val_docs"] < entry["train_docs"]


def test_no_document_in_both_splits(corpus):
    train = {normalise(d) for source in corpus.values() for d in source["train"]}
    for name, source in corpus.items():
        leaked = [d for d in source["val"] if normalise(d) in train]
        assert not leaked, f"{name}: {len(leaked)} val documents also in train"


def test_no_exact_duplicates(corpus):
    seen: set[str] = set()
    for name, source in corpus.items():
        for split in SPLITS:
            for doc in source[split]:
                key = normalise(doc)
                assert key not in seen, f"{name}/{split}: duplicate document {doc[:60]!r}"
                seen.add(key)


def test_instruction_template(manifest, corpus):
    for name, entry in manifest["sources"].items():
        questions = {}
        for split in SPLITS:
            for doc in corpus[name][split]:
                match = INSTRUCTION_RE.match(doc)
                if entry["kind"] != "instruction":
                    assert not doc.startswith("Question:\n") or match is None
                    continue
                assert match, f"{name}/{split}: not in the template: {doc[:80]!r}"
                question, answer = match["q"], match["a"]
                assert question.strip() == question and question
                assert answer.strip() == answer and answer
                questions.setdefault(split, set()).add(normalise(question))
        if entry["kind"] == "instruction":
            assert not questions["train"] & questions["val"], f"{name}: question in both splits"


def test_decontamination_reported(manifest):
    report = manifest["build"]["decontamination"]
    assert report["ngram"] == 13
    assert report["eval_sets"]["benchmarks"], "no benchmark n-grams were loaded"
    for required in ("GSM8K", "MATH", "HumanEval", "MBPP", "ARC", "MMLU"):
        assert report["eval_sets"]["benchmarks"].get(required, {}).get("13grams", 0) > 0, required
    for name, entry in manifest["sources"].items():
        result = entry["decontamination"]
        assert result["dropped"] == sum(result["dropped_by_benchmark"].values())
        assert report["dropped"][name] == result["dropped"]


def test_corpus_is_small():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 20 * 1024 * 1024, f"data/corpus is {total / 2**20:.1f} MiB"
