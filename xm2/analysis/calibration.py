"""Calibration of top-label confidences: reliability bins, ECE, MCE and the Brier score.

Bins are equal-width over [0, 1] and left-closed, ``[lo, hi)``, as in torchmetrics, except that
the last bin is closed on both sides so that a confidence of exactly 1.0 is counted (torchmetrics
puts it in a hidden extra bin). ECE is the count-weighted mean of |accuracy − confidence| over the
bins, MCE the largest gap over the non-empty bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xm2.errors import ConfigError


@dataclass
class ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy (NaN where a bin is empty)."""

    edges: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray

    def rows(self) -> list[dict]:
        """The bin table: one row per bin."""
        return [{"bin_lo": float(self.edges[i]), "bin_hi": float(self.edges[i + 1]),
                 "count": int(self.count[i]),
                 "mean_confidence": None if np.isnan(self.mean_confidence[i]) else float(self.mean_confidence[i]),
                 "accuracy": None if np.isnan(self.accuracy[i]) else float(self.accuracy[i])}
                for i in range(len(self.count))]


def reliability_bins(confidence, correct, n_bins: int = 10) -> ReliabilityBins:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if n_bins < 1:
        raise ConfigError(f"n_bins={n_bins} must be >= 1")
    if confidence.shape != correct.shape or confidence.ndim != 1 or confidence.size == 0:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be two "
                         "non-empty 1-D arrays of the same length")
    if np.any((confidence < 0) | (confidence > 1)) or np.any(np.isnan(confidence)):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # [lo, hi) bins, with 1.0 kept in the last one.
    index = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    return ReliabilityBins(edges, count.astype(int), mean_confidence, accuracy)


def expected_calibration_error(bins: ReliabilityBins) -> float:
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.mean_confidence[filled])
    return float(np.sum(bins.count[filled] * gaps) / bins.count.sum())


def maximum_calibration_error(bins: ReliabilityBins) -> float:
    filled = bins.count > 0
    return float(np.max(np.abs(bins.accuracy[filled] - bins.mean_confidence[filled])))


def brier_score(probabilities: list[np.ndarray], gold) -> float:
    """Mean over items of Σ_k (p_k − [k = gold])²; items may have different numbers of options."""
    total = 0.0
    for p, g in zip(probabilities, gold, strict=True):
        target = np.zeros(len(p))
        target[int(g)] = 1.0
        total += float(np.sum((np.asarray(p) - target) ** 2))
    return total / len(probabilities)


@dataclass
class CalibrationReport:
    accuracy: float
    ece: float
    mce: float
    brier: float
    items: int
    chance: float
    bins: ReliabilityBins

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "ece": self.ece, "mce": self.mce, "brier": self.brier,
                "chance": self.chance}

    def to_dict(self) -> dict:
        return {**self.metrics(), "items": self.items, "bins": self.bins.rows()}


def calibration_report(probabilities: list[np.ndarray], gold, n_bins: int = 10) -> CalibrationReport:
    """Accuracy, ECE, MCE, Brier score and the bins of top-label confidences."""
    gold = np.asarray(gold)
    predicted = np.array([int(np.argmax(p)) for p in probabilities])
    confidence = np.array([float(np.max(p)) for p in probabilities])
    correct = predicted == gold
    bins = reliability_bins(confidence, correct, n_bins)
    return CalibrationReport(
        accuracy=float(correct.mean()), ece=expected_calibration_error(bins),
        mce=maximum_calibration_error(bins), brier=brier_score(probabilities, gold),
        items=len(probabilities), chance=float(np.mean([1 / len(p) for p in probabilities])),
        bins=bins)


def plot_reliability(report: CalibrationReport, title: str = "", ax=None):
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 5))
    else:
        fig = ax.figure
    bins = report.bins
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.count > 0
    accuracy, confidence = bins.accuracy[filled], bins.mean_confidence[filled]
    ax.bar(centres[filled], accuracy, width=width * 0.9, color="tab:blue", edgecolor="black",
           alpha=0.8, label="accuracy")
    # The gap of each bin, from its accuracy to its mean confidence, outlined in red.
    ax.bar(centres[filled], np.abs(confidence - accuracy), bottom=np.minimum(confidence, accuracy),
           width=width * 0.9, facecolor="none", edgecolor="tab:red", hatch="//",
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.axhline(report.chance, ls=":", color="black", lw=0.8, label=f"chance {report.chance:.2f}")
    for x, n in zip(centres[filled], bins.count[filled], strict=True):
        ax.text(x, 1.02, str(n), ha="center", va="bottom", fontsize=7)
    ax.text(0.01, 1.08, "items per bin", fontsize=7, va="bottom")
    ax.set(xlim=(0, 1), ylim=(0, 1.15), xlabel="confidence", ylabel="accuracy",
           title=(title + "\n" if title else "")
           + f"acc {report.accuracy:.3f}  ECE {report.ece:.3f}  MCE {report.mce:.3f}  "
             f"Brier {report.brier:.3f}  (n={report.items})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.87))
    return fig
