"""The µP coordinate check: does the size of every activation stay put as the model widens?

The decoder is built at several widths (head_dim fixed, so heads grow with width) and trained
for a few steps at a constant learning rate with the real µP AdamW, each (parametrization, width,
seed) as one real ``xm2 fit`` run (:func:`xm2.run.run`) logged as a child of the study's MLflow
run. The batches come from the data stream of one corpus source: at a given step and seed every
width sees the same batch. The ``callbacks.coord_check.CoordCheck`` callback of each run logs, at
the start of step t (t = 0 is the model at init, before any update), the mean |x| on that step's
batch of the embedding output, each attention and MLP output after the residual scale, each
residual stream, the final norm and the logits; the study reads these back from the runs and
averages them over seeds. Under µP these curves are flat in width after the first updates; under
standard parametrization (SP) they grow. See ``recipe.md`` §9 and microsoft/mup's README.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from xm2.config import ModelConfig
from xm2.data.corpus import source_names
from xm2.data.tokenizer import default_tokenizer_path, load_tokenizer, train_tokenizer
from xm2.errors import ConfigError, TrackingError
from xm2.model import Decoder
from xm2.optimizer import OptimizerConfig
from xm2.run import run as fit_run
from xm2.schedule import WSDSchedule
from xm2.tracking import DEFAULT_TRACKING_URI, LOGGER_CLASS_PATH
from xm2.tracking.runs import TrackedRun

HEAD_DIM = 64
"""Fixed across widths, so that only the number of heads grows (µP's width dimensions)."""

COORD_CHECK_CALLBACK = "callbacks.coord_check.CoordCheck"
"""The callback each run records with, named as a config names it (xm2 never imports callbacks)."""

Parametrization = Literal["mup", "sp"]
DISPLAY_NAMES = {"mup": "µP", "sp": "standard parametrization"}


class ActivationRecorder:
    """Forward hooks recording the mean |x| of each coordinate-check activation of a Decoder.

    Use as a context manager around one forward pass; :meth:`sizes` then maps ``embedding``
    (after scale_emb), ``layer<i>.attention`` and ``layer<i>.mlp`` (after the residual scale),
    ``layer<i>.residual`` (the block output), ``final_norm`` and ``logits`` to their mean |x|.
    """

    def __init__(self, model: Decoder) -> None:
        self.model = model
        self._sizes: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationRecorder:
        self._sizes = {}
        model = self.model
        # The embedding output after scale_emb is what the first block receives.
        self._handles.append(model.layers[0].register_forward_pre_hook(
            lambda _, args: self._record("embedding", args[0])))
        for index, block in enumerate(model.layers):
            self._watch(block.self_attn, f"layer{index}.attention", block.residual_scale)
            self._watch(block.mlp, f"layer{index}.mlp", block.residual_scale)
            self._watch(block, f"layer{index}.residual")
        self._watch(model.norm, "final_norm")
        self._watch(model, "logits")
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _watch(self, module: torch.nn.Module, name: str, scale: float = 1.0) -> None:
        self._handles.append(module.register_forward_hook(
            lambda _, args, output: self._record(name, output, scale)))

    def _record(self, name: str, activation: torch.Tensor, scale: float = 1.0) -> None:
        self._sizes[name] = scale * activation.detach().float().abs().mean()

    def sizes(self) -> dict[str, float]:
        """Mean |x| per module name, from the last forward pass."""
        # One host sync for all modules rather than one per module.
        values = torch.stack(list(self._sizes.values())).tolist() if self._sizes else []
        return dict(zip(self._sizes, values, strict=True))


@dataclass(frozen=True)
class ActivationSize:
    """One row of the coordinate-check table."""

    parametrization: str
    """``mup`` or ``sp``."""
    width: int
    """hidden_size of the model."""
    step: int
    """Optimizer updates before this forward pass; 0 is the model at init."""
    module: str
    """Which activation (see :class:`ActivationRecorder`)."""
    mean_abs: float
    """Mean |x| per coordinate, averaged over seeds."""


def activation_names(num_layers: int) -> list[str]:
    """The activations :class:`ActivationRecorder` records, in its order, for ``num_layers`` blocks."""
    return ["embedding", *(f"layer{index}.{kind}" for index in range(num_layers)
                           for kind in ("attention", "mlp", "residual")), "final_norm", "logits"]


def heads_at(width: int) -> int:
    """Attention heads at ``width`` with head_dim fixed at 64."""
    if width <= 0 or width % HEAD_DIM:
        raise ConfigError(f"coord-check width={width} must be a positive multiple of "
                         f"head_dim={HEAD_DIM}")
    return width // HEAD_DIM


def width_config(
    width: int,
    *,
    use_mup: bool,
    base_width: int,
    num_layers: int,
    vocab_size: int,
    seq_len: int,
    num_kv_heads: int = 1,
    scale_emb: float = ModelConfig.scale_emb,
    scale_depth: float = ModelConfig.scale_depth,
    init_std: float = ModelConfig.init_std,
) -> ModelConfig:
    """The coordinate-check model at one width: head_dim 64, intermediate 2.5 × width."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 5 // 2,
        num_layers=num_layers, num_heads=heads_at(width), num_kv_heads=num_kv_heads,
        max_seq_len=seq_len, use_mup=use_mup, dim_model_base=base_width, scale_emb=scale_emb,
        scale_depth=scale_depth, init_std=init_std,
    )



def check_settings(widths: Sequence[int], steps: int, seeds: int) -> None:
    """Refuse settings that cannot show a trend in width."""
    if len(set(widths)) < 2:
        raise ConfigError(f"coord-check widths={list(widths)}; at least two different widths needed")
    for width in widths:
        heads_at(width)
    if steps < 0 or seeds < 1:
        raise ConfigError(f"coord-check steps={steps} must be >= 0 and seeds={seeds} >= 1")


def run_config(
    *, parametrization: str, width: int, seed: int, steps: int, architecture: dict,
    optimizer: OptimizerConfig, data: dict, accelerator: str, root_dir: str | Path,
) -> dict:
    """The ``xm2 fit`` config of one coordinate-check run (its logger's run is set by the caller).

    The learning rate is constant: no warmup, and the decay starts at step ``steps``, where an
    exponential decay's factor is exactly 1. CoordCheck records at the start of every step, so
    ``max_steps = steps + 1`` records t = 0 .. steps before the extra step's update.
    """
    model = width_config(width, use_mup=parametrization == "mup", **architecture)
    schedule = WSDSchedule(warmup_steps=0, decay_start_step=steps, decay_style="exponential")
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": accelerator, "devices": 1, "precision": "32-true",
            "max_steps": steps + 1, "gradient_clip_val": None,
            # The check measures training only; no validation loop, checkpoint or bar.
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_checkpointing": False,
            "enable_model_summary": False, "default_root_dir": str(root_dir),
            "logger": {"class_path": LOGGER_CLASS_PATH},
            "callbacks": [{"class_path": COORD_CHECK_CALLBACK,
                           "init_args": {"every_n_steps": 1}}],
        },
        "model": {"architecture": asdict(model), "optimizer": asdict(optimizer),
                  "schedule": asdict(schedule)},
        # The data seed is the run's seed at every width: each width sees the same batches.
        "data": {**data, "seed": seed},
    }


def recorded_sizes(
    child: TrackedRun, modules: Sequence[str], steps: int, *, complete: bool = True
) -> list[dict[str, float]]:
    """Mean |x| per module at each step 0..steps, read back from the ``coord/<module>`` metrics
    of run ``child``; nan where it logged none (it stopped early).

    ``complete``: the run trained to the end, so a missing value means the store lost it.
    """
    logged = {(step, module): value for module in modules
              for step, value in child.metric_history(f"coord/{module}").items()}
    missing = sorted({step for step in range(steps + 1) for module in modules
                      if (step, module) not in logged})
    if complete and missing:
        raise TrackingError(f"run {child.run_id} in {child.tracking_uri} has no coord/<module> "
                            f"metrics at steps {missing}; the tracking store did not receive "
                            "them (`xm2 tracking-sync` sends a backlog)")
    return [{module: logged.get((step, module), math.nan) for module in modules}
            for step in range(steps + 1)]


def run_coord_check(
    parent: TrackedRun,
    widths: Sequence[int],
    *,
    parametrization: Parametrization,
    steps: int,
    seeds: int,
    architecture: dict,
    data: dict,
    optimizer: OptimizerConfig = OptimizerConfig(),
    accelerator: str = "cpu",
    root_dir: str | Path = "artifacts/coord_check",
) -> list[ActivationSize]:
    """The coordinate-check table of one parametrization: seed-mean mean |x| per width and step.

    Each (width, seed) is one ``xm2 fit`` run, a child of ``parent``; ``architecture`` holds
    :func:`width_config`'s settings but the width, ``data`` the data module's but the seed.
    """
    check_settings(widths, steps, seeds)
    modules = activation_names(architecture["num_layers"])
    table = []
    started = time.monotonic()
    for number, width in enumerate(widths, 1):
        # A check over large widths runs for many minutes on a CPU: say where it is.
        print(f"coord-check {parametrization}: width {width} ({number}/{len(widths)}), {seeds} "
              f"seeds × {steps} steps, {time.monotonic() - started:.0f} s so far",
              file=sys.stderr, flush=True)
        runs = []
        for seed in range(seeds):
            config = run_config(parametrization=parametrization, width=width, seed=seed,
                                steps=steps, architecture=architecture, optimizer=optimizer,
                                data=data, accelerator=accelerator, root_dir=root_dir)
            tags = {"coord_check.parametrization": parametrization, "coord_check.width": width,
                    "coord_check.seed": seed}
            result = fit_run("fit", [config], parent.child_args(
                f"{parametrization}-w{width}-s{seed}", tags=tags), quiet=True)
            child = TrackedRun(parent.tracking_uri, parent.experiment_name, result.run_id)
            if result.status == "diverged":
                # Sizes up to the divergence are a result (SP blowing up), not a failure.
                print(f"coord-check {parametrization}: width {width} seed {seed} diverged "
                      f"({result.error}); mean |x| after step {result.steps} is nan",
                      file=sys.stderr, flush=True)
                child.set_tags({"diverged": "true"})
                child.finish("FINISHED")
            runs.append(recorded_sizes(child, modules, steps,
                                       complete=result.status == "finished"))
        for step in range(steps + 1):
            for module in modules:
                seed_mean = sum(run[step][module] for run in runs) / seeds
                table.append(ActivationSize(parametrization, width, step, module, seed_mean))
    return table


def growth_factors(table: Sequence[ActivationSize]) -> dict[tuple[str, int, str], float]:
    """(parametrization, step, module) -> max over widths / min over widths of mean |x|.

    1 means width-independent; under µP every factor should stay near 1 after the first updates.
    nan where a width has no finite, positive size (its run diverged before that step).
    """
    by_key: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for row in table:
        by_key[(row.parametrization, row.step, row.module)].append(row.mean_abs)
    return {key: max(values) / min(values)
            if min(values) > 0 and all(map(math.isfinite, values)) else math.nan
            for key, values in by_key.items()}


def write_table(table: Sequence[ActivationSize], path: str | Path) -> Path:
    """The table as CSV, one row per (parametrization, width, step, module)."""
    path = Path(path)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[field.name for field in fields(ActivationSize)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in table)
    return path


def _line_style(module: str, num_layers: int, colormap) -> dict:
    if module.startswith("layer"):
        layer, kind = module.removeprefix("layer").split(".")
        linestyle = {"attention": "-", "mlp": "--", "residual": ":"}[kind]
        return {"color": colormap(int(layer) / max(1, num_layers - 1)), "linestyle": linestyle}
    return {"color": {"embedding": "tab:red", "final_norm": "tab:orange", "logits": "black"}[module],
            "linestyle": "-", "linewidth": 2.0}


def coord_check_figure(table: Sequence[ActivationSize], title: str) -> Figure:
    """Width against mean |x| on log-log (base 2) axes, one panel per step, one line per module."""
    steps = sorted({row.step for row in table})
    modules = list(dict.fromkeys(row.module for row in table))
    num_layers = sum(module.endswith(".residual") for module in modules)
    colormap = colormaps["viridis"]
    figure = Figure(figsize=(3.2 * len(steps) + 2.2, 3.6), layout="constrained")
    axes = figure.subplots(1, len(steps), sharey=True, squeeze=False)[0]
    for axis, step in zip(axes, steps, strict=True):
        for module in modules:
            points = sorted((row.width, row.mean_abs) for row in table
                            if row.step == step and row.module == module)
            axis.plot([width for width, _ in points], [size for _, size in points], marker=".",
                      **_line_style(module, num_layers, colormap))
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_title(f"t = {step}")
        axis.set_xlabel("width")
        axis.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("mean |x|")
    # Colour says the layer and line style the kind, so the legend stays short at any depth.
    legend = [Line2D([], [], color="grey", linestyle=style, label=kind)
              for kind, style in (("attention", "-"), ("mlp", "--"), ("residual", ":"))]
    legend += [Line2D([], [], **_line_style(f"layer{layer}.attention", num_layers, colormap),
                      label=f"layer {layer}") for layer in range(num_layers)]
    legend += [Line2D([], [], **_line_style(module, num_layers, colormap), label=module)
               for module in ("embedding", "final_norm", "logits")]
    figure.legend(handles=legend, loc="outside right center", fontsize=8)
    figure.suptitle(title)
    return figure


def format_growth_factors(factors: dict[tuple[str, int, str], float], parametrization: str) -> str:
    """A module × step text table of one parametrization's growth factors."""
    keys = [key for key in factors if key[0] == parametrization]
    steps = sorted({step for _, step, _ in keys})
    modules = list(dict.fromkeys(module for _, _, module in keys))
    width = max(len(module) for module in modules)
    lines = [f"{parametrization:<{width}}" + "".join(f"{f't={step}':>9}" for step in steps)]
    for module in modules:
        lines.append(f"{module:<{width}}" + "".join(
            f"{factors[(parametrization, step, module)]:>9.2f}" for step in steps))
    return "\n".join(lines)




def coord_check(
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024),
    parametrizations: tuple[Parametrization, ...] = ("mup", "sp"),
    steps: int = 5,
    seeds: int = 3,
    base_width: int = 64,
    num_layers: int = 4,
    num_kv_heads: int = 1,
    scale_emb: float = ModelConfig.scale_emb,
    scale_depth: float = ModelConfig.scale_depth,
    init_std: float = ModelConfig.init_std,
    optimizer: OptimizerConfig = OptimizerConfig(),
    vocab_size: int = 512,
    seq_len: int = 64,
    batch_size: int = 8,
    source: str = "prose",
    corpus_dir: str = "data/corpus",
    tokenizer_path: str | None = None,
    shards_dir: str = "artifacts/shards",
    output_dir: str = "artifacts/coord_check",
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment: str = "xm2-coord-check",
    accelerator: str = "cpu",
) -> dict[tuple[str, int, str], float]:
    """µP coordinate check: train the decoder at several widths, plot activation size vs width.

    Every (parametrization, width, seed) is an ``xm2 fit`` run, logged as a child of one MLflow
    run. That run receives ``coord_check_<parametrization>.png`` and ``.csv`` (also written to
    output_dir) and the growth factors (max/min of mean |x| over widths) as metrics
    ``growth/<parametrization>/<module>`` at step t; the factors are printed too. Under µP they
    stay near 1 after the first updates; under SP they grow with the width range.

    Args:
        widths: hidden_size values; multiples of head_dim 64 (heads = width / 64).
        parametrizations: mup and/or sp (standard parametrization, the sanity check).
        steps: Optimizer updates at a constant learning rate; t = 0 .. steps are recorded.
        seeds: Seeds of initialisation and data stream averaged at each width (0, 1, ...).
        base_width: µP dim_model_base; at this width µP and SP are the same model.
        num_layers: Depth, the same at every width.
        num_kv_heads: Key/value heads; must divide width / 64 for every width.
        scale_emb: µP embedding multiplier.
        scale_depth: µP residual-branch multiplier (× 1/√num_layers).
        init_std: µP base init std.
        optimizer: AdamW settings; lr is the base µP learning rate, used constant.
        vocab_size: Tokenizer and model vocabulary.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per step.
        source: Corpus source the batches are drawn from; at a given step and seed every width
            sees the same batch.
        corpus_dir: The bundled corpus.
        tokenizer_path: SentencePiece model; default artifacts/tokenizers/unigram-<vocab_size>.model,
            trained on the corpus if missing.
        shards_dir: Root folder of the token shards (written on first use, as by `xm2 fit`).
        output_dir: Folder for the PNG and CSV files (and the runs' root folder).
        tracking_uri: MLflow tracking store.
        experiment: MLflow experiment name.
        accelerator: Lightning accelerator of every run.
    """
    check_settings(widths, steps, seeds)
    known = source_names(corpus_dir)
    if source not in known:
        raise ConfigError(f"coord-check source={source!r} is not a source of {corpus_dir}; "
                          f"allowed: {', '.join(known)}")
    tokenizer = _matching_tokenizer(tokenizer_path, vocab_size, corpus_dir)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    architecture = dict(base_width=base_width, num_layers=num_layers, vocab_size=vocab_size,
                        seq_len=seq_len, num_kv_heads=num_kv_heads, scale_emb=scale_emb,
                        scale_depth=scale_depth, init_std=init_std)
    # The only source of both mixtures: the decay phase of the run's one extra step changes nothing.
    data = {"stable": {source: 1.0}, "decay": {source: 1.0}, "corpus_dir": corpus_dir,
            "tokenizer_path": str(tokenizer), "shards_dir": shards_dir, "batch_size": batch_size}
    params = {"steps": steps, "seeds": seeds, **architecture,
              **{f"optimizer/{k}": v for k, v in asdict(optimizer).items()},
              "widths": list(widths), "batch_size": batch_size, "source": source,
              "tokenizer": str(tokenizer), "shards_dir": shards_dir, "accelerator": accelerator}
    run = TrackedRun.start(tracking_uri, experiment, f"widths-{min(widths)}-{max(widths)}",
                           params=params)
    factors: dict[tuple[str, int, str], float] = {}
    with run:
        for parametrization in parametrizations:
            table = run_coord_check(run, widths, parametrization=parametrization, steps=steps,
                                    seeds=seeds, architecture=architecture, data=data,
                                    optimizer=optimizer, accelerator=accelerator, root_dir=output)
            stem = output / f"coord_check_{parametrization}"
            title = (f"{DISPLAY_NAMES[parametrization]}: mean |x| vs width, {seeds} seeds, "
                     f"lr {optimizer.lr}, base width {base_width}, {num_layers} layers")
            run.log_artifact(write_table(table, stem.with_suffix(".csv")))
            run.log_figure(coord_check_figure(table, title), stem.with_suffix(".png"), dpi=110)
            factors.update(growth_factors(table))
            print(f"\nGrowth factor over widths {min(widths)}..{max(widths)} "
                  f"(max/min of mean |x|; 1 = width-independent), PNG and CSV at {stem}.*")
            print(format_growth_factors(factors, parametrization))
        # Growth factor (parametrization, step, module) as metric growth/<param>/<module> at step.
        run.log_curves((f"growth/{parametrization}/{module}", value, step)
                       for (parametrization, step, module), value in factors.items()
                       if math.isfinite(value))
    return factors


def _matching_tokenizer(tokenizer_path: str | None, vocab_size: int, corpus_dir: str) -> Path:
    """The named tokenizer, or the default one of ``vocab_size`` (trained as `xm2 fit` would)."""
    tokenizer = Path(tokenizer_path or default_tokenizer_path(vocab_size))
    if tokenizer_path is None and not tokenizer.is_file():
        train_tokenizer(vocab_size, corpus_dir, tokenizer)
    tokenizer_vocab = load_tokenizer(tokenizer).vocab_size()
    if tokenizer_vocab != vocab_size:
        raise ConfigError(f"tokenizer {tokenizer} has vocab size {tokenizer_vocab} but "
                          f"vocab_size={vocab_size}; train a matching one with "
                          f"`xm2 train-tokenizer --vocab_size {vocab_size}`")
    return tokenizer
