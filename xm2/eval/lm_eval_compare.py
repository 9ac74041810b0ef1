"""lm-eval through :class:`~xm2.eval.lm_eval.Xm2LM` against xm2's own multiple-choice scorer.

Both score the same items of a local multiple-choice file with the same prompts (the adapter's
tests check that lm-eval builds exactly the contexts and continuations of
:func:`xm2.analysis.multiple_choice.item_requests`) and the same batched engine
(:func:`~xm2.analysis.multiple_choice.score_requests`). What can differ is the tokenization of
the answer: lm-eval encodes context and answer together and splits them, as the text would be
tokenized in a training document; xm2's scorer encodes the answer alone, which with
SentencePiece's dummy prefix turns `` Paris`` into ``▁`` + ``▁Paris``. ::

    python -m xm2.eval.lm_eval_compare --checkpoint <ckpt> --data data/eval/arc_easy.jsonl.gz
"""

from __future__ import annotations

import json
import time

import numpy as np

from xm2.analysis.multiple_choice import (
    evaluate_multiple_choice,
    item_requests,
    score_requests,
)
from xm2.data.eval_sets import read_items
from xm2.eval.lm_eval import Xm2LM, evaluate_tasks, multiple_choice_task


def compare(checkpoint: str, data: str, format: str = "cloze", limit: int | None = None,
            batch_size: int = 32, continuation_style: bool = False,
            tokenizer_path: str | None = None, device: str | None = None) -> dict:
    """Accuracy and time of lm-eval and of xm2's scorer on the first ``limit`` items of ``data``.

    Args:
        checkpoint: An xm2 checkpoint (.ckpt).
        data: A multiple-choice JSONL in xm2's format (``data/eval/*.jsonl.gz``).
        format: cloze (answer texts; xm2 normalises by UTF-8 bytes, lm-eval's acc_norm by
            characters) or letter (answer letters).
        limit: Only the first this many items (default all).
        batch_size: Sequences per forward pass, for both.
        continuation_style: Cloze without the ``Question:`` frame (HellaSwag).
        tokenizer_path: The tokenizer, if not where the checkpoint's record says.
        device: cpu or cuda (default: cuda if available).
    """
    lm = Xm2LM(checkpoint=checkpoint, batch_size=batch_size, device=device,
               tokenizer_path=tokenizer_path)
    items = read_items(data)[:limit] if limit else read_items(data)
    boundary = lm.prefix_token_id

    start = time.perf_counter()
    task = multiple_choice_task(data, format=format, continuation_style=continuation_style)
    output = evaluate_tasks(lm, [task], limit=limit, log_samples=True)
    lm_eval_seconds = time.perf_counter() - start
    metrics = output["results"][task["task"]]
    samples = sorted(output["samples"][task["task"]], key=lambda s: s["doc_id"])
    lm_eval_scores = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]

    start = time.perf_counter()
    xm2 = evaluate_multiple_choice(lm.model, lm.tokenizer, items, format, max_len=lm.max_length,
                                   boundary_id=boundary, batch_size=batch_size,
                                   continuation_style=continuation_style)
    xm2_seconds = time.perf_counter() - start

    # xm2's engine on lm-eval's tokenization of the same requests: what is left of the
    # difference once the answer is tokenized in running text.
    requests = [r for item in items for r in item_requests(item, format, [], continuation_style)]
    joint = []
    for request in requests:
        context, continuation = lm._encode_pair(request.context, request.continuation)
        joint.append((context + continuation)[-(lm.max_length + 1):])
    raw = score_requests(lm.model, [(ids, len(lm._encode_pair(r.context, r.continuation)[1]))
                                    for ids, r in zip(joint, requests, strict=True)], batch_size)
    joint_scores = np.split(raw, np.cumsum([len(item.choices) for item in items])[:-1])
    if format == "cloze":
        lengths = [np.array([len(c.strip().encode("utf-8")) for c in item.choices]) for item in items]
        joint_predicted = [int(np.argmax(s / n)) for s, n in zip(joint_scores, lengths, strict=True)]
        lm_eval_accuracy = metrics["acc_norm,none"]
    else:
        joint_predicted = [int(np.argmax(s)) for s in joint_scores]
        lm_eval_accuracy = metrics["acc,none"]
    differences = np.concatenate([a - b for a, b in zip(lm_eval_scores, joint_scores, strict=True)])
    gold = np.array([item.gold for item in items])
    return {
        "data": str(data), "format": format, "items": len(items),
        "checkpoint": str(checkpoint), "global_step": lm.info.get("global_step"),
        "chance": xm2.chance,
        "lm_eval": {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                    "seconds": round(lm_eval_seconds, 1)},
        "xm2_scorer": {"accuracy": xm2.accuracy, "seconds": round(xm2_seconds, 1)},
        "xm2_scorer_on_lm_eval_tokens": {
            "accuracy": float(np.mean(np.array(joint_predicted) == gold)),
            "lm_eval_accuracy_it_matches": lm_eval_accuracy,
            "max_abs_option_loglik_difference": float(np.abs(differences).max())},
        "same_prediction_lm_eval_vs_xm2_scorer": float(np.mean(np.array(joint_predicted)
                                                               == xm2.predicted)),
    }


def main() -> None:
    from jsonargparse import CLI

    print(json.dumps(CLI(compare, as_positional=False), indent=2))


if __name__ == "__main__":
    main()
