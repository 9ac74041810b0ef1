"""The test-time context scaling law: loss against token position, and L(t) = a·t^(−b) + c.

``per_position_loss`` averages the next-token loss at each position t = 1…T over many full-context
windows of long held-out text (position t predicts token t+1 after seeing t tokens).
``fit_power_law`` fits L(t) = a·t^(−b) + c on positions binned on a log grid, so that the many
large-t positions do not outweigh the few small ones, weighting each bin by its standard error.
It starts from the best b of a profile fit (for fixed b the model is linear in a and c), refines
with ``scipy.optimize.curve_fit``, and reports standard errors, R² (of the binned curve), the
RMSE and the error of the fit on the first quarter of positions when extrapolated to the rest.
A flat or noisy curve gives a :class:`PowerLawFitWarning` and a result that says so, never an
exception.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xm2.errors import ConfigError, DataError, MissingFileError


class PowerLawFitWarning(UserWarning):
    """The power-law fit of L(t) is not trustworthy (flat or noisy curve, unidentified terms)."""


# ---------------------------------------------------------------------------------------------
# Long text into windows, and the loss at each position.


def text_windows(token_streams: list[list[int]], window: int, max_windows: int | None = None,
                 boundary_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``window + 1`` tokens cut from inside each stream.

    A window never crosses from one document into another, so position t really has t tokens of
    its own document before it. With ``boundary_id``, each window starts with that token (the
    document boundary that opens every training document), so position 1 is the first text token.
    """
    if window < 2:
        raise ConfigError(f"window={window} must be >= 2 tokens")
    body = window if boundary_id is not None else window + 1
    rows = []
    for stream in token_streams:
        for start in range(0, len(stream) - body + 1, body):
            chunk = stream[start:start + body]
            rows.append(([boundary_id] if boundary_id is not None else []) + list(chunk))
    if max_windows is not None and len(rows) > max_windows:
        # Evenly spread over all the text: windows of one document are alike, so taking the
        # first ones would average over few documents.
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, max_windows).round().astype(int)]
    if not rows:
        longest = max((len(s) for s in token_streams), default=0)
        raise ConfigError(f"no text is long enough for a window of {window + 1} tokens (the "
                          f"longest document has {longest}); give longer documents or a smaller "
                          "window")
    return torch.tensor(rows, dtype=torch.long)


def read_text_documents(path: str | Path) -> list[str]:
    """A user's text file as documents: the whole file is one long document (e.g. wiki.test.raw)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"context-law text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"context-law text file {path} is empty")
    return [text]


@torch.no_grad()
def per_position_loss(model: torch.nn.Module, windows: torch.Tensor,
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token loss at each position 1…T over the windows, and its standard error.

    ``windows`` is (N, T+1); the loss at position t is that of predicting token t+1 (0-based t).
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T+1) with T >= 1, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size].to(device)
        logits = model(chunk[:, :-1]).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").cpu())
    per_window = torch.cat(losses).double().numpy()
    mean = per_window.mean(axis=0)
    sem = (per_window.std(axis=0, ddof=1) / math.sqrt(len(per_window)) if len(per_window) > 1
           else np.full_like(mean, np.nan))
    return mean, sem


# ---------------------------------------------------------------------------------------------
# The power-law fit.


def power_law(t, a, b, c):
    return a * np.power(t, -b) + c


def log_bin(t: np.ndarray, values: np.ndarray, n_bins: int = 40,
            sem: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric-mean position, mean value and standard error of the mean per log-spaced bin."""
    t, values = np.asarray(t, float), np.asarray(values, float)
    edges = np.unique(np.floor(np.geomspace(t.min(), t.max() + 1, n_bins + 1)))
    centres, means, errors = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (t >= lo) & (t < hi)
        if not inside.any():
            continue
        centres.append(float(np.exp(np.mean(np.log(t[inside])))))
        means.append(float(values[inside].mean()))
        if sem is not None:
            # Mean of n positions: the errors of neighbours are correlated, so do not shrink by √n.
            errors.append(float(np.sqrt(np.mean(np.asarray(sem)[inside] ** 2))))
        else:
            errors.append(float(values[inside].std(ddof=1) / math.sqrt(inside.sum()))
                          if inside.sum() > 1 else np.nan)
    errors = np.array(errors)
    finite = errors[np.isfinite(errors) & (errors > 0)]
    # A bin of one position has no spread of its own: give it the smallest error seen.
    fill = finite.min() if finite.size else 1.0
    errors = np.where(np.isfinite(errors) & (errors > 0), errors, fill)
    return np.array(centres), np.array(means), errors


def _profile_fit(t, y, weights, b_grid):
    """For each b, the weighted least-squares a, c; returns the best (a, b, c, residual)."""
    best = None
    for b in b_grid:
        x = np.stack([np.power(t, -b), np.ones_like(t)], axis=1) * weights[:, None]
        (a, c), *_ = np.linalg.lstsq(x, y * weights, rcond=None)
        residual = float(np.sum((x @ np.array([a, c]) - y * weights) ** 2))
        if best is None or residual < best[3]:
            best = (float(a), float(b), float(c), residual)
    return best


def _fit(t, y, sigma):
    """(a, b, c) and their covariance; profile over b for the start, curve_fit to refine."""
    from scipy.optimize import curve_fit

    weights = 1.0 / sigma
    a0, b0, c0, _ = _profile_fit(t, y, weights, np.linspace(0.01, 3.0, 300))
    upper_c = float(y.min())
    start = (max(a0, 1e-6), min(max(b0, 1e-3), 2.999), min(max(c0, 0.0), upper_c * (1 - 1e-9)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's own covariance warning; judged below instead
        popt, pcov = curve_fit(power_law, t, y, p0=start, sigma=sigma, absolute_sigma=True,
                               bounds=([0.0, 0.0, 0.0], [np.inf, 3.0, upper_c]),
                               x_scale="jac", max_nfev=10000)
    return popt, pcov


@dataclass
class PowerLawFit:
    """L(t) = a·t^(−b) + c with standard errors and checks; NaN where a fit was not possible."""

    a: float
    b: float
    c: float
    a_se: float
    b_se: float
    c_se: float
    r2: float
    rmse: float
    extrapolation_error: float
    """Mean |relative error| on the last three quarters of positions of the fit made on the first
    quarter alone."""
    positions: int
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k not in ("warnings", "positions")}

    def predict(self, t) -> np.ndarray:
        return power_law(np.asarray(t, float), self.a, self.b, self.c)


NAN_FIT = dict(a=math.nan, b=math.nan, c=math.nan, a_se=math.nan, b_se=math.nan, c_se=math.nan,
               r2=math.nan, rmse=math.nan, extrapolation_error=math.nan)


def fit_power_law(loss: np.ndarray, sem: np.ndarray | None = None, n_bins: int = 40,
                  min_relative_drop: float = 0.02) -> PowerLawFit:
    """Fit L(t) = a·t^(−b) + c to ``loss[t-1]``, t = 1…T, on log-binned positions.

    Warns (:class:`PowerLawFitWarning`) and says why in ``warnings`` when the curve drops by less
    than ``min_relative_drop`` of its level from the first to the last bins, when a parameter is
    not identified (infinite or larger-than-itself standard error), when the fit explains little
    (R² < 0.5) or when it fails.
    """
    loss = np.asarray(loss, dtype=float)
    if loss.ndim != 1 or loss.size < 8:
        raise ValueError(f"loss must be a 1-D curve of at least 8 positions, got shape {loss.shape}")
    if not np.all(np.isfinite(loss)):
        raise ValueError("loss holds non-finite values")
    t = np.arange(1, loss.size + 1, dtype=float)
    tb, yb, sb = log_bin(t, loss, n_bins, sem)
    problems: list[str] = []
    head, tail = yb[: max(1, len(yb) // 5)].mean(), yb[-max(1, len(yb) // 5):].mean()
    drop = (head - tail) / max(abs(tail), 1e-12)
    if drop < min_relative_drop:
        problems.append(f"the curve is flat: the loss drops by {100 * drop:.1f}% from the first to "
                        f"the last positions (< {100 * min_relative_drop:.0f}%), so b and c are not "
                        "identified")
    try:
        popt, pcov = _fit(tb, yb, sb)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:
        problems.append(f"the fit failed: {error}")
        return _warned(PowerLawFit(**NAN_FIT, positions=loss.size, warnings=problems))
    se = np.sqrt(np.clip(np.diag(pcov), 0, None)) if np.all(np.isfinite(pcov)) else np.full(3, np.inf)
    predicted = power_law(tb, *popt)
    ss_res = float(np.sum((yb - predicted) ** 2))
    ss_tot = float(np.sum((yb - yb.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    rmse = math.sqrt(ss_res / len(yb))
    for name, value, error in zip("abc", popt, se, strict=True):
        if not np.isfinite(error) or (error > abs(value) and name != "c"):
            problems.append(f"{name} is not identified: {name} = {value:.4g} ± {error:.3g}")
    if np.isfinite(r2) and r2 < 0.5 and not any("flat" in p for p in problems):
        problems.append(f"the fit explains little of the curve (R² = {r2:.2f}): the curve is noisy")
    extrapolation = _extrapolation_error(t, loss, sem, n_bins)
    fit = PowerLawFit(float(popt[0]), float(popt[1]), float(popt[2]), float(se[0]), float(se[1]),
                      float(se[2]), r2, rmse, extrapolation, loss.size, problems)
    return _warned(fit)


def _extrapolation_error(t, loss, sem, n_bins) -> float:
    quarter = max(8, len(t) // 4)
    if quarter >= len(t):
        return math.nan
    tb, yb, sb = log_bin(t[:quarter], loss[:quarter], max(4, n_bins // 2),
                         None if sem is None else sem[:quarter])
    try:
        popt, _ = _fit(tb, yb, sb)
    except (RuntimeError, ValueError, np.linalg.LinAlgError):
        return math.nan
    rest = slice(quarter, None)
    return float(np.mean(np.abs(power_law(t[rest], *popt) - loss[rest]) / np.abs(loss[rest])))


def _warned(fit: PowerLawFit) -> PowerLawFit:
    for problem in fit.warnings:
        warnings.warn(f"power-law fit of L(t): {problem}", PowerLawFitWarning, stacklevel=3)
    return fit


def plot_context_law(loss: np.ndarray, fit: PowerLawFit, title: str = "", ax=None,
                     label: str = "L(t)"):
    """L(t) and its fit on log-log axes, with the fit's parameters in the legend."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4.5))
    else:
        fig = ax.figure
    t = np.arange(1, len(loss) + 1)
    ax.plot(t, loss, color="0.6", lw=0.8, label=label)
    tb, yb, _ = log_bin(t, np.asarray(loss), 40)
    ax.plot(tb, yb, "o", ms=3, color="black", label="log-binned")
    if np.isfinite(fit.a):
        ax.plot(t, fit.predict(t), color="tab:red",
                label=f"{fit.a:.3g}·t^(−{fit.b:.3g}) + {fit.c:.3g}  (R² {fit.r2:.3f})")
    ax.set(xscale="log", yscale="log", xlabel="token position t", ylabel="loss",
           title=title + ("\nwarning: " + fit.warnings[0][:80] if fit.warnings else ""))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return fig
