"""Matplotlib figures for the recipes: one reconstruction, a cross-model comparison, training curves, and
means with error bars (e.g. test PSNR vs training-set size over seeds).

Images are magnitudes in the data's units, shown on one grey scale per slice (0 .. the target's max);
error maps are |output − target| on a shared scale (a fraction of the target's max, printed on the figure) so
models can be compared by eye. Everything is written with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["comparison_figure", "curves_figure", "errorbar_figure", "reconstruction_figure"]

ERROR_FRACTION = 0.25  # error maps span 0 .. 25% of the target's max


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _show(ax: plt.Axes, image: np.ndarray, vmax: float, title: str, cmap: str = "gray") -> None:
    ax.imshow(np.asarray(image), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_figure(
    path: str | os.PathLike,
    zero_filled: np.ndarray,
    output: np.ndarray,
    target: np.ndarray,
    *,
    title: str = "",
    labels: Mapping[str, str] | None = None,
) -> None:
    """Zero-filled | output | target | error map of one slice ((H, W) magnitudes) to a PNG."""
    labels = dict(labels or {})
    vmax = float(np.max(target)) or 1.0
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    _show(axes[0], zero_filled, vmax, labels.get("zero_filled", "zero-filled"))
    _show(axes[1], output, vmax, labels.get("output", "output"))
    _show(axes[2], target, vmax, "target")
    _show(axes[3], np.abs(np.asarray(output) - np.asarray(target)), ERROR_FRACTION * vmax,
          f"|output - target| (0..{ERROR_FRACTION:.0%} of max)", cmap="magma")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def comparison_figure(
    path: str | os.PathLike,
    slices: Sequence[Mapping[str, np.ndarray]],
    *,
    row_titles: Sequence[str] | None = None,
    title: str = "",
) -> None:
    """Reconstructions and error maps of several models on the same slices.

    ``slices``: one mapping per slice, ``{"target": ..., "zero-filled": ..., "<model>": ..., ...}`` of (H, W)
    magnitudes (the same keys, in the same order, for every slice). Each slice gets an image row and an
    error-map row; columns are the target, then every other key.
    """
    if not slices:
        raise ValueError("comparison_figure needs at least one slice")
    keys = [k for k in slices[0] if k != "target"]
    cols = 1 + len(keys)
    fig, axes = plt.subplots(2 * len(slices), cols, figsize=(1.9 * cols, 2.0 * 2 * len(slices)), squeeze=False)
    for s, images in enumerate(slices):
        target = np.asarray(images["target"])
        vmax = float(target.max()) or 1.0
        name = row_titles[s] if row_titles else f"slice {s}"
        _show(axes[2 * s, 0], target, vmax, f"target\n{name}")
        axes[2 * s + 1, 0].axis("off")
        axes[2 * s + 1, 0].text(0.5, 0.5, f"error maps\n0..{ERROR_FRACTION:.0%} of max", ha="center",
                                va="center", fontsize=8, transform=axes[2 * s + 1, 0].transAxes)
        for c, key in enumerate(keys, start=1):
            image = np.asarray(images[key])
            _show(axes[2 * s, c], image, vmax, key)
            _show(axes[2 * s + 1, c], np.abs(image - target), ERROR_FRACTION * vmax, "", cmap="magma")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _finish_panel(ax: plt.Axes, references: Mapping[str, float], xlabel: str, ylabel: str) -> None:
    """Horizontal reference lines ``{label: y}``, axis labels, grid and legend of one panel."""
    for label, y in references.items():
        ax.axhline(y, color="grey", linestyle=":", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _finish_figure(fig: plt.Figure, title: str, path: str | os.PathLike) -> None:
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def curves_figure(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    xlabel: str = "training step",
    title: str = "",
    styles: Mapping[str, str] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """One panel per entry of ``panels`` (its key is the y label), one line per ``label -> (x, y)``.

    ``styles`` optionally maps a label to a matplotlib format string (e.g. dashed for Kronecker models);
    ``references`` maps a panel key to horizontal reference lines ``{label: y}`` (e.g. the zero-filled value).
    """
    if not panels:
        raise ValueError("curves_figure needs at least one panel")
    styles = dict(styles or {})
    references = dict(references or {})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items()):
        for label, (x, y) in lines.items():
            pts = [(a, b) for a, b in zip(x, y) if b is not None and np.isfinite(b)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles.get(label, "-o"), label=label, markersize=3)
        _finish_panel(ax, references.get(ylabel, {}), xlabel, ylabel)
    _finish_figure(fig, title, path)


def errorbar_figure(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float | None]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    styles: Mapping[str, str] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
    xticks: Sequence[float] | None = None,
    xscale: str = "linear",
) -> None:
    """One panel per entry of ``panels`` (its key is the panel's title), one line per ``label -> (x, mean, std)``
    with ±std error bars (a ``None`` std draws the point without a bar).

    ``styles`` optionally maps a label to a matplotlib format string; ``references`` maps a panel title to
    horizontal reference lines ``{label: y}``; ``xticks`` marks the x values (e.g. the training fractions).
    """
    if not panels:
        raise ValueError("errorbar_figure needs at least one panel")
    styles = dict(styles or {})
    references = dict(references or {})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, (x, mean, std) in lines.items():
            if not (len(x) == len(mean) == len(std)):
                raise ValueError(f"{panel} / {label}: x, mean and std differ in length ({len(x)}, {len(mean)}, "
                                 f"{len(std)})")
            bars = None if all(s is None for s in std) else [0.0 if s is None else s for s in std]
            ax.errorbar(x, mean, yerr=bars, fmt=styles.get(label, "-o"), label=label, markersize=4, capsize=3)
        ax.set_xscale(xscale)
        if xticks is not None:
            ax.set_xticks(list(xticks))
            ax.set_xticklabels([f"{t:g}" for t in xticks])
        ax.set_title(panel, fontsize=9)
        _finish_panel(ax, references.get(panel, {}), xlabel, ylabel)
    _finish_figure(fig, title, path)
