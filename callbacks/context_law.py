"""The test-time context scaling law L(t) = a·t^(−b) + c during ``fit`` and under ``validate``."""

from __future__ import annotations

import time
import warnings

import numpy as np

from callbacks.calibration import AnalysisSchedule
from xm2.analysis.context_law import (
    PowerLawFitWarning,
    fit_power_law,
    per_position_loss,
    plot_context_law,
    read_text_documents,
    text_windows,
)
from xm2.data.corpus import read_documents
from xm2.data.tokenizer import load_tokenizer
from xm2.errors import ConfigError
from xm2.tracking.record import record_csv, record_figure, record_json, record_metrics


class ContextLaw(AnalysisSchedule):
    """Mean loss at each position of full-context windows of long held-out text, and its fit.

    Logs ``context_law/{a,b,c,a_se,b_se,c_se,r2,rmse,extrapolation_error,loss_first,loss_last,
    fit_ok,seconds}`` at the global step, and the artefacts ``context_law/step<step>.png`` (L(t)
    and the fit, log-log) and ``.csv`` (t, loss, its standard error, the fit) and ``.json`` (the
    fit and its warnings). A flat or noisy curve logs fit_ok 0 and a warning, never an error.
    """

    def __init__(
        self,
        text_file: str | None = None,
        source: str = "prose",
        max_windows: int = 32,
        n_bins: int = 40,
        batch_size: int = 8,
        every_n_steps: int | None = None,
        at_decay_start: bool = True,
        at_end: bool = True,
    ) -> None:
        """
        Args:
            text_file: A long text of your own (e.g. Wikitext-2's wiki.test.raw), read as one
                document; null: the held-out split of a bundled corpus source.
            source: Corpus source whose held-out documents are cut into windows (prose holds
                the longest ones).
            max_windows: Windows of max_seq_len tokens to average over.
            n_bins: Log-spaced position bins of the fit.
            batch_size: Windows per forward pass.
            every_n_steps: Also run every N optimizer steps (null: never).
            at_decay_start: Run at the decay start (the end of the stable phase).
            at_end: Run after the last step.
        """
        super().__init__(every_n_steps, at_decay_start, at_end)
        if max_windows < 2 or n_bins < 4 or batch_size < 1:
            raise ConfigError(f"context law max_windows={max_windows} must be >= 2, "
                              f"n_bins={n_bins} >= 4 and batch_size={batch_size} >= 1")
        self.text_file, self.source = text_file, source
        self.max_windows, self.n_bins, self.batch_size = max_windows, n_bins, batch_size
        self._windows = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.text_file is not None:
            read_text_documents(self.text_file)  # a missing or empty file fails at the start

    def windows(self, trainer, pl_module):
        if self._windows is None:
            tokenizer = load_tokenizer(trainer.datamodule.tokenizer_path)
            if self.text_file is not None:
                documents = read_text_documents(self.text_file)
            else:
                documents = list(read_documents(trainer.datamodule.hparams.corpus_dir,
                                                self.source, "val"))
            streams = tokenizer.encode(documents)
            # Plain text, no end-of-text token in front: most windows start mid-document, and
            # position t then has exactly t tokens of its own text as context.
            self._windows = text_windows(streams, pl_module.model.config.max_seq_len,
                                         self.max_windows)
        return self._windows

    def analyse(self, trainer, pl_module, step: int) -> None:
        started = time.perf_counter()
        windows = self.windows(trainer, pl_module)
        loss, sem = per_position_loss(pl_module.model, windows, self.batch_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PowerLawFitWarning)
            fit = fit_power_law(loss, sem, self.n_bins)
        for warning in caught:
            # Said once, with the step, instead of Python's once-per-location default.
            print(f"xm2 context law at step {step}: {warning.message}")
        metrics = {f"context_law/{k}": v for k, v in fit.metrics().items() if np.isfinite(v)}
        metrics |= {"context_law/loss_first": float(loss[0]), "context_law/loss_last": float(loss[-1]),
                    "context_law/fit_ok": float(fit.ok),
                    "context_law/seconds": time.perf_counter() - started}
        record_metrics(trainer, metrics, step)
        if not trainer.is_global_zero:
            return
        t = np.arange(1, len(loss) + 1)
        fitted = fit.predict(t)
        rows = [{"t": int(i), "loss": float(v), "sem": float(s), "fit": float(f)}
                for i, v, s, f in zip(t, loss, sem, fitted, strict=True)]
        source = self.text_file or f"{self.source} (held-out split)"
        record_csv(trainer, rows, f"context_law/step{step:06d}.csv")
        record_json(trainer, {"step": step, "text": source, "windows": len(windows),
                              **fit.metrics(), "warnings": fit.warnings},
                    f"context_law/step{step:06d}.json")
        record_figure(trainer, plot_context_law(
            loss, fit, f"L(t) on {source}, {len(windows)} windows, step {step}"),
            f"context_law/step{step:06d}.png")
