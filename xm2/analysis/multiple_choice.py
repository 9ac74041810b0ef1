"""Multiple-choice evaluation by the log-likelihood of each option (lm-evaluation-harness style).

Two formats:

- ``letter``: the options are listed as ``A. …`` in the prompt and the model scores the answer
  letters (`` A``, `` B``, …) after ``Answer:``; the MMLU protocol of the Xmodel-2 paper.
- ``cloze``: the prompt is the question alone and the model scores each full answer text; the
  option score is its log-likelihood per UTF-8 byte (lm-eval's ``acc_norm``), so that long
  answers are not penalised for their length. Small models sit at chance on the letter format but
  not on this one.

The option probabilities are the softmax of the option scores; the prediction is their argmax and
the confidence its probability. Requests are scored in right-padded batches: under causal attention
the padding after a sequence never changes the logits of the positions before it, so a batch gives
the same numbers as one forward pass per option.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from xm2.data.eval_sets import MultipleChoiceItem
from xm2.errors import ConfigError

Format = Literal["letter", "cloze"]
FORMATS = ("letter", "cloze")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Request:
    """A continuation to score after a context, both as text."""

    context: str
    continuation: str


def letter_prompt(item: MultipleChoiceItem) -> str:
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def cloze_prompt(item: MultipleChoiceItem, continuation_style: bool = False) -> str:
    # HellaSwag-like sets give a passage to continue, not a question.
    return item.question.strip() if continuation_style else f"Question: {item.question.strip()}\nAnswer:"


def item_requests(item: MultipleChoiceItem, format: Format, shots: list[MultipleChoiceItem],
                  continuation_style: bool = False) -> list[Request]:
    """One request per option of ``item``, after ``shots`` solved examples."""
    if format == "letter":
        solved = "".join(f"{letter_prompt(s)} {LETTERS[s.gold]}\n\n" for s in shots)
        header = (f"The following are multiple choice questions (with answers) about "
                  f"{item.subject.replace('_', ' ')}.\n\n" if item.subject else "")
        context = header + solved + letter_prompt(item)
        return [Request(context, f" {LETTERS[i]}") for i in range(len(item.choices))]
    if format == "cloze":
        solved = "".join(f"{cloze_prompt(s, continuation_style)} {s.choices[s.gold]}\n\n"
                         for s in shots)
        context = solved + cloze_prompt(item, continuation_style)
        return [Request(context, f" {choice.strip()}") for choice in item.choices]
    raise ConfigError(f"multiple-choice format={format!r}; allowed: {', '.join(FORMATS)}")


def encode_request(tokenizer, request: Request, max_len: int, boundary_id: int) -> tuple[list[int], int]:
    """Token ids of boundary + context + continuation, cut from the left to ``max_len + 1``.

    Returns the ids and the number of continuation tokens at their end. The context starts after a
    document boundary (EOS), as every training document does. Context and continuation are encoded
    together and split after the context's own tokens, as lm-eval does: encoded alone, a
    continuation such as `` Paris`` would gain a word-boundary token of its own (``▁`` ``▁Paris``)
    that the model never sees inside a text.
    """
    context, continuation = request.context, request.continuation
    # A trailing space of the context belongs to the continuation (its word-boundary piece).
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    if not continuation_ids:
        raise ConfigError(f"continuation {request.continuation!r} encodes to no tokens")
    if len(continuation_ids) > max_len:
        raise ConfigError(f"continuation {request.continuation[:60]!r} has {len(continuation_ids)} "
                          f"tokens, more than the model's context of {max_len}")
    ids = ([boundary_id, *context_ids, *continuation_ids])[-(max_len + 1):]
    return ids, len(continuation_ids)


@torch.no_grad()
def score_requests(model: torch.nn.Module, encoded: list[tuple[list[int], int]],
                   batch_size: int = 32, return_greedy: bool = False):
    """Sum of log-probabilities of each request's continuation tokens, in batches.

    ``model`` maps (batch, seq) ids to (batch, seq, vocab) logits. Requests whose inputs are the
    same token sequence share one forward pass (in the letter format, all options of a question
    differ only in their last token, the one being predicted). Inputs are sorted by length so that
    batches carry little padding.

    With ``return_greedy``, returns ``(scores, greedy)``: ``greedy[i]`` says whether every
    continuation token of request ``i`` is the model's most likely one (lm-eval's ``is_greedy``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    inputs_of: dict[tuple[int, ...], int] = {}
    owner = [inputs_of.setdefault(tuple(ids[:-1]), len(inputs_of)) for ids, _ in encoded]
    unique = list(inputs_of)
    readers: list[list[int]] = [[] for _ in unique]
    for request, sequence in enumerate(owner):
        readers[sequence].append(request)
    scores = np.zeros(len(encoded))
    greedy = np.zeros(len(encoded), dtype=bool)
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = torch.zeros(len(chunk), max(len(unique[i]) for i in chunk), dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, :len(unique[i])] = torch.tensor(unique[i])
        logits = model(batch.to(device))
        for row, i in enumerate(chunk):
            for request in readers[i]:
                ids, n_continuation = encoded[request]
                targets = torch.tensor(ids[-n_continuation:], device=logits.device)
                # Only the positions that predict the continuation need a softmax.
                log_probs = F.log_softmax(logits[row, len(ids) - 1 - n_continuation:len(ids) - 1]
                                          .float(), dim=-1)
                scores[request] = log_probs.gather(1, targets[:, None]).sum().item()
                if return_greedy:
                    greedy[request] = bool((log_probs.argmax(dim=-1) == targets).all())
    return (scores, greedy) if return_greedy else scores


@dataclass
class MultipleChoiceResult:
    """Per-item option probabilities and what follows from them."""

    probabilities: list[np.ndarray]
    gold: np.ndarray
    subjects: list[str] = field(default_factory=list)

    @property
    def predicted(self) -> np.ndarray:
        return np.array([int(np.argmax(p)) for p in self.probabilities])

    @property
    def confidence(self) -> np.ndarray:
        return np.array([float(np.max(p)) for p in self.probabilities])

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.gold

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def chance(self) -> float:
        """The accuracy of guessing uniformly."""
        return float(np.mean([1 / len(p) for p in self.probabilities]))


def pick_shots(items: list[MultipleChoiceItem], index: int, shots: int, seed: int) -> list:
    """``shots`` other items as solved examples, the same for an item on every call."""
    if shots == 0:
        return []
    others = [i for i in range(len(items)) if i != index]
    if shots > len(others):
        raise ConfigError(f"shots={shots} needs more than {len(items)} items in the set")
    return [items[i] for i in random.Random(seed * 1_000_003 + index).sample(others, shots)]


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    items: list[MultipleChoiceItem],
    format: Format = "letter",
    shots: int = 0,
    max_len: int = 256,
    boundary_id: int = 1,
    batch_size: int = 32,
    continuation_style: bool = False,
    seed: int = 0,
) -> MultipleChoiceResult:
    """Score every option of every item and return the option probabilities.

    ``tokenizer`` needs ``encode(str) -> list[int]`` (SentencePiece). ``max_len`` is the model's
    context; longer prompts lose their beginning, as in lm-evaluation-harness.
    """
    if format not in FORMATS:
        raise ConfigError(f"multiple-choice format={format!r}; allowed: {', '.join(FORMATS)}")
    if shots < 0:
        raise ConfigError(f"shots={shots} must be >= 0")
    if not items:
        raise ConfigError("no items to evaluate")
    requests, owners = [], []
    for index, item in enumerate(items):
        for request in item_requests(item, format, pick_shots(items, index, shots, seed),
                                     continuation_style):
            requests.append(request)
            owners.append(index)
    encoded = [encode_request(tokenizer, r, max_len, boundary_id) for r in requests]
    log_likelihoods = score_requests(model, encoded, batch_size)
    if format == "cloze":
        log_likelihoods = log_likelihoods / np.array(
            [max(1, len(r.continuation.strip().encode("utf-8"))) for r in requests])
    probabilities = []
    owners_array = np.array(owners)
    for index in range(len(items)):
        scores = torch.from_numpy(log_likelihoods[owners_array == index])
        probabilities.append(torch.softmax(scores, dim=0).numpy())
    return MultipleChoiceResult(probabilities, np.array([item.gold for item in items]),
                                [item.subject for item in items])
