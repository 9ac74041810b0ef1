"""Faults planted into real training runs by the tests, as Lightning callbacks in a config."""

from __future__ import annotations

import time

import lightning as L
import torch


class PoisonWeights(L.Callback):
    """Makes one weight non-finite before the update of ``at_step``, as a diverging run would.

    With ``restore_after=True`` the weight comes back after that step: a one-step glitch that
    ``on_nonfinite_loss: skip`` can step over.
    """

    def __init__(self, at_step: int, restore_after: bool = False) -> None:
        self.at_step, self.restore_after = at_step, restore_after
        self._saved: torch.Tensor | None = None

    def _weight(self, pl_module) -> torch.Tensor:
        return pl_module.model.embed_tokens.weight

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and self._saved is None:
            weight = self._weight(pl_module)
            self._saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restore_after and self._saved is not None:
            with torch.no_grad():
                self._weight(pl_module).copy_(self._saved)
            self._saved = None
            self.restore_after = False


class SlowSteps(L.Callback):
    """Sleeps after each step, so that a test can act (kill a server) while the run goes on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
