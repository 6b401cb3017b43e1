"""``results.csv``: one row per epoch, upstream's columns and padding, safe to resume."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

COLUMNS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)


def append_row(path: Path, epoch: int, values: Mapping[str, float]) -> None:
    """Append epoch ``epoch``'s values (keys from ``COLUMNS``), writing the header for a new file."""
    path = Path(path)
    lines = []
    if not path.exists():
        lines.append(("%20s," * (len(COLUMNS) + 1) % ("epoch", *COLUMNS)).rstrip(","))
    lines.append(("%20.5g," * (len(COLUMNS) + 1) % (epoch, *(values[k] for k in COLUMNS))).rstrip(","))
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def read(path: Path) -> list[dict[str, float]]:
    """Rows as dicts (stripped keys, float values). Accepts upstream's padded file too."""
    with Path(path).open() as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    return [{k: float(v) for k, v in zip(header, r)} for r in rows[1:] if r]


def truncate(path: Path, before_epoch: int) -> None:
    """Keep only rows of epochs < ``before_epoch`` (a resumed run rewrites the later ones)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = lines[:1] + [ln for ln in lines[1:] if ln.strip() and float(ln.split(",")[0]) < before_epoch]
    path.write_text("\n".join(kept) + "\n")


def columns_for(values: Sequence[float]) -> dict[str, float]:
    return dict(zip(COLUMNS, values))
