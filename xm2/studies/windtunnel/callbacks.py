"""The Lightning callbacks of a wind-tunnel fit: one ends a diverging fit, one reports each
validation to the Optuna trial (pruning it when the pruner says so) and keeps its heartbeat, one
records the study's own parameters in the fit's MLflow run as soon as it exists."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import lightning as L
import optuna

from xm2.errors import TrainingDiverged


class DivergenceGuard(L.Callback):
    """Ends a fit whose train loss is not finite or exceeds ``factor`` × its first value."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:  # a skipped (non-finite) step
            raise TrainingDiverged(
                f"the training loss is not finite at step {trainer.global_step}")
        loss = float(outputs["loss"])
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.factor * self.first_loss:
            raise TrainingDiverged(f"the training loss is {loss:.4g} at step {trainer.global_step}"
                                   f" (first {self.first_loss:.4g}, limit {self.factor:g}×)")


class ReportToTrial(L.Callback):
    """Reports each validation's objective to the Optuna trial at the optimizer step it was
    measured (Optuna's own Lightning callback reports the epoch, so a run of one long epoch
    would report once), stops the fit when the pruner says so, and keeps the trial's heartbeat."""

    def __init__(self, trial: optuna.Trial, objective: str, heartbeat_s: float = 30.0) -> None:
        self.trial, self.objective, self.heartbeat_s = trial, objective, heartbeat_s
        self.pruned_at: int | None = None
        self._last_beat = 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.objective not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.objective])
        if not math.isfinite(value):
            raise TrainingDiverged(f"{self.objective} is {value} at step {trainer.global_step}")
        self.trial.report(value, trainer.global_step)
        if self.trial.should_prune():
            self.pruned_at = trainer.global_step
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.time()
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            self.trial.set_user_attr("heartbeat", now)


class RecordRun(L.Callback):
    """Logs the study's own parameters of a fit (``trial/lr``, ...) into the MLflow run that the
    fit's logger opens, beside those ``xm2 fit`` logs, and passes the run's id to ``on_run``
    when the fit starts (a worker killed inside the fit leaves it for the study to find)."""

    def __init__(self, params: Mapping[str, object],
                 on_run: Callable[[str], None] | None = None) -> None:
        self.params, self.on_run = dict(params), on_run

    def on_fit_start(self, trainer, pl_module) -> None:
        client, run_id = trainer.logger.experiment, trainer.logger.run_id
        for key, value in self.params.items():
            client.log_param(run_id, key, value)
        if self.on_run is not None:
            self.on_run(run_id)
