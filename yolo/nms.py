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

    # Objectness gate for the whole batch at once, then split per image.
    candidates = prediction[..., 4] > conf_thres
    counts = candidates.sum(1).tolist()
    rows = prediction[candidates].split(counts)

    output = []
    for x in rows:
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
            keep = conf.view(-1) > conf_thres
            det = torch.cat((boxes[keep], conf[keep], j[keep].to(x.dtype)), 1)
        if wanted is not None:
            det = det[(det[:, 5:6] == wanted).any(1)]
        if not det.shape[0]:
            output.append(prediction.new_zeros((0, 6)))
            continue

        det = det[det[:, 4].sort(descending=True, stable=True).indices[:max_nms]]
        shifted = det[:, :4] + det[:, 5:6] * (0 if agnostic else max_wh)  # keep classes apart
        output.append(det[_greedy_nms(shifted, det[:, 4], iou_thres, max_det)])
    return output


def _greedy_nms(boxes, scores, iou_thres, max_det, first_chunk=1024):
    """Indices of the first ``max_det`` boxes kept by greedy NMS; ``boxes`` must be sorted by ``scores`` descending.

    Greedy NMS decides each box from the boxes ranked above it only, so the boxes it keeps from a prefix of the
    ranking are exactly the first of those it keeps from the whole. On the CPU, where ``torchvision.ops.nms`` costs
    about (boxes x kept boxes), the ranking is therefore processed in growing chunks, each preceded by the boxes
    kept so far (which never suppress each other), and the work stops once ``max_det`` boxes are kept. A strictly
    decreasing rank replaces the scores inside torchvision so that its internal sort keeps our order.
    """
    n = boxes.shape[0]
    if boxes.is_cuda or n <= first_chunk:
        return torchvision.ops.nms(boxes, scores, iou_thres)[:max_det]
    rank = torch.arange(n, 0, -1, dtype=boxes.dtype, device=boxes.device)
    keep = torch.zeros(0, dtype=torch.long, device=boxes.device)
    start, chunk = 0, first_chunk
    while start < n and keep.shape[0] < max_det:
        end = min(n, start + chunk)
        idx = torch.cat((keep, torch.arange(start, end, device=boxes.device)))
        keep = idx[torchvision.ops.nms(boxes[idx], rank[idx], iou_thres)]
        start, chunk = end, chunk * 2
    return keep[:max_det]
