"""Plots of training and validation results (matplotlib, drawn off-screen).

Figures are built with ``matplotlib.figure.Figure`` directly, without pyplot: nothing here changes matplotlib's
global backend or state, and functions may run in worker threads. Only bundled fonts are used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from yolo.engine.results_csv import read
from yolo.metrics import smooth

__all__ = ["plot_ap_curves", "plot_confusion_matrix", "plot_mc_curve", "plot_pr_curve"]

MAX_LEGEND_CLASSES = 20  # per-class curves get legend entries up to this many classes


def _class_names(names, n):
    """``names`` (dict or sequence) as a list of ``n`` labels."""
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    names = list(names)
    return names if len(names) == n else [str(i) for i in range(n)]


def _save(fig, save_path, dpi=250):
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=dpi)
    return save_path


def _curve_axes(xlabel, ylabel, title):
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    return fig, ax


def plot_pr_curve(px, py, ap, save_path="PR_curve.png", names=(), dpi=250):
    """Precision-recall curves.

    Args:
        px: ``(k,)`` recall axis.
        py: ``(nc, k)`` precision per class at ``px`` (``APResult.pr_curve``).
        ap: ``(nc, t)`` AP per class (column 0 is AP@0.5).
        names: class names of the ``nc`` rows (dict or sequence); a legend entry per class when at most 20.
    """
    py, ap = np.asarray(py), np.asarray(ap)
    fig, ax = _curve_axes("Recall", "Precision", "Precision-Recall Curve")
    labels = _class_names(names, len(py))
    if 0 < len(py) <= MAX_LEGEND_CLASSES:
        for y, name, a in zip(py, labels, ap[:, 0]):
            ax.plot(px, y, linewidth=1, label=f"{name} {a:.3f}")
    elif len(py):
        ax.plot(px, py.T, linewidth=1, color="grey")
    if len(py):
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    return _save(fig, save_path, dpi)


def plot_mc_curve(px, py, save_path="mc_curve.png", names=(), xlabel="Confidence", ylabel="Metric", dpi=250):
    """A metric (F1, precision, recall) against confidence, per class and smoothed over all classes.

    Args:
        px: ``(k,)`` confidence axis.
        py: ``(nc, k)`` metric per class at ``px``.
    """
    py = np.asarray(py)
    fig, ax = _curve_axes(xlabel, ylabel, f"{ylabel}-Confidence Curve")
    labels = _class_names(names, len(py))
    if 0 < len(py) <= MAX_LEGEND_CLASSES:
        for y, name in zip(py, labels):
            ax.plot(px, y, linewidth=1, label=name)
    elif len(py):
        ax.plot(px, py.T, linewidth=1, color="grey")
    if len(py):
        y = smooth(py.mean(0), 0.05)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    return _save(fig, save_path, dpi)


def plot_ap_curves(result, save_dir, names=(), prefix="", dpi=250):
    """Write ``{prefix}PR_curve.png``, ``F1_curve.png``, ``P_curve.png`` and ``R_curve.png`` for an
    :class:`yolo.metrics.APResult`; ``names`` covers all classes (dict or sequence) and is narrowed to the scored
    ones. Returns the paths."""
    save_dir = Path(save_dir)
    if isinstance(names, dict):
        lookup = names
    else:
        lookup = dict(enumerate(names))
    scored = [lookup.get(int(c), str(int(c))) for c in result.classes]
    paths = [plot_pr_curve(result.px, result.pr_curve, result.ap, save_dir / f"{prefix}PR_curve.png", scored, dpi)]
    for curve, label, stem in ((result.f1_curve, "F1", "F1"), (result.p_curve, "Precision", "P"),
                               (result.r_curve, "Recall", "R")):
        path = save_dir / f"{prefix}{stem}_curve.png"
        paths.append(plot_mc_curve(result.px, curve, path, scored, ylabel=label, dpi=dpi))
    return paths


def plot_confusion_matrix(matrix, names=(), save_path="confusion_matrix.png", normalize=True, dpi=250):
    """Heat map of a ``(nc + 1, nc + 1)`` confusion matrix (rows predicted, columns true, last = background).

    With ``normalize`` each column (true class) is scaled to sum to 1. Cells below 0.005 are left blank; values are
    written into the cells when there are fewer than 30 classes.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    nc = matrix.shape[0] - 1
    array = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix.copy()
    array[array < 0.005] = np.nan

    fig = Figure(figsize=(12, 9), tight_layout=True)
    ax = fig.subplots()
    image = ax.imshow(array, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax)
    font = 8 if nc < 50 else 6
    if 0 < len(names) < 99 and len(names) == nc:
        ticks = [*_class_names(names, nc), "background"]
        ax.set_xticks(range(nc + 1), ticks, rotation=90, fontsize=font)
        ax.set_yticks(range(nc + 1), ticks, fontsize=font)
    if nc < 30:
        peak = np.nanmax(array) if np.isfinite(array).any() else 1.0
        for (i, j), v in np.ndenumerate(array):
            if np.isfinite(v):
                colour = "white" if v > 0.5 * peak else "black"
                ax.text(j, i, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center", fontsize=font,
                        color=colour)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight_layout may complain about long tick labels
        return _save(fig, save_path, dpi)


RESULTS_PANELS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
)


def plot_results(csv_path, save_path="results.png", dpi=200):
    """``results.png``: one panel per loss/metric column of ``results.csv`` against epoch (raw and smoothed)."""

    rows = read(csv_path)
    if not rows:
        return None
    epochs = np.array([r["epoch"] for r in rows])
    fig = Figure(figsize=(12, 6), tight_layout=True)
    axes = fig.subplots(2, 5).ravel()
    for ax, key in zip(axes, RESULTS_PANELS):
        y = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        ax.plot(epochs, y, marker=".", linewidth=2, markersize=8, label="results")
        if len(y) > 2:
            ax.plot(epochs, smooth(y, 0.1), ":", linewidth=2, label="smooth")
        ax.set_title(key, fontsize=12)
    axes[0].legend()
    return _save(fig, save_path, dpi)
