"""Report plots: training curves, Dice histograms, worst-case crops (PNG, dpi 100).

matplotlib is imported inside the functions only, and figures are drawn on a ``matplotlib.figure.Figure``
with the Agg canvas attached explicitly: nothing touches pyplot's global figure registry or the process's
selected backend, so plotting works headless, never opens a window, and leaks no figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sam_core.errors import InvalidInput

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from sam_core.data.samples import Sample
    from sam_core.evaluation.evaluate import EvalReport, WorstCase

DPI = 100
GT_COLOR = "lime"
PRED_COLOR = "red"
_CELL_INCHES = 2.6


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure on the Agg canvas (``width`` x ``height`` inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG and release its artists."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        fig.clear()
    return out


# --------------------------------------------------------------------------------------------------
# training curves


def _series(history: Mapping[str, Sequence[float]], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long 1-D float arrays from ``history`` (missing keys -> empty)."""
    x = np.asarray(history.get(x_key, []), dtype=np.float64).reshape(-1)
    y = np.asarray(history.get(y_key, []), dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InvalidInput(f"{x_key} has {x.size} values but {y_key} has {y.size}", field=f"history.{y_key}")
    return x, y


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """(N,) -> (N - window + 1,) running mean."""
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def _draw_loss(ax: Axes, steps: np.ndarray, loss: np.ndarray) -> None:
    ax.plot(steps, loss, color="tab:blue", alpha=0.5 if loss.size > 20 else 1.0, lw=1, label="loss")
    if loss.size > 20:
        window = max(5, loss.size // 20)
        ax.plot(steps[window - 1:], _moving_average(loss, window), color="tab:blue", lw=2,
                label=f"mean of {window}")
        ax.legend(fontsize=8)
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)


def _draw_val(ax: Axes, steps: np.ndarray, dice: np.ndarray) -> None:
    if dice.size:
        ax.plot(steps, dice, marker="o", color="tab:green", lw=1.5)
        best = int(np.nanargmax(dice)) if np.isfinite(dice).any() else 0
        ax.set_title(f"validation Dice (best {dice[best]:.3f} @ step {steps[best]:g})")
    else:
        ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("validation Dice")
    ax.set(xlabel="step", ylabel="Dice", ylim=(0.0, 1.0))
    ax.grid(alpha=0.3)


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Two panels: training loss vs "step", validation Dice ("val_dice") vs "val_step" (optional)."""
    steps, loss = _series(history, "step", "loss")
    val_steps, val_dice = _series(history, "val_step", "val_dice")
    fig = _new_figure(10, 3.8)
    ax_loss, ax_val = fig.subplots(1, 2)
    _draw_loss(ax_loss, steps, loss)
    _draw_val(ax_val, val_steps, val_dice)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Dice histogram


def plot_dice_histogram(reports: Sequence[EvalReport], path: str | Path, *, bins: int = 20) -> Path:
    """Overlaid per-instance Dice histograms (``bins`` bins over [0, 1]); legend with mean and count."""
    fig = _new_figure(6.4, 4.0)
    ax = fig.subplots()
    edges: list[float] = np.linspace(0.0, 1.0, bins + 1).tolist()
    for i, report in enumerate(reports):
        dice = np.clip(np.array([s.dice for s in report.scores], dtype=np.float64), 0.0, 1.0)
        mean = float(dice.mean()) if dice.size else math.nan
        color = f"C{i % 10}"
        name = f"{report.label} (mean {mean:.3f}, n={dice.size})"
        ax.hist(dice, bins=edges, histtype="stepfilled", alpha=0.35, color=color, label=name)
        ax.hist(dice, bins=edges, histtype="step", lw=1.5, color=color)
        if dice.size:
            ax.axvline(mean, color=color, ls="--", lw=1)
    ax.set(xlim=(0.0, 1.0), xlabel="Dice per instance", ylabel="instances", title="Dice distribution")
    if reports:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# worst cases


def crop_box(pred: np.ndarray, gt: np.ndarray, *, margin_frac: float = 0.5,
             min_margin: int = 8) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) crop around the union of two H x W masks, margin = max(min_margin, frac * side).

    Both masks empty -> the whole image.
    """
    both = np.asarray(pred, dtype=bool) | np.asarray(gt, dtype=bool)
    h, w = both.shape
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    if rows.size == 0:
        return 0, h, 0, w
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    m = max(min_margin, int(round(margin_frac * side)))
    return max(0, rows[0] - m), min(h, rows[-1] + 1 + m), max(0, cols[0] - m), min(w, cols[-1] + 1 + m)


def _contour(ax: Axes, mask: np.ndarray, color: str) -> None:
    """Outline of an h x w mask; padded so objects touching the crop border get closed contours."""
    if not mask.any():
        return
    padded = np.pad(mask.astype(np.float32), 1)
    h, w = padded.shape
    ax.contour(np.arange(-1, w - 1), np.arange(-1, h - 1), padded, levels=[0.5], colors=color, linewidths=1.2)


def _image_lookup(dataset: Sequence[Sample] | None) -> Callable[[str], np.ndarray | None]:
    """image_id -> H x W x 3 uint8 (or None without a data set); each image decoded at most once."""
    cache: dict[str, np.ndarray | None] = {}

    def get(image_id: str) -> np.ndarray | None:
        if dataset is None:
            return None
        if image_id not in cache:
            if hasattr(dataset, "get"):
                sample = dataset.get(image_id)
            else:
                sample = next((s for s in dataset if s.image_id == image_id), None)
            cache[image_id] = None if sample is None else sample.load_image()
        return cache[image_id]

    return get


def _draw_case(ax: Axes, case: WorstCase, image: np.ndarray | None) -> None:
    y0, y1, x0, x1 = crop_box(case.pred, case.gt)
    if image is not None:
        ax.imshow(image[y0:y1, x0:x1], interpolation="nearest")
    else:
        ax.imshow(np.zeros((y1 - y0, x1 - x0)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _contour(ax, np.asarray(case.gt[y0:y1, x0:x1], dtype=bool), GT_COLOR)
    _contour(ax, np.asarray(case.pred[y0:y1, x0:x1], dtype=bool), PRED_COLOR)
    ax.set_xlim(-0.5, x1 - x0 - 0.5)
    ax.set_ylim(y1 - y0 - 0.5, -0.5)
    ax.set_title(f"{case.image_id} #{case.instance_id}\nDice {case.dice:.3f}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_worst_cases(report: EvalReport, dataset: Sequence[Sample] | None, path: str | Path, *,
                     max_cases: int = 8) -> Path:
    """Grid of crops around the report's worst cases: GT outline green, prediction red.

    ``dataset`` provides the images (``None``: masks on black). Crops cover the union bbox of GT and
    prediction plus a margin, so tiny objects stay visible.
    """
    cases = report.worst[:max(max_cases, 0)]
    ncols = min(4, max(len(cases), 1))
    nrows = max(1, math.ceil(len(cases) / ncols))
    fig = _new_figure(_CELL_INCHES * ncols, _CELL_INCHES * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image_of = _image_lookup(dataset)
    for ax, case in zip(axes, cases, strict=False):
        _draw_case(ax, case, image_of(case.image_id))
    for ax in axes[len(cases):]:
        ax.axis("off")
    if not cases:
        axes[0].text(0.5, 0.5, "no cases", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(f"{report.label}: worst {len(cases)} by Dice (green GT, red prediction)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
