"""Logs the data phase and the realised per-source token fractions of each phase."""

from __future__ import annotations

import lightning as L
import torch

from xm2.tracking.record import record_metrics


class MixtureMonitor(L.Callback):
    """Counts the tokens each source contributed, per phase over all ranks, and logs their fractions.

    Logged every ``log_every_n_steps``: ``data/phase`` (0 stable, 1 decay) and
    ``mixture/<phase>/<source>``, the fraction of that phase's tokens so far that came from the
    source, for the current phase only (a finished phase's last values stay its record).
    Compare them with the configured weights to see that the mixture took effect.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        names = trainer.datamodule.source_names
        counts = self.tokens.setdefault(batch["phase"], torch.zeros(len(names), dtype=torch.float64))
        tokens_per_row = batch["tokens"].shape[1] - 1
        batch_counts = torch.bincount(batch["source_ids"], minlength=len(names)) * tokens_per_row
        # Summed over ranks, so every rank (and the checkpoint rank 0 writes) holds global counts.
        counts += trainer.strategy.reduce(batch_counts.to(pl_module.device), reduce_op="sum").cpu().double()
        step, last_microbatch = batch["step"], (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not last_microbatch or step % trainer.log_every_n_steps:
            return
        metrics = {f"mixture/{batch['phase']}/{name}": (counts[i] / counts.sum()).item()
                   for i, name in enumerate(names)}
        metrics["data/phase"] = float(batch["phase"] == "decay")
        # Straight to the loggers: values given to pl_module.log stay in Lightning's results for
        # the whole (endless) epoch and would be logged again, stale, after their phase ended.
        record_metrics(trainer, metrics, step)

    def state_dict(self) -> dict:
        return {phase: counts.clone() for phase, counts in self.tokens.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = {phase: counts.clone() for phase, counts in state_dict.items()}
