"""A progress bar that knows the run length when the training stream is endless."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar whose total is ``max_steps`` micro-batches: xm2's mixture stream has no epochs."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if total == float("inf") and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        return total
