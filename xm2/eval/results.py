"""The results of ``xm2 evaluate``: what each task gave, the tables, and reading them back.

One :class:`TaskResult` per task and checkpoint, gathered in a :class:`CheckpointResults` per
checkpoint; the table in the paper's layout as markdown (with the chance row and notes on what
was skipped or cut) and CSV, the JSON report read back into rows, and the results of a run read
back from MLflow.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xm2.errors import ConfigError
from xm2.eval.tasks import TASKS
from xm2.tracking import DEFAULT_TRACKING_URI

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


def rows_from_report(report: dict) -> list[CheckpointResults]:
    """The checkpoints' results back from a ``results.json`` (e.g. to print its table again)."""
    fields = set(TaskResult.__dataclass_fields__)
    return [CheckpointResults(row["checkpoint"], row["global_step"], row["run_id"], row["run_name"],
                              [TaskResult(**{k: v for k, v in result.items() if k in fields})
                               for result in row["tasks"].values()])
            for row in report["checkpoints"]]


def read_results(tracking_uri: str = DEFAULT_TRACKING_URI, experiment_name: str = "xm2",
                 run_id: str | None = None) -> dict:
    """The results JSON of an ``xm2 evaluate`` run (the newest one if ``run_id`` is None)."""
    from xm2.tracking.runs import TrackedRun

    if run_id is None:
        found = TrackedRun.latest(tracking_uri, experiment_name, "tags.`xm2.evaluate` = 'suite' "
                                  "and attributes.status = 'FINISHED'")
        if found is None:
            raise ConfigError(f"no finished `xm2 evaluate` run in experiment {experiment_name!r} "
                              f"of {tracking_uri}")
        run_id = found.run_id
    local = TrackedRun.attach(tracking_uri, run_id).download("evaluation/results.json")
    return {"run_id": run_id, **json.loads(Path(local).read_text())}
