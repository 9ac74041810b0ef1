"""Transfer: the wider model trained at the study's best values and at learning rates 2^k around
the best one, under the study's parent run, to show whether the values carry over."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from matplotlib.figure import Figure

from xm2.studies.windtunnel.callbacks import DivergenceGuard, RecordRun
from xm2.studies.windtunnel.recipe import (
    RunShape,
    recipe_values,
    resolved_recipe,
    run_shape,
    shortened,
    tracked_fit,
)
from xm2.studies.windtunnel.settings import Transfer
from xm2.studies.windtunnel.trial import prepare_data
from xm2.tracking.runs import TrackedRun


def transfer_runs(study: optuna.Study, parent: TrackedRun, transfer: Transfer, objective: str,
                  diverge_factor: float, output: Path) -> dict:
    """Train the wider model at the best values and at lr × 2^k; plot and log under the parent."""
    best = study.best_trial.params
    recipe = resolved_recipe(transfer)
    shape = run_shape(recipe, transfer)
    prepare_data(recipe, output / ".prepare.lock")
    base_lr = best.get("lr", recipe_values(recipe)["lr"])
    rows = []
    for factor in transfer.log2_lr_factors:
        values = {**best, "lr": base_lr * 2.0**factor}
        logger_args = parent.child_args(f"{study.study_name}-transfer-lr2^{factor:+g}", tags={
            "optuna.study": study.study_name, "windtunnel.role": "transfer",
            "windtunnel.log2_lr_factor": factor})
        record = RecordRun({f"transfer/{k}": v for k, v in values.items()}
                           | {"transfer/log2_lr_factor": factor})
        result = tracked_fit(transfer, shortened(transfer, shape, values, output / "runs"),
                             logger_args, [DivergenceGuard(diverge_factor), record], objective)
        if result.value is not None:
            parent.client.log_metric(result.run_id, "objective", result.value)
        else:
            parent.client.set_terminated(result.run_id, "FAILED")
        rows.append({"log2_lr_factor": factor, "lr": values["lr"], "value": result.value,
                     "diverged": result.diverged, "seconds": round(result.seconds, 1),
                     "mlflow_run_id": result.run_id})
        print(f"transfer lr × 2^{factor:+g} = {values['lr']:.5g}: "
              f"{'diverged' if result.value is None else f'{result.value:.4f}'} "
              f"({result.seconds:.0f} s)", flush=True)
    finite = [row for row in rows if row["value"] is not None]
    argmin = min(finite, key=lambda row: row["value"])["log2_lr_factor"] if finite else None
    summary = {"configs": list(transfer.configs), "tokens_per_run": shape.tokens,
               "steps": shape.steps, "best_values": best, "runs": rows,
               "argmin_log2_lr_factor": argmin, "transferred": argmin == 0}
    folder = output / "transfer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    parent.log_artifact(folder / "transfer.json", "transfer")
    for row in rows:
        if row["value"] is not None:
            parent.log_metrics({"transfer/value": row["value"]},
                               step=int(round(row["log2_lr_factor"])))
    if argmin is not None:
        parent.log_metrics({"transfer/argmin_log2_lr_factor": argmin})
    parent.log_figure(transfer_figure(rows, objective, transfer, shape, base_lr),
                      folder / "transfer.png", "transfer")
    return summary


def transfer_figure(rows: list[dict], objective: str, transfer: Transfer, shape: RunShape,
                    base_lr: float) -> Figure:
    """The final objective of each transfer run against its learning rate, diverged ones marked."""
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    axis = figure.subplots()
    finite = [(row["lr"], row["value"]) for row in rows if row["value"] is not None]
    axis.plot([lr for lr, _ in finite], [v for _, v in finite], "-o", color="tab:blue")
    for row in rows:
        if row["value"] is None:
            axis.axvline(row["lr"], color="tab:red", linestyle=":", label="diverged")
    axis.axvline(base_lr, color="grey", linestyle="--", label="proxy's best lr")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"final {objective}")
    axis.set_title(f"{' + '.join(Path(c).stem for c in transfer.configs)}: "
                   f"{shape.steps} steps, {shape.tokens:,} tokens", fontsize=9)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axis.legend(unique.values(), unique.keys())
    axis.grid(alpha=0.3)
    return figure
