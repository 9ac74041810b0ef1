"""``xm2 windtunnel``: the command's one function, and a worker's share of a search."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from xm2.errors import ConfigError
from xm2.studies.windtunnel.recipe import RunShape, recipe_values, resolved_recipe, run_shape
from xm2.studies.windtunnel.report import summarize_study
from xm2.studies.windtunnel.settings import Pruner, Runs, Sampler, SearchSpace, Transfer
from xm2.studies.windtunnel.study import (
    PARENT_ATTR,
    counts_towards_budget,
    fail_stale_trials,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    study_settings,
)
from xm2.studies.windtunnel.transfer import transfer_runs
from xm2.studies.windtunnel.trial import prepare_data, run_trial
from xm2.tracking.runs import TrackedRun


def windtunnel(
    name: str = "windtunnel",
    action: Literal["search", "transfer", "summary"] = "search",
    trials: int = 20,
    space: SearchSpace = SearchSpace(),
    proxy: Runs = Runs(),
    objective: str = "val/loss",
    sampler: Sampler = Sampler(),
    pruner: Pruner = Pruner(),
    diverge_factor: float = 1.5,
    baseline: bool = True,
    enqueue: list[dict[str, float]] | None = None,
    transfer: Transfer = Transfer(),
    storage: str | None = None,
    stale_after_s: float = 900.0,
    torch_threads: int | None = None,
    output_dir: str = "artifacts/windtunnel",
    experiment_name: str = "xm2-windtunnel",
    tracking_uri: str = "sqlite:///mlflow.db",
) -> dict:
    """Bayesian search of the µP hyperparameters on a small proxy (the wind tunnel).

    search: run trials until the study has ``trials`` of them (complete, pruned or diverged),
    sharing the study with any other process that runs the same command on the same storage,
    and resuming it if it was interrupted. summary: redo the parent run's figures and best.yaml.
    transfer: train the ``transfer`` model at the best values and the learning rates
    best × 2^k. Writes ``<output_dir>/<name>/`` and returns (and prints) the summary.

    Args:
        name: Study name: Optuna study, output folder, MLflow run names.
        action: search, transfer or summary (see above).
        trials: Trials the study runs in all, across workers and restarts.
        space: Searched values; null keeps the recipe's value.
        proxy: The recipe each trial shortens, and the trial's token budget and WSD shape.
        objective: Logged metric to minimise (held-out validation loss by default).
        sampler: tpe, gp or random, and its seed.
        pruner: median or none.
        diverge_factor: A trial whose train loss exceeds this × its first loss is stopped and
            recorded FAILED (as is one whose loss is not finite).
        baseline: The first trial runs the proxy recipe's own values (e.g. config/nano.yaml's).
        enqueue: Further points to run first, e.g. [{lr: 0.02, scale_emb: 8}].
        transfer: The wider model and learning-rate factors of action transfer.
        storage: Optuna storage: a journal file path (default <output_dir>/<name>/journal.log)
            or an RDB URL (postgresql://..., sqlite:///...) shared by the workers.
        stale_after_s: A RUNNING trial of another host silent this long is failed and rerun.
        torch_threads: CPU threads of this worker's training (default torch's choice). On a CPU
            shared with other jobs or workers, give each worker cores / workers: oversubscribed
            threads wait on each other and run several times slower.
        output_dir: Folder of the study outputs.
        experiment_name: MLflow experiment.
        tracking_uri: MLflow tracking URI.
    """
    if action not in ("search", "transfer", "summary"):
        raise ConfigError(f"windtunnel action={action!r}; allowed: search, transfer, summary")
    if trials < 1:
        raise ConfigError(f"windtunnel trials={trials} must be >= 1")
    if not diverge_factor > 1:
        raise ConfigError(f"windtunnel diverge_factor={diverge_factor} must be > 1")
    if torch_threads is not None:
        if torch_threads < 1:
            raise ConfigError(f"windtunnel torch_threads={torch_threads} must be >= 1")
        import torch

        torch.set_num_threads(torch_threads)
    output = Path(output_dir) / name
    storage = storage or str(output / "journal.log")
    from xm2.run import quiet_lightning, quiet_lightning_noise

    quiet_lightning()

    quiet_lightning_noise()  # the messages `xm2 fit` drops, dropped from every trial too
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = resolved_recipe(proxy)
    shape = run_shape(recipe, proxy)
    space.distributions()  # refuse a bad space before anything is created
    settings = study_settings(space, proxy, objective)

    def create_parent() -> str:
        return TrackedRun.start(
            tracking_uri, experiment_name, f"{name}-study",
            tags={"optuna.study": name, "windtunnel.role": "study", "optuna.storage": storage},
            params={"trials": trials, "objective": objective, "storage": storage,
                    "proxy_configs": list(proxy.configs), "tokens_per_trial": shape.tokens,
                    "steps_per_trial": shape.steps, "validation_interval":
                    shape.validation_interval, "sampler": sampler.kind,
                    "sampler_seed": sampler.seed, "pruner": pruner.kind,
                    "diverge_factor": diverge_factor,
                    **{f"space/{k}": v for k, v in asdict(space).items()}}).run_id

    # Sampler and pruner first: a bad kind is refused before the storage is opened or created.
    study_sampler = make_sampler(sampler)
    study_pruner = make_pruner(pruner, shape.validation_interval)
    backend = open_storage(storage)
    if action != "search" and name not in optuna.get_all_study_names(backend):
        raise ConfigError(f"windtunnel action={action}: there is no study {name!r} in {storage}; "
                          "run the search first (action: search)")
    points = ([{k: v for k, v in recipe_values(recipe).items() if getattr(space, k) is not None}]
              if baseline else []) + list(enqueue or [])
    study, created = open_study(name, storage, backend, study_sampler, study_pruner, settings,
                                create_parent, points)
    parent = TrackedRun.attach(tracking_uri, study.user_attrs[PARENT_ATTR])
    print(f"windtunnel {name!r}: {'created' if created else 'joined'} in {storage}; MLflow "
          f"parent run {parent.run_id}; {shape.steps} steps × {shape.tokens_per_step} tokens "
          f"= {shape.tokens:,} tokens per trial", flush=True)

    if action == "transfer":
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            raise ConfigError(f"study {name!r} has no complete trial to transfer; run the search")
        summary = transfer_runs(study, parent, transfer, objective, diverge_factor, output)
        print(json.dumps(summary, indent=2))
        return summary
    if action == "search":
        search(study, name=name, recipe=recipe, proxy=proxy, shape=shape,
               distributions=space.distributions(), objective=objective, trials=trials,
               diverge_factor=diverge_factor, parent=parent,
               stale_after_s=stale_after_s, output=output, tracking_uri=tracking_uri,
               backend=backend)
    summary = summarize_study(study, recipe, parent, output, proxy)
    summary.update(tokens_per_trial=shape.tokens, steps_per_trial=shape.steps,
                   mlflow_parent_run_id=parent.run_id, storage=storage)
    done = sum(counts_towards_budget(t) and t.state != TrialState.RUNNING
               for t in study.get_trials(deepcopy=False))
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if done >= trials and not running:
        parent.finish("FINISHED")
    print(json.dumps(summary, indent=2, default=str))
    return summary


def search(
    study: optuna.Study, *, name: str, recipe: dict, proxy: Runs, shape: RunShape,
    distributions: dict[str, BaseDistribution], objective: str, trials: int,
    diverge_factor: float, parent: TrackedRun, stale_after_s: float, output: Path,
    tracking_uri: str, backend: optuna.storages.BaseStorage,
) -> None:
    """This worker's share of the study: trials until the study has ``trials`` of them.
    ``backend`` is the study's storage (see :func:`fail_stale_trials`)."""
    # A resumed or joining worker runs the parent again (a killed one left it RUNNING/KILLED).
    parent.client.update_run(parent.run_id, status="RUNNING")
    prepare_data(recipe, output / ".prepare.lock")
    while True:
        for number in fail_stale_trials(study, backend, stale_after_s, tracking_uri):
            print(f"trial {number}: its worker is gone; failed, to be run again", flush=True)
        if sum(map(counts_towards_budget, study.get_trials(deepcopy=False))) >= trials:
            return
        trial = study.ask()
        earlier = [t for t in study.get_trials(deepcopy=False)
                   if t.number < trial.number and counts_towards_budget(t)]
        if len(earlier) >= trials:
            # Another worker took the last place between the count and the ask.
            trial.set_user_attr("failure", "surplus")
            study.tell(trial, state=TrialState.FAIL)
            return
        finished = run_trial(study, trial, name=name, proxy=proxy, shape=shape,
                             distributions=distributions, objective=objective,
                             diverge_factor=diverge_factor, parent=parent, output=output)
        outcome = (f"{finished.value:.4f}" if finished.state == TrialState.COMPLETE
                   else finished.state.name.lower()
                   + (f" ({finished.user_attrs.get('reason')})"
                      if finished.state == TrialState.FAIL else ""))
        params = {k: round(v, 6) if isinstance(v, float) else v
                  for k, v in finished.params.items()}
        print(f"trial {finished.number}: {params} -> {outcome} "
              f"({finished.user_attrs.get('seconds')} s)", flush=True)
