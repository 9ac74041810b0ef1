"""The wind tunnel's report: the study's summary, trials table and figures, and ``best.yaml``, the
recipe at the best values, written to the output folder and logged to the parent run."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from xm2.run import config_text, override_args
from xm2.studies.windtunnel.recipe import get_path, recipe_values
from xm2.studies.windtunnel.settings import CONFIG_PATHS, Runs
from xm2.studies.windtunnel.study import SETTINGS_ATTR
from xm2.tracking.lineage import mlflow_logger_configs
from xm2.tracking.runs import TrackedRun


def best_config(runs: Runs, recipe: dict, best: Mapping[str, Any], header: str,
                run_name: str) -> str:
    """The recipe of ``runs`` with the best values: exactly what ``xm2 fit --print_config``
    prints for it, a complete config (its own schedule and length; the short trial schedule is
    not part of it)."""
    # A stepped float (e.g. scale_depth 2.4000000000000004) is written as its grid value.
    settings = {**(runs.overrides or {}),
                **{CONFIG_PATHS[param]: round(value, 12) if isinstance(value, float) else value
                   for param, value in best.items()}}
    if mlflow_logger_configs(get_path(recipe, "trainer.logger")):
        settings["trainer.logger.init_args.run_name"] = run_name
    return header + config_text("fit", runs.configs, override_args(settings))


def _figure_of(axes) -> Figure:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def summarize_study(study: optuna.Study, recipe: dict, parent: TrackedRun, output: Path,
                    proxy: Runs) -> dict:
    """Best values, history, importances and slices, into ``output`` and the parent run."""
    import optuna.visualization.matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    searched = {name for trial in trials for name in trial.params}
    summary: dict[str, Any] = {"study": study.study_name, "trials": states,
                               "recipe_values": {k: v for k, v in recipe_values(recipe).items()
                                                 if k in searched}}
    output.mkdir(parents=True, exist_ok=True)
    _write_trials_csv(trials, output / "trials.csv")
    parent.log_artifact(output / "trials.csv")
    if not complete:
        summary["best"] = None
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        parent.log_artifact(output / "summary.json")
        return summary
    best = study.best_trial
    summary["best"] = {"trial": best.number, "value": best.value, "params": best.params}
    parent.log_metrics({"best/value": best.value, "best/trial": best.number,
                        **{f"best/{k}": float(v) for k, v in best.params.items()}})
    header = (f"# Wind tunnel study {study.study_name!r}: best of {len(complete)} complete "
              f"trials (trial {best.number}, {study.user_attrs[SETTINGS_ATTR]['objective']} "
              f"{best.value:.4f}).\n# The recipe {' + '.join(proxy.configs)} at those values; run it "
              f"with: xm2 fit --config {output / 'best.yaml'}\n")
    (output / "best.yaml").write_text(
        best_config(proxy, recipe, best.params, header, f"{study.study_name}-best"))
    parent.log_artifact(output / "best.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        parent.log_figure(_figure_of(plots.plot_optimization_history(study)),
                          output / "history.png")
        parent.log_figure(_figure_of(plots.plot_slice(study)), output / "slices.png")
        if len(complete) >= 3:
            importances = optuna.importance.get_param_importances(study)
            summary["importances"] = importances
            parent.log_metrics({f"importance/{k}": v for k, v in importances.items()})
            parent.log_figure(_figure_of(plots.plot_param_importances(study)),
                              output / "importances.png")
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    parent.log_artifact(output / "summary.json")
    return summary


def _write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    params = sorted({name for trial in trials for name in trial.params})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", *params, "seconds", "fit_seconds",
                         "failure", "reason", "mlflow_run_id"])
        for trial in trials:
            attrs = trial.user_attrs
            writer.writerow([trial.number, trial.state.name, trial.value,
                             *(trial.params.get(p) for p in params), attrs.get("seconds"),
                             attrs.get("fit_seconds"), attrs.get("failure"), attrs.get("reason"),
                             attrs.get("mlflow_run_id")])
