"""The decay study: WSD branches from several points of one stable run, and the decay-data question.

Each branch is a real ``xm2 fit --branch_from`` (an ``xm2`` process started by
:func:`xm2.run.run`) of a retained stable-phase checkpoint, decaying
for the same fraction of the tokens its source had seen. The study's MLflow run holds the figure of
the branches' validation losses against the stable trajectory (the WSD picture: each decay drops
below the stable curve, later ones end lower) and, at one point, a second branch that decays on
the *stable* mixture instead of the decay mixture, judged on every source's held-out loss, so the
value of the instruction-heavy decay data can be read off.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xm2.checkpoint import find_checkpoints
from xm2.errors import CheckpointError, ConfigError
from xm2.run import override_args, resolve, run
from xm2.schedule import data_phase
from xm2.tracking import DEFAULT_TRACKING_URI
from xm2.tracking.lineage import branches
from xm2.tracking.runs import TrackedRun

STUDY_TAG, MIXTURE_TAG = "xm2.decay_study", "xm2.decay_mixture"


@dataclass
class Branch:
    source_step: int
    decay_steps: int
    mixture: str  # "decay" (the recipe's decay mixture) or "stable" (the stable mixture kept)
    checkpoint: Path


def stable_checkpoints(root: str | Path, run_id: str) -> dict[int, Path]:
    """Retained checkpoints of ``run_id`` under ``root`` that lie in its stable phase, by step."""
    found = {}
    for path, record in find_checkpoints(root):
        step = record.get("global_step")
        decay_start = record.get("decay_start_step")
        if (record.get("run_id") == run_id and path.name != "last.ckpt" and step
                and data_phase(step, decay_start) == "stable"):
            found[int(step)] = path
    return dict(sorted(found.items()))


def stable_mix_for_decay(configs: list[str], overrides: list[str]) -> dict:
    """The stable mixture as a decay mixture, with the decay-only sources at weight 0.

    The mixtures are those ``xm2 fit`` would train with for these configs and overrides. Sources
    at weight 0 are never sampled but are still validated, so both branches of the comparison
    report the instruction sources' held-out loss.
    """
    data = resolve("fit", configs, overrides)["data"]
    return {**{name: 0.0 for name in data["decay"]}, **data["stable"]}


def _interpolate(curve: dict[int, float], step: int) -> float:
    steps = sorted(curve)
    return float(np.interp(step, steps, [curve[s] for s in steps]))


def decay_study(
    stable_run_id: str,
    configs: list[str] | None = None,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    runs_dir: str = "artifacts/runs",
    points: list[int] | None = None,
    decay_fraction: float = 0.2,
    mixture_point: int | None = None,
    overrides: list[str] | None = None,
    output: str = "artifacts/decay-study",
) -> str:
    """Branch decays from several stable-phase checkpoints of one run and plot them (WSD study).

    Args:
        stable_run_id: MLflow run id of the stable run (e.g. the run of `make train`).
        configs: The run's config files, as given to `xm2 fit` (default config/nano.yaml).
        tracking_uri: Where the stable run is tracked; branches and the study are logged there.
        runs_dir: Folder holding the run's checkpoints (trainer.default_root_dir).
        points: Source steps to branch from; default every retained stable-phase checkpoint.
        decay_fraction: Each branch decays for this fraction of its source's tokens.
        mixture_point: Source step of the decay-data comparison (a branch on the stable
            mixture beside the decay-mixture one); default the last point.
        overrides: Extra `xm2 fit` arguments for every branch (e.g. data paths).
        output: Folder for the figures and the summary table.
    """
    configs = configs or ["config/nano.yaml"]
    overrides = overrides or []
    if not 0 < decay_fraction <= 1:
        raise ConfigError(f"decay_fraction={decay_fraction} must be in (0, 1]")
    available = stable_checkpoints(runs_dir, stable_run_id)
    if not available:
        raise CheckpointError(
            f"no stable-phase checkpoint of run {stable_run_id} under {runs_dir}; keep step "
            "checkpoints in the recipe (ModelCheckpoint save_top_k: -1) and give runs_dir")
    points = points or list(available)
    missing = [p for p in points if p not in available]
    if missing:
        raise CheckpointError(f"no checkpoint of run {stable_run_id} at steps {missing}; "
                              f"retained stable-phase steps: {list(available)}")
    mixture_point = points[-1] if mixture_point is None else mixture_point
    if mixture_point not in points:
        raise ConfigError(f"mixture_point={mixture_point} is not one of the points {points}")
    plan = [Branch(p, max(1, round(decay_fraction * p)), "decay", available[p]) for p in points]
    plan.append(Branch(mixture_point, max(1, round(decay_fraction * mixture_point)), "stable",
                       available[mixture_point]))

    stable_run = TrackedRun.attach(tracking_uri, stable_run_id)
    stable = stable_run.run
    study = TrackedRun.start(tracking_uri, stable_run.experiment_name,
                             f"{stable.info.run_name}-decay-study",
                             tags={"xm2.study": "decay", "xm2.stable_run_id": stable_run_id},
                             params={"decay_fraction": decay_fraction, "points": points,
                                     "mixture_point": mixture_point, "configs": configs})
    with study:
        for number, branch in enumerate(plan, 1):
            print(f"[{number}/{len(plan)}] branch from step {branch.source_step}: "
                  f"{branch.decay_steps} decay steps on the {branch.mixture} mixture", flush=True)
            _run_branch(branch, configs, overrides, tracking_uri, stable.info.run_name,
                        study.run_id)
        summary = summarize(tracking_uri, stable_run_id, study.run_id)
        folder = Path(output) / study.run_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        study.log_artifact(folder / "summary.json")
        study.log_figure(wsd_figure(tracking_uri, stable_run_id, summary), folder / "wsd_branches.png")
        study.log_figure(mixture_figure(summary), folder / "decay_mixture.png")
        for row in summary["branches"]:
            label = f"step{row['source_step']}_{row['mixture']}"
            study.log_metrics({key: value for key, value in (
                (f"{label}/val_loss", row["val_loss"]),
                (f"{label}/below_stable", row["below_stable"])) if value is not None})
        study.log_metrics({"later_branches_end_lower": float(summary["later_branches_end_lower"]),
                           "every_branch_below_stable": float(summary["every_branch_below_stable"])})
    print(summary_markdown(summary))
    print(f"\nFigures and summary.json: {folder}; MLflow run {study.run_id}")
    return study.run_id


def _run_branch(branch: Branch, configs: list[str], overrides: list[str], tracking_uri: str,
                stable_name: str, study_id: str) -> None:
    tags = {STUDY_TAG: study_id, MIXTURE_TAG: branch.mixture}
    args = [*overrides, "--branch_from", str(branch.checkpoint),
            "--branch_decay_steps", str(branch.decay_steps),
            *override_args({
                # Validation lands on the branch's last step and along its decay.
                "trainer.val_check_interval": math.gcd(branch.source_step, branch.decay_steps),
                "trainer.logger.init_args.tracking_uri": tracking_uri,
                "trainer.logger.init_args.tags": tags})]
    if branch.mixture == "stable":
        args += override_args({
            "data.decay": stable_mix_for_decay(configs, overrides),
            "trainer.logger.init_args.run_name":
                f"{stable_name}-decay-from-{branch.source_step}-stable-mix"})
    # Each branch is an `xm2 fit` process of its own, as a user would start it.
    run("fit", configs, args, isolated=True)


def summarize(tracking_uri: str, stable_run_id: str, study_id: str) -> dict:
    """Each branch's end losses against the stable run's trajectory at the same step."""
    stable_run = TrackedRun.attach(tracking_uri, stable_run_id)
    stable_curve = stable_run.metric_history("val/loss")
    stable = stable_run.run
    logged_start = stable.data.params.get("schedule/decay_start_step")
    decay_start = None if logged_start is None else int(float(logged_start))
    stable_phase = {s: v for s, v in stable_curve.items()
                    if data_phase(s, decay_start) == "stable"} or stable_curve
    rows = []
    for row in branches(stable_run_id, tracking_uri):
        branch = TrackedRun(tracking_uri, stable_run.experiment_name, row["run_id"])
        run = branch.run
        if run.data.tags.get(STUDY_TAG) != study_id:
            continue
        curve = branch.metric_history("val/loss")
        # Compare at the step the branch's last validation was logged under, as the stable run's.
        end = max(curve) if curve else row["source_step"] + row["decay_steps"]
        losses = {key.removeprefix("val/loss_"): value for key, value in run.data.metrics.items()
                  if key.startswith("val/loss_")}
        stable_at_end = _interpolate(stable_phase, end) if end <= max(stable_phase) else None
        rows.append({
            "run_id": row["run_id"], "source_step": row["source_step"], "end_step": end,
            "source_tokens": row["source_tokens"], "mixture": run.data.tags.get(MIXTURE_TAG),
            "val_loss": run.data.metrics.get("val/loss"), "val_loss_by_source": losses,
            # Benchmarks, where the recipe runs the calibration callback at the end of a fit.
            "benchmarks": {key.removeprefix("calibration/"): value
                           for key, value in run.data.metrics.items()
                           if key.startswith("calibration/") and key.endswith(("/accuracy", "/ece"))},
            "stable_val_loss_at_source": _interpolate(stable_curve, row["source_step"]),
            "stable_val_loss_at_end": stable_at_end,
            "below_stable": None if stable_at_end is None else stable_at_end - run.data.metrics["val/loss"],
        })
    decayed = [r for r in rows if r["mixture"] == "decay"]
    ends = [r["val_loss"] for r in sorted(decayed, key=lambda r: r["source_step"])]
    return {
        "stable_run_id": stable_run_id,
        "branches": rows,
        "every_branch_below_stable": all((r["below_stable"] or 0) > 0 for r in decayed
                                         if r["below_stable"] is not None),
        "later_branches_end_lower": all(b < a for a, b in zip(ends, ends[1:], strict=False)),
    }


def wsd_figure(tracking_uri: str, stable_run_id: str, summary: dict) -> Figure:
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    stable = TrackedRun(tracking_uri, "", stable_run_id).metric_history("val/loss")
    tokens_per_step = next((r["source_tokens"] / r["source_step"] for r in summary["branches"]
                            if r["source_tokens"]), 1.0)
    steps = sorted(stable)
    axis.plot([s * tokens_per_step for s in steps], [stable[s] for s in steps], color="black",
              marker="o", ms=3, label="stable run (its own decay at the end)")
    for row in sorted(summary["branches"], key=lambda r: r["source_step"]):
        curve = TrackedRun(tracking_uri, "", row["run_id"]).metric_history("val/loss")
        curve = {row["source_step"]: row["stable_val_loss_at_source"], **curve}
        xs = sorted(curve)
        style = "-" if row["mixture"] == "decay" else ":"
        axis.plot([s * tokens_per_step for s in xs], [curve[s] for s in xs], style, marker="s", ms=3,
                  label=f"decay from step {row['source_step']} ({row['mixture']} mixture)")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation loss (mean over sources)")
    axis.set_title("WSD: decay branches against the stable trajectory")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


def mixture_figure(summary: dict) -> Figure:
    """Held-out loss per source after a decay on the decay mixture vs on the stable mixture."""
    on_stable = next((r for r in summary["branches"] if r["mixture"] == "stable"), None)
    on_decay = next((r for r in summary["branches"] if on_stable and r["mixture"] == "decay"
                     and r["source_step"] == on_stable["source_step"]), None)
    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    if on_stable and on_decay:
        sources = sorted(on_decay["val_loss_by_source"])
        width = 0.4
        for offset, row in ((-width / 2, on_decay), (width / 2, on_stable)):
            values = [row["val_loss_by_source"][s] for s in sources]
            axis.bar(np.arange(len(sources)) + offset, values, width,
                     label=f"decay on the {row['mixture']} mixture")
        axis.set_xticks(np.arange(len(sources)), sources)
        axis.set_ylabel("held-out loss at the branch end")
        axis.set_title(f"Decay data: branches from step {on_decay['source_step']}")
        axis.legend()
    return figure


def summary_markdown(summary: dict) -> str:
    lines = ["| source step | end step | mixture | val/loss | stable at end | below stable |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in sorted(summary["branches"], key=lambda r: (r["source_step"], r["mixture"])):
        stable = "" if r["stable_val_loss_at_end"] is None else f"{r['stable_val_loss_at_end']:.4f}"
        below = "" if r["below_stable"] is None else f"{r['below_stable']:+.4f}"
        lines.append(f"| {r['source_step']} | {r['end_step']} | {r['mixture']} | "
                     f"{r['val_loss']:.4f} | {stable} | {below} |")
    benchmarks = sorted({key for r in summary["branches"] for key in r.get("benchmarks", {})})
    if benchmarks:
        lines += ["", "| source step | mixture | " + " | ".join(benchmarks) + " |",
                  "|---:|---|" + "---:|" * len(benchmarks)]
        for r in sorted(summary["branches"], key=lambda r: (r["source_step"], r["mixture"])):
            values = [r["benchmarks"].get(key) for key in benchmarks]
            lines.append(f"| {r['source_step']} | {r['mixture']} | " + " | ".join(
                "" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append(f"\nEvery decay-mixture branch ends below the stable curve: "
                 f"{summary['every_branch_below_stable']}; later branches end lower: "
                 f"{summary['later_branches_end_lower']}")
    return "\n".join(lines)
