"""Dataset and batch visualisations: ``labels.jpg`` (label statistics) and training/validation image grids.

Only matplotlib's Agg backend (through the object-oriented ``Figure`` API, never ``pyplot``, so plots are safe to
draw from a background thread) and OpenCV's built-in Hershey fonts are used: nothing is downloaded.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

__all__ = ["colour", "plot_labels", "plot_images", "run_in_background"]

# a fixed, high-contrast palette (RGB), cycled by class id
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def colour(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """Colour of class ``i`` (RGB, or BGR for OpenCV drawing)."""
    c = _PALETTE[int(i) % len(_PALETTE)]
    return c[::-1] if bgr else c


def _names_list(names: Any, nc: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(nc)]
    if isinstance(names, Mapping):
        return [str(names.get(i, i)) for i in range(max(nc, len(names)))]
    names = [str(n) for n in names]
    return names + [str(i) for i in range(len(names), nc)]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def run_in_background(fn: Callable, *args: Any, **kwargs: Any) -> threading.Thread:
    """Run ``fn(*args, **kwargs)`` in a daemon thread (plots must not block training); returns the thread.
    Exceptions are printed by the thread machinery and otherwise ignored."""
    t = threading.Thread(target=fn, args=args, kwargs=kwargs, daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------------------------------- plot_labels
def plot_labels(labels: Any, names: Any = None, save_path: str | Path = "labels.jpg") -> Path:
    """Label statistics of a dataset, saved as one image (``labels.jpg``).

    ``labels``: ``(n, 5)`` ``cls, cx, cy, w, h`` normalised (all images' labels stacked). Panels: instances per
    class, a sample of box outlines drawn centred (their sizes and shapes), a 2-D histogram of box centres and
    one of widths vs heights. Returns the saved path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: matplotlib is heavy, only plots need it
    from matplotlib.figure import Figure

    labels = _to_numpy(labels).reshape(-1, 5).astype(np.float64)
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    cls = labels[:, 0].astype(int)
    nc = int(cls.max()) + 1 if len(cls) else 0
    if isinstance(names, Mapping) or names is not None:
        nc = max(nc, len(names))
    names_l = _names_list(names, nc)

    fig = Figure(figsize=(8, 8), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2).ravel()

    # instances per class
    counts = np.bincount(cls, minlength=nc) if nc else np.zeros(0, int)
    ax[0].bar(range(nc), counts, width=0.8, color=[np.array(colour(i)) / 255 for i in range(nc)])
    ax[0].set_ylabel("instances")
    if 0 < nc < 30:
        ax[0].set_xticks(range(nc))
        ax[0].set_xticklabels(names_l[:nc], rotation=90, fontsize=10)
    else:
        ax[0].set_xlabel("classes")

    # box outlines, all centred, first 1000
    size = 1000
    canvas = np.full((size, size, 3), 255, np.uint8)
    for c, _, _, w, h in labels[:1000]:
        x1, y1 = int(round((0.5 - w / 2) * size)), int(round((0.5 - h / 2) * size))
        x2, y2 = int(round((0.5 + w / 2) * size)), int(round((0.5 + h / 2) * size))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour(int(c)), 1)
    ax[1].imshow(canvas)
    ax[1].axis("off")

    # box centres and sizes
    bins = 50
    for a, (i, j), (xl, yl) in ((ax[2], (1, 2), ("x", "y")), (ax[3], (3, 4), ("width", "height"))):
        if len(labels):
            hist, _, _ = np.histogram2d(labels[:, i], labels[:, j], bins=bins, range=[[0, 1], [0, 1]])
            vmax = max(float(np.quantile(hist[hist > 0], 0.9)), 1.0)  # saturate the densest 10% of cells
            a.imshow(np.ma.masked_equal(hist.T, 0), extent=(0, 1, 0, 1), origin="lower", cmap="viridis", vmin=0,
                     vmax=vmax, aspect="auto", interpolation="nearest")
        a.set_xlim(0, 1)
        a.set_ylim(0, 1)
        a.set_xlabel(xl)
        a.set_ylabel(yl)
    ax[2].set_ylim(1, 0)  # image coordinates: y grows downwards

    for a in ax:
        for side in ("top", "right", "left", "bottom"):
            a.spines[side].set_visible(False)
    fig.savefig(save_path, dpi=150)
    return save_path


# ------------------------------------------------------------------------------------------- plot_images
def _put_label(img: np.ndarray, text: str, x: int, y: int, col: tuple[int, int, int], scale: float, thick: int):
    """Text on a filled box of ``col`` above (or, at the top edge, below) the point ``(x, y)``."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    y_top = y - th - base - 2
    if y_top < 0:
        y_top = y
    cv2.rectangle(img, (x, y_top), (x + tw + 2, y_top + th + base + 2), col, -1)
    luma = 0.299 * col[2] + 0.587 * col[1] + 0.114 * col[0]
    txt_col = (0, 0, 0) if luma > 140 else (255, 255, 255)
    cv2.putText(img, text, (x + 1, y_top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, txt_col, thick, cv2.LINE_AA)


def plot_images(
    images: Any,
    targets: Any,
    paths: Sequence[str | Path] | None = None,
    save_path: str | Path = "images.jpg",
    names: Any = None,
    max_size: int = 1920,
    max_subplots: int = 16,
    conf_thres: float = 0.25,
) -> np.ndarray:
    """Grid of a batch's images with their boxes and class names, saved to ``save_path``.

    ``images``: ``(B, 3, H, W)`` RGB, ``uint8`` or float in ``[0, 1]`` (tensor or array). ``targets``: ``(n, 6)``
    ``image_index, cls, cx, cy, w, h`` (labels) or ``(n, 7)`` with a confidence column (predictions; only those
    above ``conf_thres`` are drawn, with their score). Boxes may be normalised or in input pixels. At most
    ``max_subplots`` images, laid out row by row in a square grid, scaled down so the grid's side is at most
    ``max_size``. Returns the grid (RGB ``uint8``).
    """
    images = _to_numpy(images)
    targets = _to_numpy(targets)
    if targets.ndim != 2:
        targets = targets.reshape(-1, 6)
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
        if images.size and images.max() <= 1.0:
            images = images * 255
        images = images.clip(0, 255).astype(np.uint8)
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = max(int(math.ceil(bs**0.5)), 1)

    scale = min(max_size / ns / max(h, w), 1.0)
    th, tw = int(math.ceil(h * scale)), int(math.ceil(w * scale))  # tile size
    grid = np.full((ns * th, ns * tw, 3), 255, np.uint8)  # BGR while drawing
    line = max(int(round((th + tw) * ns * 0.001)), 1)
    fscale = max((th + tw) * ns * 0.00035, 0.35)
    fthick = max(int(round(fscale * 1.5)), 1)
    names_l = None if names is None else _names_list(names, 0)

    for i in range(bs):
        x0, y0 = tw * (i % ns), th * (i // ns)
        im = np.ascontiguousarray(images[i].transpose(1, 2, 0)[..., ::-1])  # CHW RGB -> HWC BGR
        if scale < 1:
            im = cv2.resize(im, (tw, th), interpolation=cv2.INTER_AREA)
        grid[y0 : y0 + th, x0 : x0 + tw] = im
        cv2.rectangle(grid, (x0, y0), (x0 + tw - 1, y0 + th - 1), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            cv2.putText(grid, Path(paths[i]).name[:40], (x0 + 5, y0 + 5 + int(20 * fscale)), cv2.FONT_HERSHEY_SIMPLEX,
                        fscale, (220, 220, 220), fthick, cv2.LINE_AA)
        if len(targets) == 0:
            continue
        ti = targets[targets[:, 0] == i]
        if not len(ti):
            continue
        boxes = ti[:, 2:6].astype(np.float64).copy()
        if boxes.max() <= 1.01:  # normalised
            boxes[:, [0, 2]] *= tw
            boxes[:, [1, 3]] *= th
        else:  # input pixels
            boxes *= scale
        has_conf = ti.shape[1] > 6
        for k, (cx, cy, bw, bh) in enumerate(boxes):
            if has_conf and ti[k, 6] < conf_thres:
                continue
            c = int(ti[k, 1])
            col = colour(c, bgr=True)
            p1 = (int(x0 + cx - bw / 2), int(y0 + cy - bh / 2))
            p2 = (int(x0 + cx + bw / 2), int(y0 + cy + bh / 2))
            cv2.rectangle(grid, p1, p2, col, line, cv2.LINE_AA)
            label = names_l[c] if names_l is not None and c < len(names_l) else str(c)
            if has_conf:
                label = f"{label} {ti[k, 6]:.1f}"
            _put_label(grid, label, p1[0], p1[1], col, fscale, fthick)

    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(save_path), grid)
    return grid[..., ::-1].copy()
