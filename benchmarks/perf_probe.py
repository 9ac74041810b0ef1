"""A callback that times a real ``xm2 fit`` from inside: steady-state steps, start-up, validation,
and the time each other callback and the loggers take.

``perf_suite.py`` adds it to the recipe's callbacks (``callbacks+:``, with ``benchmarks/`` on
``PYTHONPATH``) and reads the JSON file it writes at the end of the run:

- ``first_step_wall``: ``time.time()`` when the first training batch starts (the suite subtracts
  the launch time of the process);
- ``intervals``: seconds from the start of each training batch to the start of the next, with
  the time spent in validation, in the analyses and in checkpoint writes (each reported on its
  own) taken out; everything else that runs per step stays in: the data
  fetch, forward, backward, clipping, AdamW, WSD, the mixture monitor, the throughput monitor,
  the progress bar and MLflow logging;
- ``validation_s``: the duration of each validation loop;
- ``callbacks``: seconds and calls of each callback hook (``Class.hook``), of the loggers' methods
  (``MLFlowLogger.log_metrics`` ...) and of checkpoint writes (``checkpoint_save``);
- ``steps``: training batches run.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import lightning as L

# Callbacks whose time is a separate line of the report, not a cost of every step: the analyses
# (they run at the decay start and at the end). Checkpoint writes (every 60 steps in the recipe)
# are taken out too, through trainer.save_checkpoint; ModelCheckpoint's per-step check stays in.
SEPARATE = ("Calibration", "ContextLaw", "CoordCheck")
HOOKS = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
         "on_train_batch_start", "on_train_batch_end", "on_validation_start",
         "on_validation_end", "on_validation_batch_start", "on_validation_batch_end",
         "on_validation_epoch_start", "on_validation_epoch_end", "on_train_epoch_start",
         "on_train_epoch_end", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_before_zero_grad", "on_save_checkpoint",
         "on_exception")
LOGGER_METHODS = ("log_metrics", "log_hyperparams", "save", "finalize", "log_graph")


class FitProbe(L.Callback):
    """Times the run it is in and writes ``output`` (JSON) when training ends."""

    def __init__(self, output: str) -> None:
        """
        Args:
            output: JSON file written at the end of training.
        """
        self.output = Path(output)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.batch_starts: list[float] = []
        self.excluded: list[float] = [0.0]  # excluded seconds since the current batch started
        self.validation: list[float] = []
        self.first_step_wall: float | None = None
        self._validation_started: float | None = None
        self._excluded_in_validation = 0.0
        self._wrapped = False

    def _timed(self, key: str, function, exclude: bool):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self.seconds[key] = self.seconds.get(key, 0.0) + seconds
                self.calls[key] = self.calls.get(key, 0) + 1
                if exclude and self._validation_started is None:
                    self.excluded[-1] += seconds
                elif exclude:
                    self._excluded_in_validation += seconds
        return wrapper

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._wrapped:
            return
        self._wrapped = True
        for callback in trainer.callbacks:
            if callback is self:
                continue
            name = type(callback).__name__
            exclude = name in SEPARATE
            for hook in HOOKS:
                if getattr(type(callback), hook, None) is getattr(L.Callback, hook, None):
                    continue  # not overridden: nothing runs
                setattr(callback, hook,
                        self._timed(f"{name}.{hook}", getattr(callback, hook), exclude))
        for logger in trainer.loggers:
            name = type(logger).__name__
            for method in LOGGER_METHODS:
                if hasattr(logger, method):
                    setattr(logger, method,
                            self._timed(f"{name}.{method}", getattr(logger, method), False))
        # Every checkpoint write, whichever hook asked for it.
        trainer.save_checkpoint = self._timed("checkpoint_save", trainer.save_checkpoint, True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first_step_wall is None:
            self.first_step_wall = time.time()
        self.batch_starts.append(now)
        self.excluded.append(0.0)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_started = time.perf_counter()
        self._excluded_in_validation = 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._validation_started
        self._validation_started = None
        if trainer.sanity_checking:
            return
        # A checkpoint saved at the end of validation is counted as a save, not validation.
        self.validation.append(seconds - self._excluded_in_validation)
        self.excluded[-1] += seconds

    def on_train_end(self, trainer, pl_module) -> None:
        # The last step ends here, after the other callbacks' on_train_end (this probe is the
        # last callback); the analyses they run at the end are taken out like any other.
        self.batch_starts.append(time.perf_counter())
        # excluded[i + 1] was spent during batch i (it was opened when batch i started).
        intervals = [end - start - self.excluded[index + 1] for index, (start, end) in
                     enumerate(zip(self.batch_starts, self.batch_starts[1:], strict=False))]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps({
            "first_step_wall": self.first_step_wall,
            "intervals": intervals,
            "validation_s": self.validation,
            "callbacks": {key: {"seconds": self.seconds[key], "calls": self.calls[key]}
                          for key in sorted(self.seconds)},
            "global_step": trainer.global_step,
            "steps": len(intervals),
        }, indent=1))
