"""Tokens/s, step time, MFU and the share of step time spent waiting for data."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from xm2.analysis.flops import flops_per_token, measure_peak_flops
from xm2.data.datamodule import TimedDataLoader
from xm2.errors import ConfigError
from xm2.tracking.record import record_metrics

# The dtype matrix products run in under each of Lightning's precision settings
# (trainer.precision: "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true").
COMPUTE_DTYPES = {"64": torch.float64, "32": torch.float32, "16": torch.float16,
                  "bf16": torch.bfloat16}


def rows_in_batch(batch: dict) -> int:
    return batch["tokens"].shape[0]


def tokens_in_batch(batch: dict) -> int:
    # A row of seq_len + 1 tokens trains seq_len predictions.
    return batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the peak matmul for ``trainer.precision``; float32 for a setting that names
    no floating-point width (transformer-engine, bitsandbytes)."""
    return COMPUTE_DTYPES.get(str(precision).split("-")[0], torch.float32)


def fetch_seconds(trainer) -> float | None:
    """Seconds the training data loader has spent producing batches, if it counts them (xm2's
    :class:`~xm2.data.datamodule.TimedDataLoader` does); else None."""
    loader = trainer.train_dataloader
    return loader.fetch_seconds if isinstance(loader, TimedDataLoader) else None


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with xm2's analytic FLOPs and a peak on CPU too.

    Lightning logs ``train/device/items_per_sec`` (tokens/s), ``train/device/flops_per_sec`` and
    ``train/device/mfu`` over a window of steps. This adds ``throughput/step_time_s`` and
    ``throughput/data_wait_share``: the time the training loop spent waiting for its next batch
    (in the data loader's ``next``, counted by xm2's :class:`~xm2.data.datamodule.TimedDataLoader`;
    a loader that does not count it gets no share) as a share of the step time, over the same
    window, logged on the optimizer steps Lightning logs on (every ``log_every_n_steps``). FLOPs
    per batch come from :func:`xm2.analysis.flops.flops_per_token` (3× forward in training,
    forward only in validation). The peak is ``peak_flops`` if given; else Lightning's
    table of GPUs, or on CPU a matmul measured at setup in the run's compute dtype, logged as
    ``throughput/peak_flops``.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 10) -> None:
        """
        Args:
            peak_flops: FLOP/s of one device that MFU is measured against (null: look up or measure).
            window_size: Steps in the window that rates are averaged over.
        """
        if peak_flops is not None and peak_flops <= 0:
            raise ConfigError(f"peak_flops={peak_flops} must be positive (FLOP/s) or null")
        if window_size < 2:
            raise ConfigError(f"window_size={window_size} must be >= 2")
        super().__init__(batch_size_fn=rows_in_batch, length_fn=tokens_in_batch,
                         window_size=window_size)
        self.peak_flops, self.window_size = peak_flops, window_size
        self._batch_started: float | None = None
        self._fetched_before: float | None = None
        self._global_step_before = 0
        # (seconds from one batch start to the next, seconds of those spent fetching or None)
        self._steps: list[tuple[float, float | None]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops or self.available_flops
        if peak is None and trainer.strategy.root_device.type == "cpu":
            peak = measure_peak_flops(compute_dtype(trainer.precision), size=2048, repeats=5)
        # ThroughputMonitor refuses available_flops as an argument and has copied its own into
        # one Throughput per stage: set it there (no public way; tests/test_private_apis.py).
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak
        if peak:
            record_metrics(trainer, {"throughput/peak_flops": float(peak)})

    def _set_flops(self, pl_module, batch: dict, training: bool) -> None:
        config = pl_module.model.config
        seq_len = batch["tokens"].shape[1] - 1
        # The attribute ThroughputMonitor reads: FLOPs of this batch on this device.
        pl_module.flops_per_batch = int(flops_per_token(config, seq_len, training=training)
                                        * tokens_in_batch(batch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now, fetched = time.perf_counter(), fetch_seconds(trainer)
        if self._batch_started is not None:
            # This batch was fetched since the previous batch started.
            wait = None if fetched is None or self._fetched_before is None else (
                fetched - self._fetched_before)
            self._steps.append((now - self._batch_started, wait))
        self._batch_started, self._fetched_before = now, fetched
        self._global_step_before = trainer.global_step
        self._set_flops(pl_module, batch, training=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._steps and self._logs_this_batch(trainer):
            window = self._steps[-self.window_size:]
            seconds = sum(step for step, _ in window)
            metrics = {"throughput/step_time_s": seconds / len(window)}
            waits = [wait for _, wait in window if wait is not None]
            if len(waits) == len(window):
                metrics["throughput/data_wait_share"] = sum(waits) / seconds
            record_metrics(trainer, metrics)

    def _logs_this_batch(self, trainer) -> bool:
        """Lightning's rule for logging on a training batch, from public state: the batch stepped
        the optimizer (it did not only accumulate gradients), at a multiple of
        ``log_every_n_steps`` or as the run stops."""
        every, step = trainer.log_every_n_steps, trainer.global_step
        stepped = step > self._global_step_before
        return every > 0 and stepped and (step % every == 0 or trainer.should_stop)

    def on_validation_start(self, trainer, *args) -> None:
        super().on_validation_start(trainer, *args)
        # A step with a validation in it is not a training step's time.
        self._batch_started = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._set_flops(pl_module, batch, training=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "flops_per_batch"):
            del pl_module.flops_per_batch

