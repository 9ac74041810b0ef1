"""callbacks/throughput.py on a real (tiny) fit: when it logs, what the data-wait share measures,
and the compute dtype of the peak measurement."""

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, Dataset

from callbacks.throughput import Throughput, compute_dtype
from tests.test_module import module
from xm2.data.datamodule import TimedDataLoader

PEAK_FLOPS = 1e12


class Recorder(Logger):
    """Every ``log_metrics`` call, as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(step, metrics[key]) for step, metrics in self.logged if key in metrics]


class Batches(Dataset):
    """Random token batches of 2 rows × 17 tokens, each taking ``seconds`` to produce."""

    def __init__(self, count: int, seconds: float = 0.0) -> None:
        self.count, self.seconds = count, seconds

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        time.sleep(self.seconds)
        generator = torch.Generator().manual_seed(index)
        return {"tokens": torch.randint(0, 64, (2, 17), generator=generator)}


def fit_with_throughput(tmp_path, loader: DataLoader, steps: int, accumulate: int = 1,
                        log_every: int = 2, profiler=None) -> tuple[Recorder, Throughput]:
    recorder, throughput = Recorder(), Throughput(peak_flops=PEAK_FLOPS, window_size=2)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate,
                        log_every_n_steps=log_every, logger=recorder, callbacks=[throughput],
                        profiler=profiler, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(module(), train_dataloaders=loader)
    return recorder, throughput


def test_logs_on_the_optimizer_steps_lightning_logs_on(tmp_path):
    # 12 batches, 2 per optimizer step: the accumulating batches log nothing.
    recorder, _ = fit_with_throughput(tmp_path, TimedDataLoader(Batches(12), batch_size=None),
                                      steps=6, accumulate=2)
    assert [step for step, _ in recorder.history("throughput/step_time_s")] == [2, 4, 6]
    assert [step for step, _ in recorder.history("throughput/data_wait_share")] == [2, 4, 6]
    # Lightning's own throughput metrics come on the same batches (at its step count, one lower).
    assert [step for step, _ in recorder.history("train/device/items_per_sec")] == [1, 3, 5]


def test_data_wait_share_is_the_time_spent_producing_batches(tmp_path):
    # Each batch takes 50 ms to produce.
    slow = TimedDataLoader(Batches(8, seconds=0.05), batch_size=None)
    profiler = SimpleProfiler()
    recorder, _ = fit_with_throughput(tmp_path, slow, steps=8, profiler=profiler)
    shares = recorder.history("throughput/data_wait_share")
    step_times = dict(recorder.history("throughput/step_time_s"))
    assert shares and all(0 < share < 1 for _, share in shares)
    for step, share in shares:
        # The window's mean wait per batch: the 50 ms, plus at most scheduling delays.
        assert 0.05 <= share * step_times[step] < 0.09
    # The same time as Lightning's own profiler measures around each batch fetch of the loop.
    profiled = sum(sum(durations) for action, durations in profiler.recorded_durations.items()
                   if action.endswith("train_dataloader_next"))
    assert 8 * 0.05 <= slow.fetch_seconds <= profiled < slow.fetch_seconds + 0.01

    # A loader that does not count its fetches gets step times and no share.
    recorder, _ = fit_with_throughput(tmp_path, DataLoader(Batches(4), batch_size=None), steps=4)
    assert recorder.history("throughput/step_time_s")
    assert not recorder.history("throughput/data_wait_share")


@pytest.mark.parametrize(("precision", "dtype"), [
    ("32-true", torch.float32), ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16),
    ("16-mixed", torch.float16), ("64-true", torch.float64), ("transformer-engine", torch.float32),
])
def test_peak_is_measured_in_the_precision_settings_compute_dtype(precision, dtype):
    assert compute_dtype(precision) == dtype
