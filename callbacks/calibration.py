"""Calibration of multiple-choice answers during ``fit`` and on a checkpoint under ``validate``."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from xm2.analysis.calibration import calibration_report, plot_reliability
from xm2.analysis.multiple_choice import FORMATS, evaluate_multiple_choice
from xm2.checkpoint import read_record
from xm2.data.eval_sets import load_eval_set
from xm2.data.tokenizer import EOS_ID, load_tokenizer
from xm2.errors import ConfigError
from xm2.tracking.record import record_figure, record_json, record_metrics


class AnalysisSchedule(L.Callback):
    """When an analysis runs: every N steps, at the decay start, at the end, and under validate.

    "At the decay start" is before the first decay step's update, i.e. the model at the end of
    the stable phase; "at the end" is after the last update. Subclasses implement ``analyse``.
    """

    def __init__(self, every_n_steps: int | None = None, at_decay_start: bool = True,
                 at_end: bool = True) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"every_n_steps={every_n_steps} must be >= 1 (or null for never)")
        self.every_n_steps, self.at_decay_start, self.at_end = every_n_steps, at_decay_start, at_end
        self._last_step: int | None = None

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        raise NotImplementedError

    def _run(self, trainer, pl_module, step: int) -> None:
        if step == self._last_step:
            return
        self._last_step = step
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                self.analyse(trainer, pl_module, step)
        finally:
            model.train(was_training)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        schedule = getattr(pl_module, "schedule", None)
        # The first step of the decay: the end of the stable phase.
        at_decay_start = (schedule is not None and step > 0 and schedule.phase(step) == "decay"
                          and schedule.phase(step - 1) != "decay")
        if (self.every_n_steps and step > 0 and step % self.every_n_steps == 0) or (
                self.at_decay_start and at_decay_start):
            self._run(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._run(trainer, pl_module, trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Under `xm2 validate --ckpt_path`: once, keyed by the checkpoint's step.
        if trainer.state.fn == "validate":
            self._run(trainer, pl_module, checkpoint_step(trainer))


def checkpoint_step(trainer) -> int:
    """The optimizer step of the checkpoint being validated (validate restores weights only, so
    ``trainer.global_step`` is 0 there)."""
    path = trainer.ckpt_path
    if not path:
        return trainer.global_step
    record = read_record(path)
    if record and record.get("global_step") is not None:
        return int(record["global_step"])
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint.get("global_step", trainer.global_step))


class Calibration(AnalysisSchedule):
    """Accuracy, ECE, MCE, Brier score and a reliability diagram of multiple-choice sets.

    Logs ``calibration/<set>_<format>/{accuracy,ece,mce,brier,chance,seconds}`` at the global
    step, and the artefacts ``calibration/<set>_<format>/step<step>.png`` (reliability diagram)
    and ``.json`` (metrics and the bin table).
    """

    def __init__(
        self,
        tasks: tuple[str, ...] = ("mmlu:letter", "arc_easy:cloze"),
        limit: int | None = 200,
        subjects: list[str] | None = None,
        shots: int = 0,
        n_bins: int = 10,
        data_dir: str = "data/eval",
        batch_size: int = 32,
        every_n_steps: int | None = None,
        at_decay_start: bool = True,
        at_end: bool = True,
    ) -> None:
        """
        Args:
            tasks: ``<set>:<format>`` pairs; set is a name in data_dir (mmlu, arc_easy,
                arc_challenge, piqa, hellaswag, or any prepared one) or a path to a JSONL file with
                question, choices and gold; format is letter or cloze.
            limit: Items per set (a seeded subset, the same at every evaluation); null for all.
            subjects: Only these subjects (MMLU's 57 subject names).
            shots: Solved examples before each question (0: the paper's MMLU protocol).
            n_bins: Equal-width confidence bins.
            data_dir: Folder of the named sets (data/eval ships subsets; `xm2 prepare-eval`
                writes the full sets).
            batch_size: Sequences per forward pass.
            every_n_steps: Also evaluate every N optimizer steps (null: never).
            at_decay_start: Evaluate at the decay start (the end of the stable phase).
            at_end: Evaluate after the last step.
        """
        super().__init__(every_n_steps, at_decay_start, at_end)
        self.tasks = []
        for task in tasks:
            name, _, format = task.rpartition(":")
            if not name or format not in FORMATS:
                raise ConfigError(f"calibration task {task!r}; allowed: <set>:<format> with format "
                                  f"one of {', '.join(FORMATS)}, e.g. mmlu:letter")
            self.tasks.append((name, format))
        if shots < 0 or n_bins < 1 or batch_size < 1:
            raise ConfigError(f"calibration shots={shots} must be >= 0, n_bins={n_bins} and "
                              f"batch_size={batch_size} >= 1")
        self.limit, self.subjects, self.shots, self.n_bins = limit, subjects, shots, n_bins
        self.data_dir, self.batch_size = data_dir, batch_size
        self._items: dict[str, list] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Read the sets up front: a missing file fails at the start, not hours into a run.
        for name, _ in self.tasks:
            subjects = self.subjects if name == "mmlu" else None
            self._items[name] = load_eval_set(name, self.data_dir, self.limit, subjects)

    def analyse(self, trainer, pl_module, step: int) -> None:
        tokenizer = load_tokenizer(trainer.datamodule.tokenizer_path)
        for name, format in self.tasks:
            started = time.perf_counter()
            result = evaluate_multiple_choice(
                pl_module.model, tokenizer, self._items[name], format, self.shots,
                max_len=pl_module.model.config.max_seq_len, boundary_id=EOS_ID,
                batch_size=self.batch_size, continuation_style=name == "hellaswag")
            report = calibration_report(result.probabilities, result.gold, self.n_bins)
            seconds = time.perf_counter() - started
            key = f"calibration/{Path(name).name.split('.')[0]}_{format}"
            # Keyed by the step analysed: self.log would wait for the next log_every_n_steps
            # boundary and cannot log from on_train_end.
            record_metrics(trainer, {f"{key}/{k}": v for k, v in report.metrics().items()}
                           | {f"{key}/seconds": seconds}, step)
            record_json(trainer, {"step": step, "set": name, "format": format,
                                  "shots": self.shots, **report.to_dict()},
                        f"{key}/step{step:06d}.json")
            if trainer.is_global_zero:
                record_figure(trainer, plot_reliability(
                    report, f"{name} ({format}, {self.shots}-shot) at step {step}"),
                    f"{key}/step{step:06d}.png")
