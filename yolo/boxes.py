"""Bounding-box helpers: format conversions, clipping, rescaling and IoU.

Formats used throughout the project:

* ``xyxy``  -- ``x1, y1, x2, y2`` (top-left and bottom-right corners), pixels.
* ``xywh``  -- ``cx, cy, w, h`` (centre and size), pixels.
* ``xywhn`` -- ``cx, cy, w, h`` normalised to the image size (the dataset label format).

The conversion and clipping helpers accept numpy arrays and torch tensors with any number of leading
dimensions (the box coordinates are the first four entries of the last axis; extra trailing columns are
carried through unchanged). ``clip_boxes`` and ``scale_boxes`` work *in place* (and also return their input),
because callers rely on rescaling a view such as ``pred[:, :4]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "xywh2xyxy",
    "xyxy2xywh",
    "xywhn2xyxy",
    "xyxy2xywhn",
    "clip_boxes",
    "scale_boxes",
    "box_area",
    "box_iou",
    "bbox_iou",
]


def _copy(x):
    """A fresh copy of an array or tensor (floating point arrays keep their dtype)."""
    return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


def _cat(parts, like):
    return torch.cat(parts, -1) if isinstance(like, torch.Tensor) else np.concatenate(parts, -1)


def xywh2xyxy(x):
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2``; returns a new array/tensor."""
    centre, half = x[..., :2], x[..., 2:4] / 2
    return _cat((centre - half, centre + half, x[..., 4:]), x)


def xyxy2xywh(x):
    """``x1, y1, x2, y2`` -> ``cx, cy, w, h``; returns a new array/tensor."""
    top_left, bottom_right = x[..., :2], x[..., 2:4]
    return _cat(((top_left + bottom_right) / 2, bottom_right - top_left, x[..., 4:]), x)


def xywhn2xyxy(x, w=640, h=640, padw=0, padh=0):
    """Normalised ``cx, cy, w, h`` -> pixel ``x1, y1, x2, y2`` for an image of size ``w`` x ``h``,
    shifted by the padding ``(padw, padh)``; returns a new array/tensor."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w=640, h=640, clip=False, eps=0.0):
    """Pixel ``x1, y1, x2, y2`` -> normalised ``cx, cy, w, h``.

    With ``clip`` the corners are first clipped to ``[0, w - eps] x [0, h - eps]`` (on a copy: unlike
    upstream, the input is left untouched). Returns a new array/tensor.
    """
    if clip:
        x = clip_boxes(_copy(x), (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes, shape):
    """Clip ``xyxy`` boxes to an image of ``shape`` = ``(height, width)``, in place; returns ``boxes``."""
    height, width = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, width)
        boxes[..., 1].clamp_(0, height)
        boxes[..., 2].clamp_(0, width)
        boxes[..., 3].clamp_(0, height)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, width)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, height)
    return boxes


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map ``xyxy`` boxes from a letterboxed image of ``img1_shape`` (h, w) back to the original ``img0_shape``.

    ``ratio_pad`` = ``((gain_h, gain_w), (pad_w, pad_h))`` as recorded by the letterbox; only ``gain_h`` is used
    (letterboxing scales both axes equally). Without it the gain and centred padding are recomputed from the two
    shapes. The boxes are shifted, divided by the gain and clipped to ``img0_shape`` in place; returns ``boxes``.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad_w = (img1_shape[1] - img0_shape[1] * gain) / 2
        pad_h = (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad_w, pad_h = ratio_pad[1][0], ratio_pad[1][1]
    boxes[..., [0, 2]] -= pad_w
    boxes[..., [1, 3]] -= pad_h
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def box_area(boxes):
    """Areas of ``xyxy`` boxes, shape ``(...,)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(box1, box2, eps=1e-7):
    """Pairwise IoU of ``xyxy`` boxes: ``(n, 4)`` x ``(m, 4)`` -> ``(n, m)``. Torch tensors or numpy arrays."""
    if isinstance(box1, torch.Tensor):
        lt = torch.maximum(box1[:, None, :2], box2[None, :, :2])
        rb = torch.minimum(box1[:, None, 2:4], box2[None, :, 2:4])
        wh = (rb - lt).clamp(0)
    else:
        box1, box2 = np.asarray(box1), np.asarray(box2)
        lt = np.maximum(box1[:, None, :2], box2[None, :, :2])
        rb = np.minimum(box1[:, None, 2:4], box2[None, :, 2:4])
        wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    return inter / (area1[:, None] + area2[None, :] - inter + eps)


def bbox_iou(box1, box2, xywh=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-7):
    """Elementwise (broadcast) IoU of torch boxes ``(..., 4)`` -> ``(..., 1)``, optionally as GIoU, DIoU or CIoU.

    ``xywh`` selects the box format (``cx, cy, w, h``; otherwise ``x1, y1, x2, y2``). The formulas follow
    YOLOv5 v7.0 exactly, including where ``eps`` enters; the CIoU trade-off weight ``alpha`` is treated as a
    constant (no gradient flows through it).
    """
    if xywh:
        cx1, cy1, w1, h1 = box1.chunk(4, -1)
        cx2, cy2, w2, h2 = box2.chunk(4, -1)
        hw1, hh1, hw2, hh2 = w1 / 2, h1 / 2, w2 / 2, h2 / 2
        ax1, ax2, ay1, ay2 = cx1 - hw1, cx1 + hw1, cy1 - hh1, cy1 + hh1
        bx1, bx2, by1, by2 = cx2 - hw2, cx2 + hw2, cy2 - hh2, cy2 + hh2
    else:
        ax1, ay1, ax2, ay2 = box1.chunk(4, -1)
        bx1, by1, bx2, by2 = box2.chunk(4, -1)
        w1, h1 = ax2 - ax1, ay2 - ay1 + eps
        w2, h2 = bx2 - bx1, by2 - by1 + eps

    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou

    # smallest enclosing box
    cw = torch.max(ax2, bx2) - torch.min(ax1, bx1)
    ch = torch.max(ay2, by2) - torch.min(ay1, by1)
    if GIoU and not (DIoU or CIoU):
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area

    diag2 = cw**2 + ch**2 + eps  # squared diagonal of the enclosing box
    centre2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4  # squared centre distance
    if not CIoU:
        return iou - centre2 / diag2
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)  # aspect-ratio consistency
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diag2 + v * alpha)
