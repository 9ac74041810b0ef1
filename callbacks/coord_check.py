"""Logs the µP coordinate-check activation sizes of the model during a real training run."""

from __future__ import annotations

import lightning as L
import torch

from xm2.errors import ConfigError
from xm2.studies.coord_check import ActivationRecorder
from xm2.tracking.record import record_metrics


class CoordCheck(L.Callback):
    """Records mean |x| of the coordinate-check activations at step 0 and every N steps.

    Before the update of each recorded step, one extra no-grad forward pass of that step's
    training batch runs with the hooks of :class:`xm2.studies.coord_check.ActivationRecorder`,
    and ``coord/<module>`` is logged for ``embedding``, ``layer<i>.attention|mlp|residual``,
    ``final_norm`` and ``logits``. Compare runs of different widths at equal steps: under µP the
    curves coincide. Sizes are those of rank 0's batch. ``xm2 coord-check`` names it, with
    every_n_steps 1, in each of its runs and reads the metrics back from them.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        """
        Args:
            every_n_steps: Record at optimizer steps 0, N, 2N, ...
        """
        if every_n_steps < 1:
            raise ConfigError(f"CoordCheck every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._last_recorded_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        # Under gradient accumulation several batches share a step; the first one stands for it.
        if step % self.every_n_steps or step == self._last_recorded_step:
            return
        self._last_recorded_step = step
        with (torch.no_grad(), trainer.precision_plugin.forward_context(),
              ActivationRecorder(pl_module.model) as recorder):
            pl_module.model(batch["tokens"][:, :-1])
        metrics = {f"coord/{module}": size for module, size in recorder.sizes().items()}
        # Straight to the loggers: pl_module.log would only reach them on log_every_n_steps
        # boundaries, which drops the step-0 record the check needs.
        record_metrics(trainer, metrics, step)
