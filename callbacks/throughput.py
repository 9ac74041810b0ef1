"""Tokens/s, step time, MFU and the share of step time spent waiting for data."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

from xm2.analysis.flops import flops_per_token, measure_peak_flops
from xm2.errors import ConfigError


def rows_in_batch(batch: dict) -> int:
    return batch["tokens"].shape[0]


def tokens_in_batch(batch: dict) -> int:
    # A row of seq_len + 1 tokens trains seq_len predictions.
    return batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with xm2's analytic FLOPs and a peak on CPU too.

    Lightning logs ``train/device/items_per_sec`` (tokens/s), ``train/device/flops_per_sec`` and
    ``train/device/mfu`` over a window of steps. This adds ``throughput/step_time_s`` and
    ``throughput/data_wait_share``: the time the training loop spent in fetching its next batch
    (Lightning's ``train_dataloader_next`` action, timed through the trainer's profiler hooks)
    as a share of the step time, over the same window. FLOPs per batch come from :func:`xm2.analysis.flops.flops_per_token` (3× forward in
    training, forward only in validation). The peak is ``peak_flops`` if given; else Lightning's
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
        self._fetch_started = 0.0
        self._fetch_seconds = 0.0
        self._waits: list[float] = []
        self._steps: list[float] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops or self.available_flops
        if peak is None and trainer.strategy.root_device.type == "cpu":
            peak = measure_peak_flops(_plugin_to_compute_dtype(trainer.precision_plugin),
                                      size=2048, repeats=5)
        # ThroughputMonitor refuses available_flops as an argument; set it where it is used.
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak
        if peak:
            for logger in trainer.loggers:
                logger.log_metrics({"throughput/peak_flops": float(peak)}, step=trainer.global_step)
        if stage == "fit":
            self._time_batch_fetches(trainer.profiler)

    def _time_batch_fetches(self, profiler) -> None:
        """Wrap the profiler's start/stop, which the training loop calls around each batch fetch."""
        start, stop = profiler.start, profiler.stop

        def timed_start(action_name: str) -> None:
            if action_name.endswith("train_dataloader_next"):
                self._fetch_started = time.perf_counter()
            start(action_name)

        def timed_stop(action_name: str) -> None:
            stop(action_name)
            if action_name.endswith("train_dataloader_next"):
                self._fetch_seconds += time.perf_counter() - self._fetch_started

        profiler.start, profiler.stop = timed_start, timed_stop
        self._unwrap = lambda: (setattr(profiler, "start", start), setattr(profiler, "stop", stop))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if getattr(self, "_unwrap", None):
            self._unwrap()
            self._unwrap = None

    def _set_flops(self, pl_module, batch: dict, training: bool) -> None:
        config = pl_module.model.config
        seq_len = batch["tokens"].shape[1] - 1
        # The attribute ThroughputMonitor reads: FLOPs of this batch on this device.
        pl_module.flops_per_batch = int(flops_per_token(config, seq_len, training=training)
                                        * tokens_in_batch(batch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_started is not None:
            # The fetch of this batch happened since the previous batch started.
            self._steps.append(now - self._batch_started)
            self._waits.append(self._fetch_seconds)
        self._batch_started, self._fetch_seconds = now, 0.0
        self._set_flops(pl_module, batch, training=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._steps and trainer._logger_connector.should_update_logs:
            waits, steps = self._waits[-self.window_size:], self._steps[-self.window_size:]
            metrics = {"throughput/step_time_s": sum(steps) / len(steps),
                       "throughput/data_wait_share": sum(waits) / sum(steps)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_start(self, trainer, *args) -> None:
        super().on_validation_start(trainer, *args)
        # A step with a validation in it is not a training step's time.
        self._batch_started = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._set_flops(pl_module, batch, training=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "flops_per_batch"):
            del pl_module.flops_per_batch

