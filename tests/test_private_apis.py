"""Private attributes of pinned libraries that xm2 still uses, because no public API does the job.

Each test asserts that the attribute exists and behaves as xm2 uses it, and names the versions it
was checked on. When a library upgrade fails one, the code that uses it needs another look; the
failure message says which.
"""

from importlib import metadata

import pytest
from lightning.fabric.utilities.throughput import Throughput as FabricThroughput
from lightning.pytorch.trainer.states import RunningStage

from tests.test_throughput import PEAK_FLOPS, Batches, fit_with_throughput
from xm2.data.datamodule import TimedDataLoader

CHECKED_ON = {"lightning": "2.6.6"}


def versions(names) -> str:
    return (f"checked on {', '.join(f'{name} {CHECKED_ON[name]}' for name in names)}; installed: "
            f"{', '.join(f'{name} {metadata.version(name)}' for name in names)}")


def test_throughput_monitor_keeps_one_throughput_per_stage_in_throughputs(tmp_path):
    """callbacks/throughput.py, ``Throughput.setup``: ``ThroughputMonitor`` takes no peak FLOP/s
    (``available_flops`` as a keyword is passed on twice: a TypeError) and copies the one it looks
    up, None on CPU, into one fabric ``Throughput`` per stage at setup, kept in the private
    ``_throughputs``; xm2 writes its measured CPU peak there."""
    checked = versions(["lightning"])
    recorder, throughput = fit_with_throughput(
        tmp_path, TimedDataLoader(Batches(8), batch_size=None), steps=8)
    stages = getattr(throughput, "_throughputs", None)
    assert isinstance(stages, dict) and RunningStage.TRAINING in stages, checked
    assert all(isinstance(value, FabricThroughput) for value in stages.values()), checked
    assert all(value.available_flops == PEAK_FLOPS for value in stages.values()), checked
    # The peak set there is the one Lightning's MFU divides by.
    logged = [metrics for _, metrics in recorder.logged if "train/device/mfu" in metrics]
    assert logged, checked
    for metrics in logged:
        assert metrics["train/device/mfu"] == pytest.approx(
            metrics["train/device/flops_per_sec"] / PEAK_FLOPS), checked
