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


def test_lm_eval_template_lm_splits_a_request_with_encode_pair():
    """xm2/eval/lm_eval.py overrides and xm2/eval/lm_eval_compare.py calls
    ``TemplateLM._encode_pair(context, continuation) -> (context ids, continuation ids)``, the
    method through which lm-eval's own ``loglikelihood`` encodes every request."""
    import inspect

    from lm_eval.api.model import TemplateLM

    checked = (f"checked on lm-eval 0.4.13; installed: lm-eval {metadata.version('lm-eval')}")
    method = getattr(TemplateLM, "_encode_pair", None)
    assert callable(method), checked
    assert list(inspect.signature(method).parameters) == ["self", "context", "continuation"], checked
    assert "_encode_pair" in inspect.getsource(TemplateLM.loglikelihood), checked


def test_lightning_cli_applies_a_checkpoints_hyperparameters_in_parse_ckpt_path():
    """xm2/lightning_cli.py overrides ``LightningCLI._parse_ckpt_path``: Lightning's own version,
    called right after ``parse_arguments``, replaces the command line's model settings with the
    checkpoint's hyperparameters silently; xm2's applies or refuses each difference instead
    (xm2.resume). No public hook runs in its place, so the override is pinned here."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    from xm2.lightning_cli import Xm2CLI

    checked = versions(["lightning"])
    init = inspect.getsource(LightningCLI.__init__)
    assert "self.parse_arguments(self.parser, args)\n        self._parse_ckpt_path()" in init, checked
    assert "hyper_parameters" in inspect.getsource(LightningCLI._parse_ckpt_path), checked
    assert Xm2CLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
