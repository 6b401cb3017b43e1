"""Non-maximum suppression of decoded YOLOv5 outputs (through ``torchvision.ops.nms``)."""

from __future__ import annotations

import torch
import torchvision

from yolo.boxes import xywh2xyxy

__all__ = ["non_max_suppression"]


def non_max_suppression(
    prediction,
    conf_thres=0.25,
    iou_thres=0.45,
    classes=None,
    agnostic=False,
    multi_label=False,
    max_det=300,
    max_nms=30000,
    max_wh=7680,
):
    """Filter raw detections down to the kept boxes of each image.

    Args:
        prediction: ``(bs, N, 5 + nc)`` tensor of ``cx, cy, w, h, objectness, class scores`` (after sigmoid, in
            input pixels), or the ``(inference, raw)`` tuple an eval-mode model returns.
        conf_thres: candidates need objectness above this, and their score (objectness x class score) too.
        iou_thres: boxes of the same class overlapping a better one by more than this IoU are dropped.
        classes: optional iterable of class indices to keep.
        agnostic: suppress across classes (one NMS over all boxes).
        multi_label: one candidate per (box, class) pair scoring above ``conf_thres`` instead of the best class
            only (ignored when ``nc == 1``).
        max_det: at most this many detections per image (the best scoring ones).
        max_nms: at most this many candidates (the best scoring ones) enter NMS.
        max_wh: per-class coordinate offset that keeps NMS of different classes apart.

    Returns:
        A list with one ``(n, 6)`` tensor ``x1, y1, x2, y2, conf, cls`` per image, sorted by ``conf`` descending.

    The kept boxes are those of YOLOv5 v7.0 (same candidate rules, same class offsets, same IoU arithmetic), except
    that every image is always processed: there is no wall-clock limit cutting a batch short.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres must lie in [0, 1], got {conf_thres}")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres must lie in [0, 1], got {iou_thres}")

    device = prediction.device
    nc = prediction.shape[2] - 5
    multi_label = multi_label and nc > 1
    wanted = None if classes is None else torch.as_tensor(list(classes), device=device, dtype=prediction.dtype)

    output = []
    for image_pred in prediction:
        x = image_pred.index_select(0, (image_pred[:, 4] > conf_thres).nonzero().squeeze(1))  # objectness gate
        if not x.shape[0]:
            output.append(prediction.new_zeros((0, 6)))
            continue
        scores = x[:, 5:] * x[:, 4:5]  # objectness x class score
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j].unsqueeze(1), j.unsqueeze(1).to(x.dtype)), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
        if wanted is not None:
            det = det[(det[:, 5:6] == wanted).any(1)]
        if not det.shape[0]:
            output.append(prediction.new_zeros((0, 6)))
            continue

        det = det[det[:, 4].sort(descending=True, stable=True).indices[:max_nms]]
        shifted = det[:, :4] + det[:, 5:6] * (0 if agnostic else max_wh)  # keep classes apart
        output.append(det[_greedy_nms(shifted, det[:, 4], iou_thres, max_det)])
    return output


def _greedy_nms(boxes, scores, iou_thres, max_det, min_chunk=1024):
    """Indices of the first ``max_det`` boxes kept by greedy NMS; ``boxes`` must be sorted by ``scores`` descending.

    Greedy NMS decides each box from the boxes ranked above it only, so the boxes it keeps from a prefix of the
    ranking are exactly the first of those it keeps from the whole ranking. ``torchvision.ops.nms`` on the CPU costs
    about (boxes x kept boxes), and at a low confidence threshold far more than ``max_det`` boxes survive, so the
    ranking is processed in chunks: each call sees the boxes kept so far (they never suppress each other) followed
    by the next chunk, and the work stops once ``max_det`` boxes are kept. The next chunk's end is extrapolated from
    the rate at which boxes were kept so far. A strictly decreasing rank stands in for the scores so that
    torchvision's internal (unstable) sort keeps our order.
    """
    n = boxes.shape[0]
    if boxes.device.type != "cpu" or n <= min_chunk:
        return torchvision.ops.nms(boxes, scores, iou_thres)[:max_det]
    device = boxes.device
    rank = torch.arange(n, 0, -1, dtype=boxes.dtype, device=device)
    keep = torch.zeros(0, dtype=torch.long, device=device)
    start, end = 0, max(min_chunk, n // 2)
    while True:
        idx = torch.cat((keep, torch.arange(start, end, device=device)))
        keep = idx[torchvision.ops.nms(boxes[idx], rank[idx], iou_thres)]
        kept = keep.shape[0]
        if kept >= max_det or end >= n:
            return keep[:max_det]
        start, end = end, min(n, max(end + 256, int(1.25 * end * max_det / max(kept, 1))))
