"""The lm-eval adapter against direct forward passes, and lm-eval's own command line end to end."""

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from tests.conftest import ROOT
from tests.test_errors import CONSOLE_SCRIPT, one_line_error
from xm2.analysis.multiple_choice import item_requests
from xm2.data.eval_sets import read_items
from xm2.data.tokenizer import EOS_ID
from xm2.errors import ConfigError
from xm2.eval.generate import generate
from xm2.eval.lm_eval import (
    Xm2LM,
    continuation_windows,
    evaluate_tasks,
    multiple_choice_task,
    sampling_settings,
    text_task,
    write_task_yaml,
)

QUESTIONS = [
    {"question": "Which gas do plants take in to make food?",
     "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "gold": 1, "subject": "biology"},
    {"question": "What is the boiling point of water at sea level?",
     "choices": ["50 degrees", "100 degrees", "150 degrees"], "gold": 1, "subject": "physics"},
    {"question": "Which planet is closest to the sun?",
     "choices": ["Mercury", "Venus", "Earth", "Mars"], "gold": 0, "subject": "astronomy"},
    {"question": "How many legs does a spider have?",
     "choices": ["six", "eight", "ten", "four"], "gold": 1, "subject": "biology"},
    {"question": "What do bees make?", "choices": ["milk", "silk", "honey", "wax paper"],
     "gold": 2, "subject": "biology"},
    {"question": "Which tool measures temperature?",
     "choices": ["ruler", "thermometer", "scale", "compass"], "gold": 1, "subject": "physics"},
]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint) -> Xm2LM:
    return Xm2LM(checkpoint=str(tiny_checkpoint), batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "tiny_mc.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.writelines(json.dumps(q) + "\n" for q in QUESTIONS)
    return path


@torch.no_grad()
def direct(model, ids: list[int], scored: int) -> tuple[float, bool]:
    """One forward pass over ``ids[:-1]``: sum of log-softmax at the last ``scored`` targets."""
    log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0, -scored:].float(), dim=-1)
    targets = torch.tensor(ids[-scored:])
    return (log_probs.gather(1, targets[:, None]).sum().item(),
            bool((log_probs.argmax(-1) == targets).all()))


def long_text(lm, tokens: int) -> str:
    words = "the cat sat on a mat while seven dogs ran past it quickly".split()
    text = " ".join(words[i % len(words)] for i in range(tokens))
    assert len(lm.tok_encode(text)) >= tokens
    return text


def test_loglikelihood_equals_a_direct_forward_pass(lm):
    sp, context = lm.tokenizer, lm.max_length
    long_context = long_text(lm, 2 * context)
    requests = [("Question: What do bees make?\nAnswer:", " honey"),
                ("Question: What do bees make?\nAnswer:", " wax paper"),
                ("Question: What do bees make?\nAnswer: ", "honey"),  # the space moves
                ("", "The cat"),
                (long_context, " and then it rained")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in requests])
    for (text, continuation), (score, greedy) in zip(requests, results, strict=True):
        text, continuation = text.rstrip(), text[len(text.rstrip()):] + continuation
        whole = [EOS_ID, *sp.encode(text + continuation)]
        n_context = 1 + len(sp.encode(text)) if text else 1
        # Left-truncated to the context plus the last token, which is never an input.
        expected = direct(lm.model, whole[-(context + 1):], len(whole) - n_context)
        assert score == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]
    assert results[0][0] != results[1][0]


def test_greedy_flag_is_true_only_for_the_models_own_continuation(lm):
    context = [EOS_ID, *lm.tok_encode("Which planet is closest to the sun?")]
    ids = list(context)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    greedy_continuation = ids[len(context):]
    other = [*greedy_continuation[:-1], (greedy_continuation[-1] + 1) % 512]
    (_, is_greedy), (other_score, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy_continuation), (None, context, other)])
    assert is_greedy and not not_greedy
    in_memory = Xm2LM.from_model(lm.model, lm.tokenizer, batch_size=1)  # unbatched: the same
    ((score, greedy),) = in_memory._loglikelihood_tokens([(None, context, other)])
    assert score == pytest.approx(other_score, abs=1e-4) and not greedy


def test_a_continuation_longer_than_the_context_is_scored_once_per_token(lm):
    context, continuation = [EOS_ID, 5, 6], list(range(10, 10 + 2 * lm.max_length + 9))
    windows = continuation_windows(context, continuation, lm.max_length)
    scored = [token for ids, n in windows for token in ids[-n:]]
    assert scored == continuation and all(len(ids) <= lm.max_length + 1 for ids, _ in windows)
    ((score, _),) = lm._loglikelihood_tokens([(None, context, continuation)])
    assert score == pytest.approx(sum(direct(lm.model, ids, n)[0] for ids, n in windows), abs=1e-3)


def test_rolling_loglikelihood_scores_every_token_once_in_windows_of_the_context(lm):
    text = long_text(lm, 3 * lm.max_length)
    tokens, size = lm.tok_encode(text), lm.max_length
    assert len(tokens) % size  # a partial last window too
    expected = 0.0
    for start in range(0, len(tokens), size):
        chunk = tokens[start:start + size]
        if start == 0:
            window = [EOS_ID, *chunk]
        elif len(chunk) == size:
            window = [tokens[start - 1], *chunk]  # disjoint windows, as lm-eval's HF model
        else:
            window = tokens[-(size + 1):]  # the last, partial window sees a full context
        expected += direct(lm.model, window, len(chunk))[0]
    (score,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert score == pytest.approx(expected, abs=1e-3)
    short = "the cat sat on a mat"
    (score,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])
    whole = [EOS_ID, *lm.tok_encode(short)]
    assert score == pytest.approx(direct(lm.model, whole, len(whole) - 1)[0], abs=1e-4)


def test_a_local_text_task_scores_each_document_whole(lm, tmp_path):
    texts = [long_text(lm, 2 * lm.max_length + 5), "a short one", "The dogs ran past it."]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = text_task(path, name="xm2_tiny_text")
    result = evaluate_tasks(lm, [task], log_samples=True)
    expected = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)
                                         for t in texts])
    bits_per_byte = -sum(expected) / sum(len(t.encode()) for t in texts) / math.log(2)
    assert result["results"]["xm2_tiny_text"]["bits_per_byte,none"] == pytest.approx(bits_per_byte)


def test_generate_until_stops_at_until_and_is_generate(lm):
    prompt = "Question: Which tool measures temperature?\nAnswer:"
    free = generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=24)[0]
    assert len(free.strip()) > 6
    stop = free.strip()[3:5]
    requests = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 24}), 0),
                Instance("generate_until", {}, (prompt, {"max_gen_toks": 24, "do_sample": False}), 1),
                Instance("generate_until", {}, (prompt, {"until": stop, "max_gen_toks": 3}), 2)]
    stopped, unstopped, short = lm.generate_until(requests)
    assert stopped == free[:free.index(stop)] and unstopped == free
    assert len(lm.tok_encode(short)) <= 3 and free.startswith(short.strip()[:3])


def test_xm2_is_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("xm2") is Xm2LM
    assert get_model("dummy").__name__ == "DummyLM"  # registering xm2 hid these once
    with pytest.raises(ValueError, match="pretrained: not an xm2 model argument; allowed: checkpoint"):
        Xm2LM.create_from_arg_string("pretrained=gpt2", {"batch_size": 1})


def test_gen_kwargs_map_to_sampling_settings():
    assert sampling_settings({"until": "\n\n"}) == {"max_new_tokens": 256, "temperature": 0.0,
                                                     "top_p": 1.0, "stop": ["\n\n"]}
    assert sampling_settings({"temperature": 0.7, "do_sample": False})["temperature"] == 0.0
    assert sampling_settings({"temperature": 0.7})["temperature"] == 0.7
    assert sampling_settings({"do_sample": True, "top_p": 0.9}) == {
        "max_new_tokens": 256, "temperature": 1.0, "top_p": 0.9, "stop": []}


@pytest.mark.parametrize("format", ["cloze", "letter"])
def test_a_local_task_has_xm2s_prompts(lm, questions, format):
    """lm-eval builds the contexts and continuations of xm2's multiple-choice engine."""
    result = evaluate_tasks(lm, [multiple_choice_task(questions, format=format)], log_samples=True)
    samples = sorted(next(iter(result["samples"].values())), key=lambda s: s["doc_id"])
    for sample, item in zip(samples, read_items(questions), strict=True):
        assert [tuple(a) for a in sample["arguments"]] == [
            (r.context, r.continuation) for r in item_requests(item, format, [])]


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_local_task_offline(lm, questions, tiny_checkpoint, tmp_path):
    task = multiple_choice_task(questions, name="xm2_tiny_mc")
    in_process = evaluate_tasks(lm, [task])["results"]["xm2_tiny_mc"]
    write_task_yaml(task, tmp_path / "tasks")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "xm2.eval.lm_eval", "--model", "xm2",
         "--model_args", f"checkpoint={tiny_checkpoint},batch_size=4,device=cpu",
         "--include_path", str(tmp_path / "tasks"), "--tasks", "xm2_tiny_mc",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["xm2_tiny_mc"]["acc,none"] == in_process["acc,none"]
    assert results["results"]["xm2_tiny_mc"]["acc_norm,none"] == in_process["acc_norm,none"]
    assert results["config"]["model"] == "xm2" and results["config"]["global_step"] == 7
    assert results["config"]["model_batch_size"] == 4


def test_an_unknown_task_is_one_line_naming_it_and_how_to_list_tasks(lm, tiny_checkpoint,
                                                                    tmp_path):
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "lm-eval", "--model", "xm2", "--model_args",
         f"checkpoint={tiny_checkpoint},device=cpu", "--tasks", "no_such_task"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1",
             "HF_HUB_OFFLINE": "1"})
    assert one_line_error(result) == (
        "xm2: error: lm-eval does not know the task no_such_task (--tasks takes task, group or "
        "tag names, or task YAML files); list the known tasks with `xm2 lm-eval ls tasks`, "
        "adding --include_path <folder> for a folder of your own task YAMLs")
    with pytest.raises(ConfigError, match="lm-eval does not know the task no_such_task"):
        evaluate_tasks(lm, ["no_such_task"])  # lm-eval's KeyError there, the same line
