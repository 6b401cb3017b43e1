"""The embedded synthetic "shapes" detection dataset.

A small, quickly learnable dataset generated on the fly (no download): filled circles/ellipses, rectangles,
triangles, crosses and stars of varied size, aspect ratio, rotation and colour on textured, noisy backgrounds,
in YOLO layout::

    root/images/train/*.jpg|png   root/labels/train/*.txt   (class cx cy w h, normalised)
    root/images/val/*.jpg|png     root/labels/val/*.txt

Every image is drawn from its own ``numpy.random.Generator`` seeded by ``(seed, split, index)``, so the dataset
is a pure function of its parameters: the same seed gives byte-identical files. :func:`generate_shapes` is
idempotent: a marker file (``.shapes.json``) records the generator version and parameters; a matching marker
means nothing is done, otherwise the splits are (re)written and the marker is written last, so an interrupted
run is redone. A lock file serialises concurrent callers (e.g. several trials starting at once). Generating says
so in one log line and shows a progress bar (about 10 s for the default 2,100 images on a 2-core CPU).

``conf/data/shapes.yaml`` refers to it with ``download: shapes``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from yolo.utils.files import FileLock, atomic_write_text

__all__ = ["CLASS_NAMES", "SHAPES_VERSION", "generate_shapes", "render_image", "ShapeObject", "image_name"]

SHAPES_VERSION = 1
CLASS_NAMES = ("circle", "rectangle", "triangle", "cross", "star")
MARKER = ".shapes.json"
SPLITS = {"train": 0, "val": 1}

# geometry / layout parameters
IMG_MIN, IMG_MAX = 192, 320  # image side range (pixels), each side drawn independently
SIZE_MIN, SIZE_MAX = 0.15, 0.5  # object size as a fraction of the image's short side
MAX_OBJECTS = 6
BACKGROUND_EVERY = 20  # every 20th image (index % 20 == 19) has no objects
PNG_EVERY = 10  # every 10th image (index % 10 == 0) is written as PNG, the rest as JPEG
JPEG_QUALITY = 92
MAX_IOU, MAX_IOA = 0.15, 0.30  # overlap limits between objects' boxes

log = logging.getLogger("yolo")


@dataclass
class ShapeObject:
    """One drawn object: class id, tight pixel box ``x1, y1, x2, y2`` (``x2``/``y2`` exclusive) and its mask."""

    cls: int
    box: tuple[int, int, int, int]
    mask: np.ndarray  # bool (H, W)


def image_name(split: str, index: int) -> str:
    """File stem of image ``index`` of ``split``."""
    return f"{split}_{index:05d}"


def _image_suffix(index: int) -> str:
    return ".png" if index % PNG_EVERY == 0 else ".jpg"


# ------------------------------------------------------------------------------------------------ drawing
def _unit_polygon(cls: int, rng: np.random.Generator) -> np.ndarray:
    """Outline of a class's shape in ``[-1, 1]^2`` (before stretching and rotation), ``(k, 2)`` float."""
    if cls == 0:  # circle (stretched into an ellipse later)
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if cls == 1:  # rectangle
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if cls == 2:  # triangle: apex anywhere along the top edge
        apex = rng.uniform(-0.6, 0.6)
        return np.array([[apex, -1], [1, 1], [-1, 1]], float)
    if cls == 3:  # cross (plus sign) with arms of relative thickness t
        t = rng.uniform(0.28, 0.42)
        return np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]],
            float,
        )
    # star: 5 points, inner radius ratio r
    r = rng.uniform(0.38, 0.5)
    k = np.arange(10)
    rad = np.where(k % 2 == 0, 1.0, r)
    ang = -np.pi / 2 + k * np.pi / 5
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _object_polygon(cls: int, side: float, rng: np.random.Generator) -> np.ndarray:
    """A class's polygon, sized, stretched and rotated, centred on the origin."""
    pts = _unit_polygon(cls, rng)
    if cls == 0:
        aspect = math.exp(rng.uniform(-0.35, 0.35))
        angle = 0.0
    elif cls == 1:
        aspect = math.exp(rng.uniform(-0.9, 0.9))
        angle = rng.uniform(-20, 20)
    else:
        aspect = math.exp(rng.uniform(-0.3, 0.3))
        angle = rng.uniform(-180, 180) if cls != 3 else rng.uniform(-30, 30)
    pts = pts * np.array([side / 2 * math.sqrt(aspect), side / 2 / math.sqrt(aspect)])
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Mid-tone base colour + low-frequency colour texture + a few faint clutter lines (uint8 BGR)."""
    base = rng.uniform(60, 190, 3)
    gh, gw = rng.integers(3, 9, 2)
    coarse = rng.uniform(-22, 22, (int(gh), int(gw), 3)).astype(np.float32)
    texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base[None, None] + texture, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # faint lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        c = np.clip(base + rng.uniform(-30, 30, 3), 0, 255)
        cv2.line(img, p1, p2, tuple(float(v) for v in c), int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _contrasting_colour(mean_bgr: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random colour (often saturated) clearly different from ``mean_bgr`` (luminance or hue/saturation)."""
    def luma(c):
        return 0.114 * c[0] + 0.587 * c[1] + 0.299 * c[2]

    for _ in range(20):
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(30, 256)]]])
        c = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(float)
        if abs(luma(c) - luma(mean_bgr)) >= 60 or np.abs(c - mean_bgr).sum() >= 250:
            return tuple(c)
    return (15.0, 15.0, 15.0) if luma(mean_bgr) > 110 else (245.0, 245.0, 245.0)


def _iou_ioa(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iw = (np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).clip(0)
    ih = (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).clip(0)
    inter = iw * ih
    a1 = (box[2] - box[0]) * (box[3] - box[1])
    a2 = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    iou = inter / (a1 + a2 - inter)
    ioa = np.maximum(inter / a1, inter / a2)  # the larger covered fraction of either box
    return iou, ioa


def render_image(seed: int, split: str, index: int) -> tuple[np.ndarray, list[ShapeObject]]:
    """Draw image ``index`` of ``split`` for ``seed``: ``(BGR uint8 image, objects)``.

    Objects are listed in drawing order (later ones may cover a little of earlier ones, within the overlap
    limits); each box is the tight extent of the object's own mask.
    """
    rng = np.random.default_rng([seed, SPLITS[split], index, SHAPES_VERSION])
    h, w = (int(v) for v in rng.integers(IMG_MIN, IMG_MAX + 1, 2))
    img = _background(h, w, rng)
    objects: list[ShapeObject] = []
    n = 0 if index % BACKGROUND_EVERY == BACKGROUND_EVERY - 1 else int(rng.integers(1, MAX_OBJECTS + 1))
    short = min(h, w)
    for _ in range(n):
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        for _attempt in range(30):
            side = rng.uniform(SIZE_MIN, SIZE_MAX) * short
            poly = _object_polygon(cls, side, rng)
            lo, hi = poly.min(0), poly.max(0)
            if (hi - lo > np.array([w, h]) - 6).any():
                continue
            cx = rng.uniform(-lo[0] + 2, w - hi[0] - 2)
            cy = rng.uniform(-lo[1] + 2, h - hi[1] - 2)
            box = np.array([cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1]])
            if objects:
                iou, ioa = _iou_ioa(box, np.array([o.box for o in objects], float))
                if (iou > MAX_IOU).any() or (ioa > MAX_IOA).any():
                    continue
            pts = np.round((poly + [cx, cy]) * 16).astype(np.int32)  # 4 fractional bits
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, shift=4)
            bx, by, bw, bh = cv2.boundingRect(mask)  # tight extent of the rasterised shape
            if bw == 0 or bh == 0:
                continue
            x1, y1, x2, y2 = bx, by, bx + bw, by + bh
            m = mask.astype(bool)
            colour = _contrasting_colour(np.array(cv2.mean(img, mask)[:3]), rng)
            cv2.fillPoly(img, [pts], colour, cv2.LINE_8, shift=4)
            objects.append(ShapeObject(cls, (x1, y1, x2, y2), m))
            break
    # sensor-like noise over everything, sometimes a slight blur
    noise = rng.integers(-6, 7, img.shape, dtype=np.int16)
    img = cv2.add(img, noise, dtype=cv2.CV_8U)  # saturating
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img, objects


def _label_text(objects: list[ShapeObject], w: int, h: int) -> str:
    lines = []
    for o in objects:
        x1, y1, x2, y2 = o.box
        lines.append(f"{o.cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return "".join(line + "\n" for line in lines)


# ----------------------------------------------------------------------------------------------- dataset
def _expected_marker(seed: int, n_train: int, n_val: int) -> dict:
    return {"generator": "yolo.data.shapes", "version": SHAPES_VERSION, "seed": int(seed), "n_train": int(n_train),
            "n_val": int(n_val), "names": list(CLASS_NAMES)}


def _marker_ok(root: Path, expected: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def generate_shapes(root: Path | str, seed: int = 0, n_train: int = 2000, n_val: int = 100) -> Path:
    """Create (or verify) the shapes dataset under ``root``; returns ``root`` as a ``Path``.

    Deterministic and idempotent: if ``root/.shapes.json`` records this generator version and these
    parameters nothing is touched; otherwise ``images/{train,val}`` and ``labels/{train,val}`` (and any label
    caches next to them) are removed and rewritten. Takes about 10 s for the default 2,100 images.
    """
    root = Path(root)
    expected = _expected_marker(seed, n_train, n_val)
    if _marker_ok(root, expected):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".shapes.lock"):
        if _marker_ok(root, expected):  # another process finished it while we waited
            return root
        (root / MARKER).unlink(missing_ok=True)
        log.info(f"Generating the synthetic shapes dataset in {root}: {n_train} train + {n_val} val images "
                 f"(seed {seed}; done once, about {max(1, round((n_train + n_val) / 200))} s on 2 CPU cores)...")
        with tqdm(total=n_train + n_val, desc="Generating shapes", unit="img") as bar:
            for split, n in (("train", n_train), ("val", n_val)):
                _write_split(root, split, n, seed, bar)
        atomic_write_text(root / MARKER, json.dumps(expected, indent=1))
    return root


def _write_split(root: Path, split: str, n: int, seed: int, bar: tqdm) -> None:
    """(Re)write ``n`` images and label files of ``split``, removing its old files and label caches first."""
    img_dir, lab_dir = root / "images" / split, root / "labels" / split
    for d in (img_dir, lab_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for cache in (root / "labels").glob(f"{split}*.cache"):  # ours and any other tool's: they describe old files
        cache.unlink(missing_ok=True)
    for i in range(n):
        img, objects = render_image(seed, split, i)
        stem = image_name(split, i)
        suffix = _image_suffix(i)
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
        ok, buf = cv2.imencode(suffix, img, params)
        if not ok:  # pragma: no cover
            raise RuntimeError(f"could not encode {stem}{suffix}")
        (img_dir / f"{stem}{suffix}").write_bytes(buf.tobytes())
        (lab_dir / f"{stem}.txt").write_text(_label_text(objects, img.shape[1], img.shape[0]))
        bar.update()


if __name__ == "__main__":  # pragma: no cover - manual use: python -m yolo.data.shapes [root] [seed]
    import sys
    import time

    t0 = time.perf_counter()
    out = generate_shapes(Path(sys.argv[1] if len(sys.argv) > 1 else "datasets/shapes"),
                          int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"shapes dataset at {out} ({time.perf_counter() - t0:.1f}s)")
