"""Pure image/label augmentation functions.

Every random decision is drawn from a ``numpy.random.Generator`` handed in by the caller; nothing here touches
Python's or NumPy's global random state, so a worker seeded once reproduces its samples exactly.

Images are OpenCV-style ``(H, W, 3)`` ``uint8`` arrays in BGR order. Label arrays are ``(n, 5)``; the
docstring of each function says whether it expects ``cls, cx, cy, w, h`` normalised to the image (the dataset
format) or ``cls, x1, y1, x2, y2`` in pixels (what the geometric transforms work on).

The geometry follows YOLOv5 v7.0 so that training statistics match it:

* :func:`letterbox` resizes with the same rounding and splits the padding the same way (``round(d - 0.1)`` on
  the top/left, ``round(d + 0.1)`` on the bottom/right), so validation shapes and pads are identical.
* :func:`random_perspective` composes ``M = T @ S @ R @ P @ C`` (centre, perspective, rotation+scale, shear,
  translation), warps with grey (114) borders, maps the four box corners and keeps boxes passing
  :func:`box_candidates`.
* :func:`mosaic4` places four images around a random centre of a ``2s x 2s`` canvas exactly as upstream's
  ``load_mosaic`` does. :func:`mosaic_perspective` is the fused fast path for ``mosaic4`` followed by
  ``random_perspective(border=(-s//2, -s//2))``: same random draws, same transform, same box filter and a
  pixel-identical image, but it fills only the part of the canvas that the warp samples.

Speed notes (measured, see the ``mosaic_perspective`` docstring): OpenCV's bilinear warp is several times faster
on 4-channel than on 3-channel ``uint8`` images, so warps go through BGRA (bit-identical results); large
intermediates live in reused per-thread buffers, because fresh multi-megabyte allocations are served by
``mmap`` and their page faults cost as much as the warp; :func:`augment_hsv` splits into reused planes for
the same reason.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from yolo.boxes import xywhn2xyxy

__all__ = [
    "GREY",
    "letterbox",
    "augment_hsv",
    "hsv_gains",
    "finish_rgb_chw",
    "flip_labels",
    "random_affine_matrix",
    "transform_boxes",
    "box_candidates",
    "random_perspective",
    "mosaic_centre",
    "mosaic_layout",
    "mosaic4",
    "mosaic_perspective",
    "mixup",
    "hflip",
    "vflip",
    "copy_paste",
]

GREY = 114  # fill value of padding, mosaic canvas and warp borders

# Warp 3-channel images through a 4-channel copy: OpenCV's bilinear remap is vectorised for 1/2/4 channels
# and several times slower for 3, so BGR -> BGRA -> warp -> BGR is cheaper than warping BGR directly (and the
# result is identical: every channel is interpolated independently with the same weights).
WARP_VIA_BGRA = True


_scratch = threading.local()


def _scratch_array(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous ``uint8`` array of ``shape`` carved from a grow-only per-thread buffer.

    Used for intermediates only (never returned): reusing the memory avoids a fresh multi-megabyte allocation
    per sample, whose page faults cost more than the warp itself when malloc serves big blocks with mmap.
    """
    n = int(np.prod(shape))
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, np.uint8)
        setattr(_scratch, name, buf)
    return buf[:n].reshape(shape)


def _default_rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def _hyp(hyp: Any, key: str, default: float) -> float:
    """``hyp[key]`` for dicts / DictConfigs, ``hyp.key`` for dataclasses; ``default`` when absent."""
    if hyp is None:
        return default
    if isinstance(hyp, Mapping) or hasattr(hyp, "get"):
        value = hyp.get(key, default)
    else:
        value = getattr(hyp, key, default)
    return default if value is None else float(value)


# ----------------------------------------------------------------------------------------------- letterbox
def letterbox(
    img: np.ndarray,
    new_shape: int | Sequence[int] = (640, 640),
    color: Sequence[int] = (GREY, GREY, GREY),
    auto: bool = False,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize ``img`` keeping its aspect ratio and pad it to ``new_shape`` = ``(h, w)`` (or an int for a square).

    ``auto`` pads only up to the next multiple of ``stride`` (minimum rectangle); ``scale_fill`` stretches to
    ``new_shape`` without padding; ``scaleup=False`` never enlarges (only shrinks).

    Returns ``(image, (ratio_w, ratio_h), (dw, dh))`` where ``dw``/``dh`` are the (possibly fractional) padding
    per side; the border actually added is ``round(d - 0.1)`` before and ``round(d + 0.1)`` after, which puts
    an odd extra pixel on the bottom/right.
    """
    h0, w0 = img.shape[:2]
    if isinstance(new_shape, (int, np.integer)):
        new_h = new_w = int(new_shape)
    else:
        new_h, new_w = int(new_shape[0]), int(new_shape[1])

    r = min(new_h / h0, new_w / w0)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    unpad_w, unpad_h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scale_fill:
        dw, dh = 0, 0
        unpad_w, unpad_h = new_w, new_h
        ratio = (new_w / w0, new_h / h0)
    dw, dh = dw / 2, dh / 2

    if (unpad_w, unpad_h) != (w0, h0):
        img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=tuple(color))
    return img, ratio, (dw, dh)


# --------------------------------------------------------------------------------------------------- colour
def _hsv_luts(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.arange(256, dtype=np.float64)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)  # OpenCV's 8-bit hue lives in [0, 180)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    return lut_h, lut_s, lut_v


def hsv_gains(hgain: float, sgain: float, vgain: float, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """Draw the HSV gains ``r = U(-1, 1, 3) * [hgain, sgain, vgain] + 1``; ``None`` (and nothing drawn) when all
    three gains are zero."""
    if not (hgain or sgain or vgain):
        return None
    return _default_rng(rng).uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1


def _apply_hsv(img: np.ndarray, r: np.ndarray, out_code: int, dst: np.ndarray) -> np.ndarray:
    """``img`` (BGR or BGRA) -> HSV, each plane through its gain's lookup table, -> ``out_code`` into ``dst``.

    Same arithmetic as splitting into fresh planes, but through reused buffers: letting OpenCV allocate the three
    planes costs more than the two colour conversions together."""
    h, w = img.shape[:2]
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV, dst=_scratch_array("hsv", (h, w, 3)))  # reads 3 or 4 channels
    planes = [_scratch_array(f"hsv{i}", (h, w)) for i in range(3)]
    cv2.split(hsv, planes)
    for plane, lut in zip(planes, _hsv_luts(r)):
        cv2.LUT(plane, lut, dst=plane)
    cv2.merge(planes, hsv)
    return cv2.cvtColor(hsv, out_code, dst=dst)


def augment_hsv(
    img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Random hue/saturation/value gains, applied **in place** to a BGR ``uint8`` image (also returned).

    Gains are ``r = U(-1, 1, 3) * [hgain, sgain, vgain] + 1``; hue is scaled modulo 180, saturation and value
    are scaled and clipped, each through a 256-entry lookup table. With all gains zero nothing is drawn and
    the image is untouched.
    """
    r = hsv_gains(hgain, sgain, vgain, rng)
    if r is not None:
        _apply_hsv(img, r, cv2.COLOR_HSV2BGR, dst=img)
    return img


def finish_rgb_chw(img: np.ndarray, gains: np.ndarray | None = None, flipud: bool = False,
                   fliplr: bool = False) -> np.ndarray:
    """The last pixel steps of a training sample in one pass: HSV ``gains`` (from :func:`hsv_gains`; ``None``:
    no colour change), up-down / left-right flips, and the layout change from ``(H, W, 3|4)`` BGR(A) to a fresh
    contiguous ``(3, H, W)`` RGB array (an alpha channel is ignored).

    Equal to ``augment_hsv`` → ``vflip`` → ``hflip`` → ``img.transpose(2, 0, 1)[::-1]``, pixel for pixel, but
    about 1 ms cheaper per 640x640 image: the HSV round trip ends in RGB directly, and the transpose and the
    flips are done on single-channel planes (``cv2.split`` into the output, in-place ``cv2.flip``), which OpenCV
    vectorises, instead of strided copies of interleaved pixels. Flips commute with the per-pixel colour change,
    so applying them last changes nothing.
    """
    h, w = img.shape[:2]
    rgb = _scratch_array("rgb", (h, w, 3))
    if gains is not None:
        _apply_hsv(img, gains, cv2.COLOR_HSV2RGB, dst=rgb)
    else:
        cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB, dst=rgb)
    out = np.empty((3, h, w), np.uint8)
    planes = [out[0], out[1], out[2]]
    cv2.split(rgb, planes)
    if flipud or fliplr:
        code = -1 if flipud and fliplr else (0 if flipud else 1)
        for plane in planes:
            cv2.flip(plane, code, dst=plane)
    return out


# ---------------------------------------------------------------------------------------------- geometry
def random_affine_matrix(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, float]:
    """Draw the 3x3 warp ``M = T @ S @ R @ P @ C`` for an input of ``in_shape`` = ``(h, w)`` and an output of
    ``out_shape`` = ``(height, width)``; returns ``(M, s)`` with ``s`` the drawn scale factor.

    Draw order (matters for reproducibility): perspective x, perspective y, angle, scale, shear x, shear y,
    translation x, translation y.
    """
    rng = _default_rng(rng)
    h, w = in_shape[0], in_shape[1]
    height, width = out_shape[0], out_shape[1]

    centre = np.eye(3)
    centre[0, 2] = -w / 2
    centre[1, 2] = -h / 2

    persp = np.eye(3)
    persp[2, 0] = rng.uniform(-perspective, perspective)
    persp[2, 1] = rng.uniform(-perspective, perspective)

    rot = np.eye(3)
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)

    sh = np.eye(3)
    sh[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    sh[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)

    tr = np.eye(3)
    tr[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    tr[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height

    return tr @ sh @ rot @ persp @ centre, s


def _inverse_map(M: np.ndarray, perspective: bool) -> np.ndarray:
    """The dst -> src map OpenCV would derive from ``M`` itself (2x3 affine or 3x3 projective)."""
    if perspective:
        return cv2.invert(M, flags=cv2.DECOMP_LU)[1]
    return cv2.invertAffineTransform(M[:2])


def _warp_inverse(src: np.ndarray, inv: np.ndarray, dsize: tuple[int, int], dst: np.ndarray | None = None):
    """Bilinear warp with a dst -> src map, grey outside the source (into ``dst`` when given)."""
    channels = 1 if src.ndim == 2 else src.shape[2]
    border = (GREY,) * min(channels, 4)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if inv.shape[0] == 3:
        return cv2.warpPerspective(src, inv, dsize=dsize, dst=dst, flags=flags, borderValue=border)
    return cv2.warpAffine(src, inv, dsize=dsize, dst=dst, flags=flags, borderValue=border)


def _warp_bgra(src4: np.ndarray, inv: np.ndarray, dsize: tuple[int, int], keep_bgra: bool = False) -> np.ndarray:
    """Warp a 4-channel intermediate and return a fresh 3-channel (BGR) result, or with ``keep_bgra`` the
    4-channel result itself (a reused buffer)."""
    out4 = _warp_inverse(src4, inv, dsize, dst=_scratch_array("warped", (dsize[1], dsize[0], 4)))
    return out4 if keep_bgra else cv2.cvtColor(out4, cv2.COLOR_BGRA2BGR)


def _warp(img: np.ndarray, M: np.ndarray, dsize: tuple[int, int], perspective: bool) -> np.ndarray:
    """Warp ``img`` by ``M`` into ``dsize`` = ``(width, height)``, bilinear, grey borders (the same sampling
    as ``cv2.warpAffine(img, M[:2], ...)`` / ``cv2.warpPerspective(img, M, ...)``)."""
    inv = _inverse_map(M, perspective)
    if WARP_VIA_BGRA and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
        src4 = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA, dst=_scratch_array("source", (*img.shape[:2], 4)))
        return _warp_bgra(src4, inv, dsize)
    return _warp_inverse(img, inv, dsize)


def transform_boxes(boxes: np.ndarray, M: np.ndarray, perspective: bool, width: int, height: int) -> np.ndarray:
    """Map ``(n, 4)`` ``xyxy`` boxes through ``M``: the enclosing box of the 4 transformed corners, clipped to
    ``[0, width] x [0, height]``. Returns a new float64 ``(n, 4)`` array."""
    n = len(boxes)
    if n == 0:
        return np.zeros((0, 4))
    pts = np.ones((n * 4, 3))
    pts[:, :2] = np.asarray(boxes, dtype=np.float64)[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    pts = pts @ M.T
    xy = (pts[:, :2] / pts[:, 2:3] if perspective else pts[:, :2]).reshape(n, 4, 2)
    new = np.concatenate((xy.min(1), xy.max(1)), 1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
    return new


def box_candidates(
    box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100, area_thr: float = 0.1, eps: float = 1e-16
) -> np.ndarray:
    """Boolean mask of boxes worth keeping after a geometric augmentation.

    ``box1`` (before, already multiplied by the augmentation's scale) and ``box2`` (after) are ``(4, n)``
    ``xyxy``. A box survives when both sides exceed ``wh_thr`` pixels, its area is more than ``area_thr`` of the
    scaled original (i.e. it was not mostly cut away) and its aspect ratio stays below ``ar_thr``.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _warp_labels(labels: np.ndarray, M: np.ndarray, s: float, width: int, height: int, perspective: bool) -> np.ndarray:
    if len(labels) == 0:
        return labels
    new = transform_boxes(labels[:, 1:5], M, bool(perspective), width, height)
    keep = box_candidates(box1=labels[:, 1:5].T * s, box2=new.T, area_thr=0.10)
    out = labels[keep].copy()
    out[:, 1:5] = new[keep]
    return out


def random_perspective(
    img: np.ndarray,
    labels: np.ndarray = (),
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: Sequence[int] = (0, 0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation (and optional perspective) of an image and its boxes.

    ``labels`` is ``(n, 5)`` ``cls, x1, y1, x2, y2`` in pixels. The output is ``img.shape[:2] + 2 * border``
    (a negative border crops, as after a mosaic). Returns ``(image, labels)`` with the boxes transformed,
    clipped and filtered by :func:`box_candidates`; the input arrays are not modified.
    """
    rng = _default_rng(rng)
    height = img.shape[0] + border[0] * 2
    width = img.shape[1] + border[1] * 2
    M, s = random_affine_matrix(img.shape[:2], (height, width), degrees, translate, scale, shear, perspective, rng)
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        img = _warp(img, M, (width, height), bool(perspective))
    labels = np.asarray(labels) if len(labels) else np.zeros((0, 5), dtype=np.float32)
    return img, _warp_labels(labels, M, s, width, height, perspective)


# ------------------------------------------------------------------------------------------------- mosaic
def mosaic_centre(img_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """The mosaic centre ``(xc, yc)``, each ``int(U(s/2, 3s/2))`` (``yc`` is drawn first)."""
    b = (-img_size) // 2  # the mosaic border, negative: the final crop
    yc = int(rng.uniform(-b, 2 * img_size + b))
    xc = int(rng.uniform(-b, 2 * img_size + b))
    return xc, yc


def mosaic_layout(shapes: Sequence[Sequence[int]], img_size: int, xc: int, yc: int) -> list[tuple[int, ...]]:
    """Where each of 4 images (``shapes`` = their ``(h, w)``) lands on the ``2s x 2s`` canvas.

    Image 0 goes top-left of the centre, 1 top-right, 2 bottom-left, 3 bottom-right, each touching the centre
    and cut at the canvas edge. Returns per image ``(x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b)``: the canvas
    rectangle ``a`` and the image rectangle ``b`` copied into it (same size).
    """
    s2 = 2 * img_size
    out = []
    for i, shape in enumerate(shapes):
        h, w = int(shape[0]), int(shape[1])
        if i == 0:  # top-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top-right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s2), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s2, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom-right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s2), min(s2, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        out.append((x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b))
    return out


def _mosaic_labels(labels: Sequence[np.ndarray], shapes, layout, img_size: int) -> np.ndarray:
    parts = []
    for lab, (h, w), (x1a, y1a, _, _, x1b, y1b, _, _) in zip(labels, shapes, layout):
        lab = np.asarray(lab)
        if lab.size:
            lab = lab.reshape(-1, 5).copy()
            lab[:, 1:] = xywhn2xyxy(lab[:, 1:], w, h, padw=x1a - x1b, padh=y1a - y1b)
            parts.append(lab)
    if not parts:
        return np.zeros((0, 5), dtype=np.float32)
    out = np.concatenate(parts, 0)
    np.clip(out[:, 1:], 0, 2 * img_size, out=out[:, 1:])
    return out


def _geometry(hyp: Any) -> dict[str, float]:
    """The geometric hyperparameters, with YOLOv5's scratch-low values where ``hyp`` lacks them."""
    defaults = dict(degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0)
    return {k: _hyp(hyp, k, v) for k, v in defaults.items()}


def _check_four(images, labels):
    if len(images) != 4 or len(labels) != 4:
        raise ValueError(f"a 4-mosaic needs 4 images and 4 label arrays, got {len(images)} and {len(labels)}")


def mosaic4(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], img_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 images around a random centre of a grey ``(2s, 2s)`` canvas.

    ``images``: 4 BGR images (long side ``img_size``, as the dataset's ``load_image`` returns them);
    ``labels``: 4 ``(n, 5)`` arrays ``cls, cx, cy, w, h`` normalised to their own image. Returns the canvas and
    ``(N, 5)`` labels ``cls, x1, y1, x2, y2`` in canvas pixels clipped to ``[0, 2s]``. Usually followed by
    ``random_perspective(..., border=(-s // 2, -s // 2))``; :func:`mosaic_perspective` does both at once.
    """
    _check_four(images, labels)
    s = img_size
    xc, yc = mosaic_centre(s, rng)
    shapes = [im.shape[:2] for im in images]
    layout = mosaic_layout(shapes, s, xc, yc)
    canvas = np.full((2 * s, 2 * s, images[0].shape[2]), GREY, dtype=np.uint8)
    for im, (x1a, y1a, x2a, y2a, x1b, y1b, x2b, y2b) in zip(images, layout):
        canvas[y1a:y2a, x1a:x2a] = im[y1b:y2b, x1b:x2b]
    return canvas, _mosaic_labels(labels, shapes, layout, s)


def _sampled_region(inv: np.ndarray, out_wh: tuple[int, int], src_wh: tuple[int, int]):
    """Bounding rectangle ``(x0, y0, x1, y1)`` of the source pixels that a bilinear warp with the dst -> src map
    ``inv`` (2x3 affine or 3x3 projective) into ``out_wh`` can read, with a safety margin, clipped to the
    source; ``None`` when it reads nothing."""
    width, height = out_wh
    sw, sh = src_wh
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], float)
    pts = corners @ inv.T
    if inv.shape[0] == 3:
        if not (pts[:, 2] > 1e-9).all():  # the output rectangle reaches the horizon: read everything
            return 0, 0, sw, sh
        pts = pts[:, :2] / pts[:, 2:3]
    # a projective map sends the output rectangle to a convex quadrilateral (denominator positive throughout),
    # so its corners bound every sampled position; bilinear reads floor(p) and floor(p) + 1, plus slack for
    # OpenCV's fixed-point rounding
    margin = 3
    x0 = max(int(math.floor(pts[:, 0].min())) - margin, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - margin, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + margin + 1, sw)
    y1 = min(int(math.ceil(pts[:, 1].max())) + margin + 1, sh)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def mosaic_perspective(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    img_size: int,
    hyp: Any,
    rng: np.random.Generator,
    keep_bgra: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused ``mosaic4`` + ``random_perspective(border=(-s//2, -s//2))``: same inputs, same random draws (in the
    same order), same transform matrix and box filter, so for a given ``rng`` state it returns the same image
    and boxes as the two-step path.

    Instead of filling a fresh ``(2s, 2s)`` canvas and warping it, it fills only the rectangle of the canvas
    that the warp samples (on average about a third of it with ``scale=0.5``) in a reused 4-channel buffer,
    copying in just the visible parts of the four tiles and painting grey only where no tile lands, and warps
    four channels (much faster in OpenCV than three). The output is pixel-identical to the two-step path.

    ``images`` may be lazy array-likes: only ``shape``, ``ndim`` and ``dtype`` are read up front, and an image
    is indexed (sliced) only if part of it reaches the sampled region, so a tile the warp never sees need not
    be decoded. ``hyp`` supplies ``degrees``, ``translate``, ``scale``, ``shear``, ``perspective`` (dict,
    DictConfig or an object with those attributes; scratch-low values where missing). Returns
    ``(image (s, s, 3), labels (n, 5) cls x1 y1 x2 y2 pixels)``. With ``keep_bgra`` the image may instead be the
    ``(s, s, 4)`` BGRA warp result in a per-thread buffer that the next call overwrites (alpha is meaningless):
    for a caller that consumes it at once, e.g. with :func:`finish_rgb_chw`, saving a conversion and a copy.
    """
    _check_four(images, labels)
    if not all(im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8 for im in images):
        canvas, labels4 = mosaic4(images, labels, img_size, rng)  # unusual images: the plain path
        return random_perspective(canvas, labels4, border=((-img_size) // 2,) * 2, rng=rng, **_geometry(hyp))
    s = img_size
    s2 = 2 * s
    b = (-s) // 2
    xc, yc = mosaic_centre(s, rng)
    shapes = [im.shape[:2] for im in images]
    layout = mosaic_layout(shapes, s, xc, yc)
    labels4 = _mosaic_labels(labels, shapes, layout, s)

    height = width = s2 + 2 * b
    geometry = _geometry(hyp)
    perspective = geometry["perspective"]
    M, sc = random_affine_matrix((s2, s2), (height, width), rng=rng, **geometry)
    labels_out = _warp_labels(labels4, M, sc, width, height, perspective)

    # The warp reads the canvas only inside ``region`` (the bounding box of the output's inverse image, plus
    # the interpolation margin). Only that part of a reused, otherwise stale, 4-channel canvas is filled, and the
    # warp is then called exactly as on a complete canvas (same source size, same map): identical pixels.
    inv = _inverse_map(M, bool(perspective))
    region = _sampled_region(inv, (width, height), (s2, s2))
    if region is None:  # the transform looks entirely outside the canvas
        return np.full((height, width, 3), GREY, dtype=np.uint8), labels_out
    vx0, vy0, vx1, vy1 = region
    canvas = _scratch_array("mosaic", (s2, s2, 4))

    # grey where no tile lands: each quadrant around the centre minus the tile anchored in it
    quadrants = ((0, 0, xc, yc), (xc, 0, s2, yc), (0, yc, xc, s2), (xc, yc, s2, s2))
    for (qx0, qy0, qx1, qy1), (x1a, y1a, x2a, y2a, *_) in zip(quadrants, layout):
        if x2a <= x1a or y2a <= y1a:  # empty tile: the whole quadrant is grey
            x1a = x2a = qx0
            y1a = y2a = qy0
        for rx0, ry0, rx1, ry1 in (
            (qx0, qy0, qx1, y1a),  # above the tile
            (qx0, y2a, qx1, qy1),  # below the tile
            (qx0, y1a, x1a, y2a),  # left of the tile
            (x2a, y1a, qx1, y2a),  # right of the tile
        ):
            rx0, ry0, rx1, ry1 = max(rx0, vx0), max(ry0, vy0), min(rx1, vx1), min(ry1, vy1)
            if rx1 > rx0 and ry1 > ry0:
                canvas[ry0:ry1, rx0:rx1] = GREY

    # the visible part of each tile, converted to BGRA straight into place
    for im, (x1a, y1a, x2a, y2a, x1b, y1b, _, _) in zip(images, layout):
        cx0, cy0, cx1, cy1 = max(x1a, vx0), max(y1a, vy0), min(x2a, vx1), min(y2a, vy1)
        if cx1 > cx0 and cy1 > cy0:
            src = im[y1b + cy0 - y1a : y1b + cy1 - y1a, x1b + cx0 - x1a : x1b + cx1 - x1a]
            cv2.cvtColor(src, cv2.COLOR_BGR2BGRA, dst=canvas[cy0:cy1, cx0:cx1])

    return _warp_bgra(canvas, inv, (width, height), keep_bgra), labels_out


# ------------------------------------------------------------------------------------------------- others
def mixup(
    img: np.ndarray, labels: np.ndarray, img2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp: blend two same-size images with ``r ~ Beta(32, 32)`` (``r * img + (1 - r) * img2``, truncated to
    uint8) and concatenate their labels (any shared format).

    The blend is computed in float32 (8x faster than float64; the truncated result can differ from a float64
    blend by 1 only where the exact value is within ~1e-5 of an integer)."""
    r = rng.beta(32.0, 32.0)
    out = (img * np.float32(r) + img2 * np.float32(1.0 - r)).astype(np.uint8)
    return out, np.concatenate((labels, labels2), 0)


def flip_labels(labels: np.ndarray, flipud: bool = False, fliplr: bool = False) -> np.ndarray:
    """``(n, 5)`` ``cls, cx, cy, w, h`` normalised labels of an image flipped up-down and/or left-right (a copy)."""
    labels = np.array(labels, copy=True)
    if len(labels):
        if flipud:
            labels[:, 2] = 1 - labels[:, 2]
        if fliplr:
            labels[:, 1] = 1 - labels[:, 1]
    return labels


def hflip(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flip; ``labels`` ``(n, 5)`` ``cls, cx, cy, w, h`` normalised. Returns flipped copies
    (``cv2.flip``: ~50x faster than materialising ``img[:, ::-1]`` with NumPy)."""
    return cv2.flip(img, 1), flip_labels(labels, fliplr=True)


def vflip(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up-down flip; ``labels`` ``(n, 5)`` ``cls, cx, cy, w, h`` normalised. Returns flipped copies."""
    return cv2.flip(img, 0), flip_labels(labels, flipud=True)


def _ioa(box: np.ndarray, boxes: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of ``box`` (4,) with each of ``boxes`` (n, 4), over the area of each of ``boxes``."""
    iw = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0)
    ih = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(0)
    return iw * ih / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + eps)


def copy_paste(
    img: np.ndarray, labels: np.ndarray, segments: list, p: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list]:
    """Copy-paste (https://arxiv.org/abs/2012.07177) for instance segments: mirrored copies of a random
    ``round(p * n)`` of the objects are pasted onto the image unless they would hide more than 30% of an
    existing box.

    ``labels`` ``(n, 5)`` ``cls, x1, y1, x2, y2`` pixels; ``segments`` a list of ``(k, 2)`` pixel polygons, one
    per label. **Detection datasets carry no segments**, so with ``segments`` empty (or ``p == 0``) this is a
    no-op returning its inputs unchanged (and drawing nothing from ``rng``). ``img`` is modified in place.
    Returns ``(img, labels, segments)``.
    """
    n = len(segments)
    if not p or not n:
        return img, labels, segments
    w = img.shape[1]
    segments = list(segments)
    mask = np.zeros(img.shape[:2], np.uint8)
    for j in rng.choice(n, size=round(p * n), replace=False):
        lab, seg = labels[j], segments[j]
        box = np.array([w - lab[3], lab[2], w - lab[1], lab[4]])
        if (_ioa(box, labels[:, 1:5]) < 0.30).all():
            labels = np.concatenate((labels, [[lab[0], *box]]), 0)
            segments.append(np.concatenate((w - seg[:, 0:1], seg[:, 1:2]), 1))
            cv2.drawContours(mask, [np.asarray(seg).astype(np.int32)], -1, 1, cv2.FILLED)
    flipped_mask = cv2.flip(mask, 1).astype(bool)
    img[flipped_mask] = cv2.flip(img, 1)[flipped_mask]
    return img, labels, segments
