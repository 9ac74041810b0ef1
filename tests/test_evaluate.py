"""`xm2 evaluate`: each task's prompt and answer extraction, the shipped sets, and the suite end to
end on a tiny checkpoint through the real command, MLflow store and notebook."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_cli import xm2
from xm2.data.eval_sets import (
    GENERATION_FIELDS,
    LICENCES,
    MultipleChoiceItem,
    load_generation_set,
    read_items,
)
from xm2.eval import tasks
from xm2.eval.tasks import TASKS, resolve_suite

DATA = ROOT / "data" / "eval"


# --- answer extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (" She has 3 + 4 = 7 apples. So the answer is 7.", "7"),
    (" 1,000 + 250 = 1,250. So the answer is $1,250.\n", "1250"),
    (" The total is 12 dollars, then 5 more: 17.", "17"),       # no "answer is": the last number
    (" It costs -3.5 then 4.", "4"),
    (" #### 42", "42"),
    (" I do not know.", None),
])
def test_gsm8k_final_number(completion, expected):
    assert tasks.gsm8k_extract(completion) == expected


def test_gsm8k_gold_and_score_on_a_shipped_problem():
    record = load_generation_set("gsm8k", DATA)[0]
    gold = tasks.gsm8k_gold(record["answer"])
    assert gold and gold == record["answer"].split("#### ")[-1].replace(",", "").strip()
    assert tasks.gsm8k_scores(record, f" Some steps. So the answer is {gold}.") == {
        "exact_match": 1.0, "exact_match_strict": 1.0}
    # flexible-extract takes the last number; strict needs "The answer is".
    assert tasks.gsm8k_scores(record, f" it is {gold}") == {"exact_match": 1.0,
                                                          "exact_match_strict": 0.0}


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left(3,\\frac{\\pi}{2}\\right)"),  # \left keeps its "ft"
    ("the area is \\boxed{10,000 \\text{ square feet}}", "10000"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{x = 5}", "5"),
])
def test_math_boxed_answer_normalisation(text, expected):
    assert tasks.normalize_math_answer(tasks.last_boxed(text)) == expected


def test_math_extraction_prefers_the_final_answer_line():
    solution = "We get $\\boxed{\\frac{2}{3}}$.\nFinal Answer: The final answer is $\\frac23$. I hope it is correct."
    assert tasks.math_extract(solution) == "\\frac{2}{3}"
    assert tasks.math_extract(" so it is \\boxed{24}.") == "24"       # no final-answer line: last box
    assert tasks.math_extract(" no answer here") is None
    assert tasks.math_scores({"solution": "... $\\boxed{24}$."},
                             " Final Answer: The final answer is $24$. I hope it is correct.") == {
        "exact_match": 1.0}


# --- prompts (lm-evaluation-harness's formats) -------------------------------------------------

def test_multiple_choice_prompts_follow_lm_eval():
    boolq = MultipleChoiceItem("is the sky blue", ("no", "yes"), 1, context="Sky -- The sky is blue.")
    (no, yes) = tasks.multiple_choice_requests("boolq", boolq)
    assert no.context == "Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert (no.continuation, yes.continuation) == (" no", " yes")
    arc = MultipleChoiceItem("Which is a metal?", ("iron", "wood"), 0)
    assert tasks.multiple_choice_requests("arc_easy", arc)[1].context == "Question: Which is a metal?\nAnswer:"
    assert tasks.multiple_choice_requests("openbookqa", arc)[0].context == "Which is a metal?"
    # Winogrande: partial scoring, the option fills the blank, the rest of the sentence is scored.
    wino = MultipleChoiceItem("Sarah was better than Maria so _ got the easy cases.", ("Sarah", "Maria"), 1)
    requests = tasks.multiple_choice_requests("winogrande", wino)
    assert [r.context for r in requests] == ["Sarah was better than Maria so Sarah",
                                             "Sarah was better than Maria so Maria"]
    assert {r.continuation for r in requests} == {" got the easy cases."}
    hellaswag = MultipleChoiceItem("A man is on a roof. he", ("rips tiles [title] Then [step] sits.", "sits."),
                                   0, subject="Roofing")
    first = tasks.multiple_choice_requests("hellaswag", hellaswag)[0]
    # lm-eval's preprocessing: " [title]" becomes ". ", other bracketed artefacts go.
    assert (first.context, first.continuation) == ("Roofing: A man is on a roof. he", " rips tiles. Then sits.")
    mmlu = MultipleChoiceItem("2+2?", ("3", "4", "5", "6"), 1, subject="elementary_mathematics")
    letters = tasks.multiple_choice_requests("mmlu", mmlu)
    assert [r.continuation for r in letters] == [" A", " B", " C", " D"]
    assert letters[0].context.startswith("The following are multiple choice questions (with answers) "
                                         "about elementary mathematics.\n\n2+2?\nA. 3")


def test_generation_prompts_have_the_papers_shots():
    gsm8k = tasks.gsm8k_prompt("How many?", 5)
    assert gsm8k.count("Question:") == 6 and gsm8k.endswith("Question: How many?\nAnswer:")
    math = tasks.math_prompt("Find x.", 4)
    assert math.count("Problem:") == 5 and math.endswith("Problem:\nFind x.\n\nSolution:")
    record = load_generation_set("mbpp", DATA)[0]
    mbpp = tasks.mbpp_prompt(record, 3)
    assert mbpp.count("[BEGIN]") == 4 and mbpp.count("[DONE]") == 3 and mbpp.endswith("[BEGIN]\n")
    assert record["test_list"][0] in mbpp
    assert (TASKS["gsm8k"].shots, TASKS["math"].shots, TASKS["mmlu"].shots, TASKS["mbpp"].shots) == (5, 4, 0, 3)


def test_suites_and_their_errors():
    assert [t.name for t in resolve_suite("commonsense")] == [
        "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande"]
    assert len(resolve_suite("paper")) == 14 and [t.name for t in resolve_suite("gsm8k,mmlu")] == ["gsm8k", "mmlu"]
    with pytest.raises(ValueError, match="unknown suite or task 'gsm9k'; allowed: suites paper"):
        resolve_suite(["gsm9k"])


# --- shipped data ------------------------------------------------------------------------------

def test_shipped_sets_load_and_code_references_pass_in_the_sandbox():
    for name in ("boolq", "openbookqa", "winogrande"):
        items = read_items(DATA / f"{name}.jsonl.gz")
        assert len(items) == 200 and len({item.gold for item in items}) == 2 or name == "openbookqa"
        assert name in LICENCES
    assert all(item.context for item in read_items(DATA / "boolq.jsonl.gz"))
    assert all(item.question.count("_") >= 1 for item in read_items(DATA / "winogrande.jsonl.gz"))
    for name in set(GENERATION_FIELDS) - {"bbh"}:
        assert len(load_generation_set(name, DATA)) == (164 if name == "humaneval" else 200)
    assert not (DATA / "sciq.jsonl.gz").exists()      # CC BY-NC: prepared locally, never shipped
    assert not (DATA / "bbh.jsonl.gz").exists()       # no offline source
    assert sum(p.stat().st_size for p in DATA.glob("*.jsonl.gz")) < 2_000_000
    # The data and the program assembly agree: each reference solution passes its own tests.
    from xm2.eval import code, sandbox

    humaneval = load_generation_set("humaneval", DATA, limit=2)
    mbpp = load_generation_set("mbpp", DATA, limit=2)
    programs = [code.humaneval_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"])
                for r in humaneval]
    programs += [code.mbpp_program(r["code"], r["test_list"], r["test_setup_code"]) for r in mbpp]
    assert [r.status for r in sandbox.execute_many(programs, timeout_s=20)] == ["passed"] * 4
    assert tasks.math_gold(load_generation_set("math", DATA)[0]["solution"])


# --- the suite ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracked_checkpoint(tokenizer_path, tmp_path_factory) -> Path:
    """A small random decoder saved as `xm2 fit` saves it, with a record naming its training run."""
    import torch

    from xm2.checkpoint import save_checkpoint_file
    from xm2.config import ModelConfig
    from xm2.data.tokenizer import file_digest
    from xm2.model import Decoder

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=64, dim_model_base=32)
    torch.manual_seed(0)
    model = Decoder(config)
    path = tmp_path_factory.mktemp("evaluate") / "runs" / "step=12.ckpt"
    save_checkpoint_file({
        "global_step": 12,
        "state_dict": {f"model.{name}": tensor for name, tensor in model.state_dict().items()},
        "hyper_parameters": {"architecture": asdict(config)},
        "xm2": {"record": {"global_step": 12, "run_id": "0123456789abcdef", "run_name": "tiny",
                           "tokenizer_path": str(tokenizer_path),
                           "tokenizer_sha256": file_digest(tokenizer_path)}},
    }, path)
    return path


def test_code_tasks_run_in_the_sandbox_only_with_opt_in(tracked_checkpoint, tmp_path, monkeypatch):
    from xm2.eval import suite

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(FileNotFoundError, match="checkpoint .*none.ckpt does not exist"):
        suite.evaluate(str(tmp_path / "none.ckpt"), tracking_uri=uri)
    assert not (tmp_path / "mlflow.db").exists()      # refused before any run was opened
    skipped = suite.evaluate(str(tracked_checkpoint), ["humaneval"], limit=2,
                             tracking_uri=uri)
    (result,) = skipped["checkpoints"][0]["tasks"].values()
    assert result["status"] == "skipped" and "--allow_code_execution true" in result["reason"]

    # Opted in: the completions run against the tests; reference solutions all pass.
    records = {r["prompt"]: r["canonical_solution"] for r in load_generation_set("humaneval", DATA)}
    monkeypatch.setattr(suite, "_generate", lambda task, prompts, *args: (
        [records[p] for p in prompts], 0, 64))
    ran = suite.evaluate(str(tracked_checkpoint), ["humaneval"], limit=2, tracking_uri=uri,
                         allow_code_execution=True)
    (result,) = ran["checkpoints"][0]["tasks"].values()
    assert result["status"] == "ran" and result["metrics"]["pass_at_1"] == 1.0


def test_bbh_runs_from_a_copy_of_ones_own(tracked_checkpoint, tmp_path):
    from xm2.data.eval_sets import write_records
    from xm2.eval import suite

    records = [{"input": f"not ( {a} ) is", "target": str(not a), "subject": "boolean_expressions"}
               for a in (True, False, True, False)]
    records += [{"input": f"{n} + 1 =", "target": str(n + 1), "subject": "arithmetic"} for n in range(4)]
    prompt = tasks.bbh_prompt(records[0], tasks.bbh_shots(records, 0, 3))
    assert prompt.count("Q: not") == 4 and "+ 1" not in prompt and prompt.endswith("Q: not ( True ) is\nA:")
    assert tasks.bbh_scores(records[0], " False\n") == {"exact_match": 1.0}
    write_records(records, tmp_path / "bbh.jsonl.gz")
    report = suite.evaluate(str(tracked_checkpoint), ["bbh"], data_dir=str(tmp_path),
                            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (result,) = report["checkpoints"][0]["tasks"].values()
    assert result["status"] == "ran" and result["items"] == 8 and 0 <= result["score"] <= 100


@pytest.mark.slow
def test_evaluate_command_logs_the_table_and_every_score(tracked_checkpoint, tmp_path):
    from tests.test_notebooks import execute, images, text

    suite = "[arc_easy,boolq,winogrande,sciq,gsm8k,math,bbh,mmlu,humaneval]"
    result = xm2("evaluate", str(tracked_checkpoint), "--suite", suite, "--limit", "3",
                 "--data_dir", str(DATA), "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    assert "| Checkpoint | ARC-e | BoolQ | SciQ | Winogrande | Commonsense avg | GSM8K | MATH | BBH |" in printed
    assert "| tiny step 12 |" in printed and "(3/4)" in printed     # SciQ skipped: 3 of 4 ran
    assert "SciQ skipped: no sciq.jsonl.gz" in printed and "BBH skipped: no offline source" in printed
    assert "HumanEval skipped: runs model-written code: only with --allow_code_execution true" in printed
    # The tiny model's 64-token context cuts every BoolQ passage and every few-shot prompt.
    assert "BoolQ 3/3" in printed and "GSM8K 3/3" in printed

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("xm2").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`xm2.evaluate` = 'suite'")
    (child,) = client.search_runs([experiment], "tags.`xm2.evaluate` = 'checkpoint'")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["xm2.checkpoint_run_id"] == "0123456789abcdef"
    assert child.info.run_name == "tiny-evaluate-step12"
    assert "no offline source" in child.data.tags["xm2.skipped.bbh"]
    history = client.get_metric_history(child.info.run_id, "eval/arc_easy/acc_norm")
    assert [m.step for m in history] == [12] and 0 <= history[0].value <= 1
    metrics = child.data.metrics
    assert metrics["eval/boolq/truncated"] == 3 and metrics["eval/arc_easy/chance"] == pytest.approx(0.25, abs=0.1)
    assert {"eval/gsm8k/exact_match", "eval/math/exact_match", "eval/mmlu/acc",
            "eval/winogrande/acc", "eval/commonsense_avg", "eval/reasoning_avg"} <= set(metrics)
    assert not [k for k in metrics if k.startswith(("eval/sciq", "eval/bbh", "eval/humaneval"))]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/results.md", "evaluation/results.csv", "evaluation/results.json"}
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    row = report["checkpoints"][0]
    assert row["global_step"] == 12 and row["tasks"]["sciq"]["status"] == "skipped"
    assert row["averages"]["commonsense"]["tasks_ran"] == 3
    from xm2.eval.results import markdown_table, rows_from_report

    # The table prints again from the JSON, chance row and notes included.
    assert markdown_table(rows_from_report(report)) in printed and "| *chance* | *" in printed
    assert (tmp_path / "out" / "results.csv").read_text().splitlines()[0].startswith(
        "checkpoint,global_step,run_id,arc_easy,boolq,sciq,winogrande,average_commonsense")

    # The notebook finds the evaluation in the store and draws its table.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XM2_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
        notebook = execute(ROOT / "notebooks" / "evaluation.ipynb")
    assert images(notebook) and "tiny step 12" in text(notebook)
