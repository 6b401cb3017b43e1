"""Detections drawn on an image (OpenCV's built-in Hershey font: nothing downloaded) and written as label lines.

Pure functions of their arguments: :func:`draw_detections` returns a new image, :func:`label_lines` the rows of
a ``labels/<stem>.txt`` file in upstream detect.py's format.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from yolo.data.plots import colour

FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOUR = (255, 255, 255)


def label_text(name: str, score: float, hide_labels: bool = False, hide_conf: bool = False) -> str:
    """What a box is captioned with: ``person 0.87``, ``person`` (``hide_conf``) or nothing (``hide_labels``)."""
    if hide_labels:
        return ""
    return name if hide_conf else f"{name} {score:.2f}"


def _caption(im: np.ndarray, text: str, x1: int, y1: int, lw: int, bg: tuple[int, int, int]) -> None:
    tf = max(lw - 1, 1)
    scale = lw / 3
    (tw, th), baseline = cv2.getTextSize(text, FONT, scale, tf)
    outside = y1 - th - baseline - 3 >= 0  # above the box when it fits, else inside it
    top = y1 - th - baseline - 3 if outside else y1
    cv2.rectangle(im, (x1, top), (x1 + tw + 2, top + th + baseline + 3), bg, -1, cv2.LINE_AA)
    cv2.putText(im, text, (x1 + 1, top + th + 1), FONT, scale, TEXT_COLOUR, tf, cv2.LINE_AA)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    names: Sequence[str],
    line_thickness: int = 3,
    hide_labels: bool = False,
    hide_conf: bool = False,
) -> np.ndarray:
    """A copy of the BGR ``image`` with each ``xyxy`` box (original pixels) drawn in its class's colour and
    captioned; the most confident box is drawn last, on top."""
    im = np.ascontiguousarray(image.copy())
    lw = max(int(line_thickness), 1)
    for i in np.argsort(np.asarray(scores), kind="stable"):
        c = int(classes[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        bg = colour(c, bgr=True)
        cv2.rectangle(im, (x1, y1), (x2, y2), bg, lw, cv2.LINE_AA)
        name = names[c] if 0 <= c < len(names) else str(c)
        text = label_text(name, float(scores[i]), hide_labels, hide_conf)
        if text:
            _caption(im, text, x1, y1, lw, bg)
    return im


def xyxy_to_xywhn(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``xyxy`` pixel boxes → ``cx, cy, w, h`` normalised to an image of ``shape`` (h, w), computed in float32
    as upstream does (so the written digits match)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    h, w = np.float32(shape[0]), np.float32(shape[1])
    xywh = np.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1)
    return xywh / np.array((w, h, w, h), dtype=np.float32)


def label_lines(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, shape: Sequence[int],
                save_conf: bool = False) -> list[str]:
    """One ``class cx cy w h [conf]`` row per detection, normalised to the original image of ``shape`` (h, w),
    each number written with ``%g`` (six significant digits) as upstream detect.py writes them."""
    rows = []
    for c, xywh, s in zip(np.asarray(classes), xyxy_to_xywhn(boxes, shape), np.asarray(scores, dtype=np.float32)):
        values = (float(c), *(float(v) for v in xywh)) + ((float(s),) if save_conf else ())
        rows.append(("%g " * len(values)).rstrip() % values)
    return rows
