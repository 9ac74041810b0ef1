"""The µTransfer check: sweep the learning rate across widths under µP and standard parametrization.

Every run is a real ``xm2 fit`` (:func:`xm2.run.run`) of a proxy config on the bundled corpus
(stable mixture throughout), logged to MLflow as a child of one "summary" run that receives
the plot, the CSV of all runs and the summary. The loss compared is the final held-out validation
loss (the same batches for every run). µP works if the loss-optimal learning rate stays put as the
width grows and, at that learning rate, wider models are no worse; under standard parametrization
the optimum is expected to drift to smaller learning rates.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from xm2.config import ModelConfig
from xm2.data.datamodule import DEFAULT_STABLE
from xm2.errors import ConfigError
from xm2.run import run as fit_run
from xm2.schedule import DecayStyle, WSDSchedule
from xm2.tracking import DEFAULT_TRACKING_URI, LOGGER_CLASS_PATH
from xm2.tracking.runs import TrackedRun, save_figure

Parametrization = Literal["mup", "sp"]
MeanLosses = dict[tuple[str, int, float], float]
"""Loss averaged over seeds, keyed by (parametrization, width, log2_lr)."""


@dataclass
class SweepRun:
    """One finished run of the sweep; a diverged run has infinite losses."""

    parametrization: str
    width: int
    log2_lr: float
    seed: int
    train_loss: float
    val_loss: float
    run_id: str = ""
    seconds: float = 0.0

    @property
    def lr(self) -> float:
        return 2.0**self.log2_lr


class LossTail(L.Callback):
    """Keeps the train losses of a run and stops it at the first non-finite one."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"])
        self.losses.append(loss)
        if not math.isfinite(loss):
            # Nothing recovers from nan weights; stopping saves the rest of the run's time.
            trainer.should_stop = True

    def final_loss(self, tail_fraction: float = 0.1) -> float:
        """Mean train loss over the last ``tail_fraction`` of steps (inf if any was not finite)."""
        if not self.losses or not all(math.isfinite(x) for x in self.losses):
            return math.inf
        tail = self.losses[-max(1, round(len(self.losses) * tail_fraction)):]
        return sum(tail) / len(tail)


def sweep_architecture(
    width: int, parametrization: str, base_width: int, head_dim: int, num_layers: int,
    vocab_size: int, seq_len: int,
) -> ModelConfig:
    """The proxy model at one width: heads of ``head_dim``, one KV head, MLP 2.5 × width."""
    if width % head_dim:
        raise ConfigError(f"sweep width={width} is not a multiple of head_dim={head_dim}")
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 5 // 2,
        num_layers=num_layers, num_heads=width // head_dim, num_kv_heads=1, max_seq_len=seq_len,
        use_mup=parametrization == "mup", dim_model_base=base_width,
    )


def _finite_or_inf(value) -> float:
    value = float(value) if value is not None else math.inf
    return value if math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------- summary logic


def mean_losses(runs: list[SweepRun], metric: str = "val_loss") -> MeanLosses:
    """Mean of ``metric`` over seeds for each (parametrization, width, log2_lr)."""
    grouped: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for run in runs:
        grouped[(run.parametrization, run.width, run.log2_lr)].append(getattr(run, metric))
    # One diverged seed makes the mean infinite: an LR that sometimes diverges is not optimal.
    return {key: _finite_or_inf(sum(values) / len(values)) for key, values in grouped.items()}


def argmin_log2_lr(means: MeanLosses, parametrization: str) -> dict[int, float | None]:
    """Loss-optimal log2 learning rate per width; None where every run of a width diverged."""
    best: dict[int, tuple[float, float | None]] = {}
    for (param, width, log2_lr), loss in sorted(means.items()):
        if param != parametrization:
            continue
        current = best.setdefault(width, (math.inf, None))
        if loss < current[0]:
            best[width] = (loss, log2_lr)
    return {width: best[width][1] for width in sorted(best)}


def optimum_shift(argmins: dict[int, float | None], grid: list[float]) -> dict[str, int | None]:
    """How far the optimum moves in grid steps: ``widest - narrowest`` and max - min over widths."""
    positions = [grid.index(v) for _, v in sorted(argmins.items()) if v is not None]
    if len(positions) < len(argmins) or not positions:
        return {"narrow_to_wide": None, "spread": None}
    return {"narrow_to_wide": positions[-1] - positions[0],
            "spread": max(positions) - min(positions)}


def wider_is_better(means: MeanLosses, log2_lr: float | None, tolerance: float = 0.0) -> dict:
    """At µP learning rate ``log2_lr``, does the loss never rise (beyond ``tolerance``) with width?"""
    losses = {width: loss for (param, width, lr), loss in sorted(means.items())
              if param == "mup" and lr == log2_lr}
    ordered = [losses[w] for w in sorted(losses)]
    passed = (log2_lr is not None and len(ordered) > 1
              and all(wide <= narrow + tolerance for narrow, wide in pairwise(ordered)))
    return {"log2_lr": log2_lr, "losses": losses, "tolerance": tolerance, "passed": passed}


def summarize(runs: list[SweepRun], metric: str = "val_loss", tolerance: float = 0.0) -> dict:
    """Argmin learning rate per width for each parametrization, its shift, and wider-is-better."""
    means = mean_losses(runs, metric)
    grid = sorted({run.log2_lr for run in runs})
    parametrizations = sorted({run.parametrization for run in runs})
    argmins = {param: argmin_log2_lr(means, param) for param in parametrizations}
    base_argmin = next(iter(argmins["mup"].values()), None) if "mup" in argmins else None
    return {
        "metric": metric,
        "log2_lr_grid": grid,
        "argmin_log2_lr": argmins,
        "argmin_lr": {param: {w: None if v is None else 2.0**v for w, v in per_width.items()}
                      for param, per_width in argmins.items()},
        "optimum_shift_grid_steps": {param: optimum_shift(argmins[param], grid)
                                     for param in parametrizations},
        "wider_is_better": wider_is_better(means, base_argmin, tolerance),
    }


def _format_loss(loss: float) -> str:
    return f"{loss:.4f}" if math.isfinite(loss) else "diverged"


def summary_markdown(summary: dict, runs: list[SweepRun]) -> str:
    """The summary and the mean-loss table as Markdown."""
    metric, grid = summary["metric"], summary["log2_lr_grid"]
    argmins, shifts = summary["argmin_log2_lr"], summary["optimum_shift_grid_steps"]
    widths = sorted({run.width for run in runs})
    lines = [f"Loss: mean `{metric}` over seeds ({len({r.seed for r in runs})} seed(s)).", "",
             "| parametrization | " + " | ".join(f"argmin LR, width {w}" for w in widths)
             + " | shift narrow→wide (grid steps) | spread (grid steps) |",
             "|---|" + "---|" * (len(widths) + 2)]
    for param, per_width in argmins.items():
        cells = [("-" if per_width.get(w) is None else f"2^{per_width[w]:g}") for w in widths]
        lines.append(f"| {param} | " + " | ".join(cells)
                     + f" | {shifts[param]['narrow_to_wide']} | {shifts[param]['spread']} |")
    check = summary["wider_is_better"]
    verdict = "PASS" if check["passed"] else "FAIL"
    at = "-" if check["log2_lr"] is None else f"2^{check['log2_lr']:g}"
    losses = ", ".join(f"{w}: {_format_loss(loss)}" for w, loss in check["losses"].items())
    lines += ["", f"Wider is better (µP, LR {at}, tolerance {check['tolerance']:g}): "
              f"**{verdict}** ({losses}).", ""]
    means = mean_losses(runs, metric)
    columns = [(param, w) for param in argmins for w in widths]
    lines += ["| LR | " + " | ".join(f"{param} {w}" for param, w in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for log2_lr in grid:
        cells = [_format_loss(means.get((param, w, log2_lr), math.nan)) for param, w in columns]
        lines.append(f"| 2^{log2_lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- outputs


def _jsonable(value):
    """Summary values as strict JSON: a diverged (infinite) loss becomes null."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(runs: list[SweepRun], path: Path) -> None:
    names = [f.name for f in fields(SweepRun)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*names[:3], "lr", *names[3:]])
        writer.writeheader()
        for run in runs:
            writer.writerow({**asdict(run), "lr": run.lr})


def sweep_figure(runs: list[SweepRun], summary: dict, title: str) -> Figure:
    """Final loss against learning rate: a panel per parametrization, a line per width."""
    metric = summary["metric"]
    means = mean_losses(runs, metric)
    parametrizations = list(summary["argmin_log2_lr"])
    widths = sorted({run.width for run in runs})
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, len(widths)))
    figure = Figure(figsize=(5.5 * len(parametrizations), 4.2))
    axes = figure.subplots(1, len(parametrizations), sharey=True, squeeze=False)
    finite = [v for v in means.values() if math.isfinite(v)]
    for axis, param in zip(axes[0], parametrizations, strict=True):
        for width, color in zip(widths, colors, strict=True):
            points = sorted((lr, loss) for (p, w, lr), loss in means.items()
                            if p == param and w == width)
            axis.plot([2.0**lr for lr, _ in points], [loss for _, loss in points], "-o",
                      color=color, label=f"width {width}", markersize=4)
            seeds = [(run.lr, getattr(run, metric)) for run in runs
                     if run.parametrization == param and run.width == width]
            axis.scatter([lr for lr, _ in seeds], [loss for _, loss in seeds], color=color, s=10, alpha=0.4)
            best = summary["argmin_log2_lr"][param].get(width)
            if best is not None:
                axis.plot(2.0**best, means[(param, width, best)], "*", color=color, markersize=14,
                          markeredgecolor="black")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("learning rate")
        axis.set_title({"mup": "µP", "sp": "standard parametrization"}.get(param, param))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final {metric.replace('_', ' ')}")
    axes[0][-1].legend(title="★ argmin")
    if finite:
        # Keep the optima readable: diverged or barely-trained runs leave the top of the frame.
        low, high = min(finite), min(max(finite), min(finite) + 2.5)
        axes[0][0].set_ylim(low - 0.05 * (high - low + 0.1), high + 0.05 * (high - low + 0.1))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------- the command


def run_config(
    *, parametrization: str, width: int, log2_lr: float, seed: int, architecture: dict,
    data: dict, steps: int, schedule: WSDSchedule, accelerator: str, root_dir: Path,
) -> dict:
    """The ``xm2 fit`` config of one sweep run (its logger is set by the caller)."""
    config = sweep_architecture(width, parametrization, **architecture)
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": accelerator, "devices": 1, "max_steps": steps,
            "gradient_clip_val": 1.0,
            # One validation, at the very end: it gives every run the same held-out batches.
            "val_check_interval": steps, "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0, "log_every_n_steps": max(1, steps // 20),
            "enable_progress_bar": False, "enable_checkpointing": False,
            "enable_model_summary": False, "default_root_dir": str(root_dir),
            "logger": {"class_path": LOGGER_CLASS_PATH},
        },
        "model": {"architecture": asdict(config), "optimizer": {"lr": 2.0**log2_lr},
                  "schedule": asdict(schedule)},
        "data": {**data, "seed": seed},
    }


def _train_one(config: dict, child_args: list[str], parametrization: str, width: int,
               log2_lr: float, seed: int, steps: int) -> SweepRun:
    losses = LossTail()
    result = fit_run("fit", [config], child_args, callbacks=[losses], quiet=True)
    # A diverged run is a result of the sweep (an LR too large), not a failure of it.
    train_loss = losses.final_loss() if result.status == "finished" else math.inf
    val_loss = (_finite_or_inf(result.metrics.get("val/loss"))
                if math.isfinite(train_loss) else math.inf)
    tracked = TrackedRun.attach(config["trainer"]["logger"]["init_args"]["tracking_uri"],
                                result.run_id)
    tracked.log_params({"sweep/parametrization": parametrization, "sweep/width": width,
                        "sweep/log2_lr": log2_lr, "sweep/lr": 2.0**log2_lr, "sweep/seed": seed,
                        "sweep/steps": steps})
    tracked.log_metrics({"final/train_loss": train_loss, "final/val_loss": val_loss})
    tracked.set_tags({"diverged": str(not math.isfinite(val_loss))})
    # Lightning marks a run that raised FAILED; the diverged run has finished measuring.
    tracked.finish("FINISHED")
    return SweepRun(parametrization, width, log2_lr, seed, train_loss, val_loss,
                    run_id=result.run_id, seconds=round(result.seconds, 2))


def sweep(
    name: str = "mutransfer",
    widths: tuple[int, ...] = (64, 128, 256),
    log2_lrs: tuple[float, ...] = (-11, -10, -9, -8, -7, -6, -5, -4, -3),
    seeds: tuple[int, ...] = (0,),
    parametrizations: tuple[Parametrization, ...] = ("mup", "sp"),
    head_dim: int = 64,
    num_layers: int = 4,
    vocab_size: int = 1024,
    seq_len: int = 128,
    batch_size: int = 8,
    steps: int = 200,
    warmup_fraction: float = 0.1,
    decay_fraction: float = 0.2,
    decay_style: DecayStyle = "linear",
    val_batches_per_source: int = 4,
    wider_is_better_tolerance: float = 0.0,
    corpus_dir: str = "data/corpus",
    tokenizer_path: str | None = None,
    shards_dir: str = "artifacts/shards",
    output_dir: str = "artifacts/sweeps",
    experiment_name: str = "xm2-mutransfer",
    tracking_uri: str = DEFAULT_TRACKING_URI,
    accelerator: str = "cpu",
) -> dict:
    """Sweep the learning rate over widths, seeds and µP/SP; plot, tabulate and summarize.

    The base width of µP is the smallest width, so every width multiplier is at least 1 and both
    parametrizations are the same model there. Each run is a WSD schedule: linear warmup over
    warmup_fraction of the steps, constant, then a decay to zero over the last decay_fraction,
    so the loss compared is that of a fully annealed model. The stable mixture is used
    throughout. Writes ``<output_dir>/<name>/`` (runs.csv, loss_vs_lr.png, summary.json,
    summary.md), logs them to a parent MLflow run and returns (and prints) the summary.

    Args:
        name: Sweep name: output folder and MLflow run-name prefix.
        widths: Hidden sizes to train (multiples of head_dim); the smallest is µP's base width.
        log2_lrs: Base learning rates as powers of two (the µP LR of embedding and norm gains).
        seeds: Seeds of initialisation and data order; losses are averaged over them.
        parametrizations: mup and/or sp (standard parametrization, use_mup false).
        head_dim: Attention head size; a width has width/head_dim heads and one KV head.
        num_layers: Decoder blocks of every proxy model.
        vocab_size: Tokenizer vocabulary; one is trained into artifacts/tokenizers if missing.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per step.
        steps: Optimizer steps per run.
        warmup_fraction: Fraction of the steps spent in linear warmup.
        decay_fraction: Fraction of the steps, at the end, spent decaying the LR.
        decay_style: Shape of the decay (see xm2.schedule).
        val_batches_per_source: Held-out batches per source for the final validation loss.
        wider_is_better_tolerance: Loss increase with width still counted as "not worse".
        corpus_dir: The bundled corpus.
        tokenizer_path: SentencePiece model with vocab_size pieces; default
            artifacts/tokenizers/unigram-<vocab_size>.model.
        shards_dir: Root folder of the token shards.
        output_dir: The sweep writes into output_dir/name.
        experiment_name: MLflow experiment of the runs.
        tracking_uri: MLflow tracking URI.
        accelerator: Lightning accelerator of every run.
    """
    if min(widths) < head_dim or len(set(widths)) != len(widths):
        raise ConfigError(f"sweep widths={widths} must be distinct and each >= head_dim={head_dim}")
    warmup_steps = round(steps * warmup_fraction)
    decay_start_step = max(warmup_steps, steps - max(1, round(steps * decay_fraction)))
    schedule = WSDSchedule(warmup_steps=warmup_steps, decay_start_step=decay_start_step,
                           decay_style=decay_style)
    schedule.check_run_length(steps)
    architecture = {"base_width": min(widths), "head_dim": head_dim, "num_layers": num_layers,
                    "vocab_size": vocab_size, "seq_len": seq_len}
    data = {"stable": DEFAULT_STABLE, "decay": DEFAULT_STABLE, "corpus_dir": corpus_dir,
            "tokenizer_path": tokenizer_path, "shards_dir": shards_dir, "batch_size": batch_size,
            "val_batches_per_source": val_batches_per_source}
    output = Path(output_dir) / name
    output.mkdir(parents=True, exist_ok=True)
    settings = {"widths": widths, "log2_lrs": log2_lrs, "seeds": seeds,
                "parametrizations": parametrizations, "steps": steps, "batch_size": batch_size,
                "warmup_steps": warmup_steps, "decay_start_step": decay_start_step,
                "decay_style": decay_style, **architecture}
    parent = TrackedRun.start(tracking_uri, experiment_name, f"{name}-summary",
                              tags={"sweep.name": name, "sweep.role": "summary"}, params=settings)

    runs: list[SweepRun] = []
    with parent:
        for seed in seeds:
            for parametrization in parametrizations:
                for width in widths:
                    for log2_lr in log2_lrs:
                        run_name = f"{name}-{parametrization}-w{width}-lr2^{log2_lr:g}-s{seed}"
                        config = run_config(
                            parametrization=parametrization, width=width, log2_lr=log2_lr,
                            seed=seed, architecture=architecture, data=data, steps=steps,
                            schedule=schedule, accelerator=accelerator, root_dir=output)
                        config["trainer"]["logger"]["init_args"] = {"tracking_uri": tracking_uri}
                        run = _train_one(config, parent.child_args(
                            run_name, tags={"sweep.name": name}), parametrization, width,
                            log2_lr, seed, steps)
                        runs.append(run)
                        print(f"{run_name}: train {_format_loss(run.train_loss)}, "
                              f"val {_format_loss(run.val_loss)} ({run.seconds:.1f} s)",
                              flush=True)

        summary = summarize(runs, tolerance=wider_is_better_tolerance)
        paths = {"csv": output / "runs.csv", "plot": output / "loss_vs_lr.png",
                 "json": output / "summary.json", "markdown": output / "summary.md"}
        write_csv(runs, paths["csv"])
        save_figure(sweep_figure(
            runs, summary,
            f"{name}: {num_layers} layers, {steps} steps × {batch_size}×{seq_len} tokens, "
            f"{len(seeds)} seed(s); µP base width {min(widths)}"), paths["plot"])
        summary["files"] = {key: str(path) for key, path in paths.items()}
        summary["mlflow"] = {"experiment": experiment_name, "summary_run_id": parent.run_id}
        paths["json"].write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        paths["markdown"].write_text(summary_markdown(summary, runs))
        for path in paths.values():
            parent.log_artifact(path)
        parent.log_metrics({f"{param}/optimum_spread_grid_steps": shift["spread"]
                            for param, shift in summary["optimum_shift_grid_steps"].items()
                            if shift["spread"] is not None})
        parent.log_metrics({"wider_is_better": float(summary["wider_is_better"]["passed"])})
    print(json.dumps(_jsonable(summary), indent=2))
    return summary
