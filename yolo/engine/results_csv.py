"""``results.csv``: one row per epoch, upstream's columns and padding, safe to resume."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

from yolo.utils.files import atomic_write_text

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


def _row(line: str) -> list[float] | None:
    """A well-formed data line's values, or None (a torn or foreign line)."""
    cells = line.split(",")
    if len(cells) != len(COLUMNS) + 1:
        return None
    try:
        return [float(c) for c in cells]
    except ValueError:
        return None


def read(path: Path) -> list[dict[str, float]]:
    """Rows as dicts (stripped keys, float values). Accepts upstream's padded file too; a torn last line (a kill
    mid-write) is skipped."""
    with Path(path).open() as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    out = []
    for r in rows[1:]:
        try:
            if len(r) == len(header):
                out.append({k: float(v) for k, v in zip(header, r)})
        except ValueError:
            continue
    return out


def truncate(path: Path, before_epoch: int) -> None:
    """Keep only well-formed rows of epochs < ``before_epoch`` (a resumed run rewrites the later ones), in one
    atomic replacement: a kill leaves the old file or the new one."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines[1:] if (v := _row(ln)) is not None and v[0] < before_epoch]
    atomic_write_text(path, "\n".join(lines[:1] + kept) + "\n")


def columns_for(values: Sequence[float]) -> dict[str, float]:
    return dict(zip(COLUMNS, values))
