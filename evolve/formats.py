"""The upstream file formats of an evolution, regenerated from its finished generations.

``evolve.csv`` (upstream's header, every field right-aligned in 20 characters, values with 5 significant
digits), ``hyp_evolve.yaml`` (the best hyps after comment lines naming the best and last generation and the best
metrics) and ``evolve.png`` (one scatter per hyperparameter, value against fitness, the best marked).
:func:`read_evolve_csv` reads an ``evolve.csv`` written by upstream (padded) or by anyone else (plain).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evolve import mutation
from evolve.space import HYP_KEYS
from yolo.errors import UserError
from yolo.utils.files import atomic_write_text

log = logging.getLogger("yolo.evolve")

METRIC_KEYS: tuple[str, ...] = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                                "val/box_loss", "val/obj_loss", "val/cls_loss")
EXTRA_KEYS: tuple[str, ...] = ("epochs",)  # our columns after upstream's (upstream reads hyps by position, before)
FIELD_WIDTH = 20
CSV_NAME, YAML_NAME, PNG_NAME = "evolve.csv", "hyp_evolve.yaml", "evolve.png"


class EvolveCsvError(UserError, ValueError):
    """An evolve.csv that cannot be read as one (the message names the file and line)."""


@dataclass
class Row:
    """One finished generation: the 7 metrics of evolve.csv and the complete hyps."""

    metrics: tuple[float, ...]
    hyp: dict[str, Any]
    number: int = -1  # Optuna trial number (-1 for rows read from a file)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fitness(self) -> float:
        return float(mutation.fitness(self.metrics[:4])[0])


def format_evolve_csv(rows: Sequence[Row], columns: Sequence[str], extra: Sequence[str] = ()) -> str:
    """evolve.csv text as upstream writes it: every field right-aligned in 20 characters, values ``%.5g``; our
    ``extra`` columns (e.g. the epochs a generation trained, under asha) after upstream's."""
    keys = list(METRIC_KEYS) + list(columns) + list(extra)
    lines = [",".join(f"{k:>{FIELD_WIDTH}s}" for k in keys)]
    for r in rows:
        vals = list(r.metrics[: len(METRIC_KEYS)]) + [r.hyp.get(k) for k in columns] + [r.extra.get(k) for k in extra]
        lines.append(",".join(f"{_num(v):{FIELD_WIDTH}.5g}" for v in vals))
    return "\n".join(lines) + "\n"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def write_evolve_csv(path: str | os.PathLike, rows: Sequence[Row], columns: Sequence[str],
                     extra: Sequence[str] = ()) -> Path:
    path = Path(path)
    atomic_write_text(path, format_evolve_csv(rows, columns, extra))
    return path


def read_evolve_csv(path: str | os.PathLike) -> tuple[list[str], list[Row]]:
    """Read an evolve.csv (fields padded as upstream writes them, or plain). Returns (hyp columns, rows)."""
    path = Path(path)
    text = path.read_text()
    reader = csv.reader(io.StringIO(text))
    lines = [[f.strip() for f in line] for line in reader if any(f.strip() for f in line)]
    if not lines:
        raise EvolveCsvError(f"{path}: empty evolve.csv")
    header = lines[0]
    if tuple(header[: len(METRIC_KEYS)]) != METRIC_KEYS:
        raise EvolveCsvError(f"{path}: not an evolve.csv: the first columns must be {', '.join(METRIC_KEYS)}, "
                         f"got {', '.join(header[:len(METRIC_KEYS)])}")
    columns = header[len(METRIC_KEYS):]
    unknown = [c for c in columns if c not in HYP_KEYS and c not in EXTRA_KEYS]
    if unknown:
        log.warning(f"WARNING: {path}: ignoring unknown hyperparameter columns {unknown}")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise EvolveCsvError(f"{path}:{i}: {len(line)} fields, header has {len(header)}")
        try:
            vals = [float(x) for x in line]
        except ValueError:
            raise EvolveCsvError(f"{path}:{i}: non-numeric field in {line}") from None
        metrics = tuple(vals[: len(METRIC_KEYS)])
        hyp = {c: v for c, v in zip(columns, vals[len(METRIC_KEYS):]) if c in HYP_KEYS}
        extra = {c: int(v) for c, v in zip(columns, vals[len(METRIC_KEYS):])
                 if c in EXTRA_KEYS and math.isfinite(v) and 0 < v < 1e6}
        rows.append(Row(metrics, hyp, extra=extra))
    return [c for c in columns if c in HYP_KEYS], rows


def best_index(rows: Sequence[Row]) -> int:
    """Index of the best row by fitness as it reads from evolve.csv (first one on ties), among the rows that
    trained the most epochs when rows say how many (asha: a short rung's fitness is not comparable)."""
    f = mutation.fitness([[mutation.csv_value(m) for m in r.metrics[:4]] for r in rows])
    budgets = [r.extra.get("epochs") for r in rows]
    top = max((b for b in budgets if b is not None), default=None)
    if top is not None:
        f = np.where([b is None or b == top for b in budgets], f, -np.inf)
    return int(np.argmax(f))


def format_hyp_yaml(rows: Sequence[Row], title: str = "") -> str:
    """hyp_evolve.yaml: comment lines (best and last generation, 0-based rows of evolve.csv, and the best
    metrics), then the best generation's complete hyps in training-config order."""
    i = best_index(rows)
    best = rows[i]
    head = [
        f"# Hyperparameter evolution results{': ' + title if title else ''}",
        f"# Best generation: {i}",
        f"# Last generation: {len(rows) - 1}",
        "# " + ", ".join(f"{k:>{FIELD_WIDTH}s}" for k in METRIC_KEYS),
        "# " + ", ".join(f"{_num(v):>{FIELD_WIDTH}.5g}" for v in best.metrics[: len(METRIC_KEYS)]),
        f"# fitness = 0.1 * mAP_0.5 + 0.9 * mAP_0.5:0.95 = {best.fitness:.5g}",
    ]
    hyp = {k: (None if best.hyp.get(k) is None else float(best.hyp[k])) for k in HYP_KEYS if k in best.hyp}
    return "\n".join(head) + "\n\n" + yaml.safe_dump(hyp, sort_keys=False)


def write_hyp_yaml(path: str | os.PathLike, rows: Sequence[Row], title: str = "") -> Path:
    path = Path(path)
    atomic_write_text(path, format_hyp_yaml(rows, title))
    return path


def _density(x: np.ndarray, y: np.ndarray, bins: int = 20) -> np.ndarray:
    """How crowded each point's neighbourhood is (a 2-D histogram looked up per point), for colouring."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.ones(len(x))
    hist, xe, ye = np.histogram2d(x, y, bins=bins)
    xi = np.clip(np.digitize(x, xe) - 1, 0, hist.shape[0] - 1)
    yi = np.clip(np.digitize(y, ye) - 1, 0, hist.shape[1] - 1)
    return np.log1p(hist[xi, yi])


def plot_evolve(path: str | os.PathLike, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    """evolve.png: for each hyperparameter a scatter of value against fitness, the best generation marked '+'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fit = np.array([r.fitness for r in rows])
    j = best_index(rows)
    ncols = 5
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig = Figure(figsize=(10, 2 * nrows))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.04, top=0.96, wspace=0.12, hspace=0.5)
    for i, k in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        v = np.array([_num(r.hyp.get(k)) for r in rows])
        ax.scatter(v, fit, c=_density(v, fit), cmap="viridis", alpha=0.8, edgecolors="none", s=12)
        ax.plot(v[j], fit[j], "k+", markersize=15)
        ax.set_title(f"{k} = {v[j]:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        if i % ncols:
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("fitness", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def export_outputs(rows: Sequence[Row], out_dir: str | os.PathLike, columns: Sequence[str], *, plot: bool = True,
                   title: str = "", extra: Sequence[str] = ()) -> dict[str, Path]:
    """Write evolve.csv, hyp_evolve.yaml and (with ``plot``) evolve.png for ``rows``; nothing without rows."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    if not rows:
        return paths
    paths["csv"] = write_evolve_csv(out_dir / CSV_NAME, rows, columns, extra)
    paths["yaml"] = write_hyp_yaml(out_dir / YAML_NAME, rows, title)
    if plot:
        try:
            paths["png"] = plot_evolve(out_dir / PNG_NAME, rows, columns)
        except Exception as e:  # a plot must never lose an evolution
            log.warning(f"WARNING: evolve.png not written: {e}")
    return paths
