"""What a checkpoint may be continued with: resume, branch or evaluate, and what must match.

A checkpoint records the model's settings (``hyper_parameters``), the data module's
(``datamodule_hyper_parameters``) and the trainer settings that define a run (``xm2.trainer``).
Continuing it under other settings either takes effect (safe to change: the run length, logging,
callbacks, data paths and workers) or is refused with every difference listed; nothing in a
command line or config is ever silently replaced by the checkpoint's value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xm2.errors import CheckpointError, ConfigError
from xm2.schedule import WSDSchedule

Mode = Literal["resume", "branch", "evaluate"]

# Settings that define what was trained; a continuation with other values is another experiment.
RUN_DEFINING = {
    "resume": ("model.architecture.", "model.optimizer.", "model.schedule.", "data.stable.",
               "data.decay.", "data.batch_size", "data.seq_len", "data.vocab_size", "data.seed",
               "trainer.accumulate_grad_batches", "trainer.precision", "trainer.world_size",
               "trainer.gradient_clip_val", "trainer.seed"),
    # A branch chooses its own decay (schedule, decay mixture, length); the rest must match.
    "branch": ("model.architecture.", "model.optimizer.", "model.schedule.warmup_steps",
               "data.batch_size", "data.seq_len", "data.vocab_size", "data.seed",
               "trainer.accumulate_grad_batches", "trainer.precision", "trainer.world_size",
               "trainer.gradient_clip_val", "trainer.seed"),
    "evaluate": ("model.architecture.", "data.seq_len", "data.vocab_size"),
}
# Changes that take effect and are worth a line on the console.
ANNOUNCED = ("trainer.max_steps", "model.on_nonfinite_loss", "model.parallel.", "data.val_batches_per_source",
             "model.schedule.", "data.decay.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; dicts of mixture weights flatten too."""
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            if str(key).startswith("_"):
                continue  # Lightning's bookkeeping (_instantiator, _class_path)
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _normalized_mixture(weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(weights or {})
    total = sum(weights.values()) or 1.0
    return {name: weight / total for name, weight in weights.items() if weight}


def checkpoint_settings(checkpoint: Mapping) -> dict[str, Any]:
    """The checkpoint's run settings as dotted keys (``model.*``, ``data.*``, ``trainer.*``)."""
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    for phase in ("stable", "decay"):
        if data.get(phase) is not None:
            data[phase] = _normalized_mixture(data[phase])
    return flatten({"model": checkpoint.get("hyper_parameters") or {}, "data": data,
                    "trainer": (checkpoint.get("xm2") or {}).get("trainer") or {}})


def current_settings(model: Mapping, data: Mapping, trainer: Mapping) -> dict[str, Any]:
    """This invocation's settings in the same dotted form."""
    data = dict(data)
    for phase in ("stable", "decay"):
        if data.get(phase) is not None:
            data[phase] = _normalized_mixture(data[phase])
    return flatten({"model": model, "data": data, "trainer": trainer})


@dataclass
class Comparison:
    refused: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def announce(self) -> list[str]:
        return [f"{key}: {old!r} (checkpoint) -> {new!r}" for key, (old, new) in
                sorted(self.applied.items()) if key.startswith(ANNOUNCED)]


def compare(saved: Mapping[str, Any], current: Mapping[str, Any], mode: Mode) -> Comparison:
    """Sort every difference between a checkpoint's settings and this run's into refused/applied.

    Keys only one side has are compared too (a mixture source added or dropped); trainer keys one
    side does not know are skipped: the checkpoint's of older checkpoints, this run's world size
    when ``trainer.devices`` is "auto" or -1 (only the trainer resolves those).
    """
    comparison = Comparison()
    defining = RUN_DEFINING[mode]
    for key in sorted(set(saved) | set(current)):
        if key.startswith("trainer.") and (key not in saved or key not in current):
            continue
        if not key.startswith(("model.", "data.", "trainer.")):
            continue
        old, new = saved.get(key), current.get(key)
        if key == "trainer.seed":
            if old is None or new is None or str(old) == str(new):
                continue
        elif _same(old, new):
            continue
        bucket = comparison.refused if key.startswith(defining) else comparison.applied
        bucket[key] = (old, new)
    return comparison


def refusal_message(path: str, mode: Mode, refused: Mapping[str, tuple[Any, Any]],
                    advice: str | None = None) -> str:
    """Why ``path`` cannot be continued in ``mode``: each refused difference, and what to do
    (``advice``, or the mode's own)."""
    lines = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} here"
                      for key, (old, new) in sorted(refused.items()))
    advice = advice or {
        "resume": "resume with the run's own settings (its config.yaml is in MLflow: xm2 fit "
                  "--config config.yaml --ckpt_path <checkpoint>, a decay branch's too), or "
                  "start a decay branch from the checkpoint with --branch_from",
        "branch": "a branch may change only its decay: model.schedule (except warmup_steps), "
                  "data.decay, data.stable and its length",
        "evaluate": "evaluate with the architecture the checkpoint was trained with",
    }[mode]
    verb = {"resume": "resumed", "branch": "branched", "evaluate": "evaluated"}[mode]
    return (f"checkpoint {path} cannot be {verb} with these settings; they differ from the "
            f"checkpoint's:\n{lines}\nTo fix: {advice}.")


@dataclass
class BranchPlan:
    """How a decay branch continues a stable-phase checkpoint."""

    source_step: int
    source_tokens: int | None
    decay_steps: int

    @property
    def max_steps(self) -> int:
        return self.source_step + self.decay_steps


def plan_branch(checkpoint: Mapping, path: str, decay_steps: int | None,
                decay_tokens: int | None) -> BranchPlan:
    """Check that ``checkpoint`` is in its stable phase and size the decay in steps."""
    step = int(checkpoint["global_step"])
    schedule = (checkpoint.get("hyper_parameters") or {}).get("schedule") or {}
    warmup, decay_start = schedule.get("warmup_steps", 0), schedule.get("decay_start_step")
    if decay_start is not None and WSDSchedule(warmup, decay_start).phase(step) != "stable":
        raise CheckpointError(
            f"--branch_from {path}: the checkpoint is at step {step}, outside its run's stable "
            f"phase (steps {warmup} to {decay_start - 1}); branch from a stable-phase checkpoint"
        )
    record = (checkpoint.get("xm2") or {}).get("record") or {}
    tokens = record.get("tokens_seen")
    if (decay_steps is None) == (decay_tokens is None):
        raise ConfigError(
            "--branch_from needs the decay length: give exactly one of --branch_decay_steps and "
            f"--branch_decay_tokens (got {decay_steps} and {decay_tokens})"
        )
    if decay_tokens is not None:
        if not tokens or step == 0:
            raise CheckpointError(
                f"--branch_decay_tokens: checkpoint {path} does not record its tokens per step; "
                "give --branch_decay_steps"
            )
        decay_steps = math.ceil(decay_tokens / (tokens / step))
    if decay_steps < 1:
        raise ConfigError(f"the decay of a branch needs at least one step (got {decay_steps})")
    return BranchPlan(source_step=step, source_tokens=tokens, decay_steps=decay_steps)
