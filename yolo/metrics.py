"""Detection metrics: matching predictions to labels, AP, P/R at the best mean F1, confusion matrix, fitness.

All figures follow YOLOv5 v7.0 numerically:

* a prediction is correct at an IoU threshold when it is matched one-to-one to a label of its class
  (:func:`match_predictions`);
* AP is the 101-point interpolated area under the precision envelope (:func:`compute_ap`);
* P and R are read at the confidence that maximises the (smoothed) mean F1 over classes (:func:`ap_per_class`).

This module returns numbers only; :mod:`yolo.plots` draws them (the validator calls it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from yolo.boxes import box_iou

__all__ = [
    "IOU_THRESHOLDS",
    "APResult",
    "DetectionMetrics",
    "ConfusionMatrix",
    "ap_per_class",
    "compute_ap",
    "fitness",
    "match_predictions",
    "smooth",
]

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)  # the mAP@0.5:0.95 thresholds
FITNESS_WEIGHTS = np.array([0.0, 0.0, 0.1, 0.9])  # P, R, mAP50, mAP50-95


def _to_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fitness(metrics):
    """Weighted sum of ``P, R, mAP50, mAP50-95`` (weights 0, 0, 0.1, 0.9).

    ``metrics`` is a 4+ sequence (returns a float) or an ``(n, 4+)`` array (returns ``(n,)``).
    """
    x = np.asarray(metrics, dtype=np.float64)
    if x.ndim == 1:
        return float((x[:4] * FITNESS_WEIGHTS).sum())
    return (x[:, :4] * FITNESS_WEIGHTS).sum(1)


def smooth(y, f=0.05):
    """Box-filter ``y`` (same length out) over an odd window of about ``2 * f * len(y)`` elements, padding with the
    end values.

    The window is YOLOv5's ``round(2 f n) // 2 + 1`` whenever that is odd (as for the 1000-point curves with f = 0.05
    or 0.1); where that would be even, one element less, so that the length is always kept.
    """
    y = np.asarray(y)
    half = round(len(y) * f * 2) // 4
    nf = 2 * half + 1
    pad = np.ones(half)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def _one_to_one(label_i, det_i, pair_iou, resort):
    """Reduce candidate (label, detection) pairs to a one-to-one matching.

    Pairs are ranked by IoU (highest first) and each detection keeps its first pair; the survivors come out in
    detection order. With ``resort`` they are ranked by IoU again before each label keeps its first pair (the
    confusion matrix does this; the mAP matching of YOLOv5 v7.0 does not, so there a label keeps its lowest-index,
    i.e. most confident, detection).
    """
    order = pair_iou.argsort()[::-1]
    label_i, det_i, pair_iou = label_i[order], det_i[order], pair_iou[order]
    first = np.unique(det_i, return_index=True)[1]
    label_i, det_i, pair_iou = label_i[first], det_i[first], pair_iou[first]
    if resort:
        order = pair_iou.argsort()[::-1]
        label_i, det_i = label_i[order], det_i[order]
    first = np.unique(label_i, return_index=True)[1]
    return label_i[first], det_i[first]


def match_predictions(detections, labels, iouv=IOU_THRESHOLDS):
    """Which detections are true positives at each IoU threshold (one image).

    Args:
        detections: ``(n, 6)`` ``x1, y1, x2, y2, conf, cls`` (tensor or array), in the order NMS returned them.
        labels: ``(m, 5)`` ``cls, x1, y1, x2, y2`` in the same pixel space.
        iouv: ``(t,)`` IoU thresholds.

    Returns:
        ``(n, t)`` bool numpy array.

    At each threshold, candidate pairs need IoU >= threshold and equal classes. They are ranked by IoU (highest
    first), each detection keeps its best-ranked label, then each label keeps the detection that comes first
    (i.e. the most confident one), exactly as YOLOv5 v7.0's ``val.py`` does (see :func:`_one_to_one`).
    """
    detections, labels = _to_tensor(detections), _to_tensor(labels)
    correct = np.zeros((detections.shape[0], len(iouv)), dtype=bool)
    if not detections.shape[0] or not labels.shape[0]:
        return correct
    iou = box_iou(labels[:, 1:5], detections[:, :4])  # (m, n)
    thresholds = _to_tensor(iouv).to(device=iou.device, dtype=iou.dtype)
    same_class = labels[:, 0:1] == detections[:, 5]
    for t, threshold in enumerate(thresholds):
        label_i, det_i = torch.nonzero((iou >= threshold) & same_class, as_tuple=True)
        if label_i.shape[0] > 1:
            pair_iou = iou[label_i, det_i].cpu().numpy()
            _, det_i = _one_to_one(label_i.cpu().numpy(), det_i.cpu().numpy(), pair_iou, resort=False)
        correct[_to_numpy(det_i), t] = True
    return correct


def compute_ap(recall, precision):
    """Average precision of one PR curve (recall ascending) as the 101-point interpolated area under its envelope.

    Returns ``(ap, mpre, mrec)``: the AP and the envelope curve with its sentinel points.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # precision envelope (non-increasing)
    x = np.linspace(0, 1, 101)
    ap = np.trapezoid(np.interp(x, mrec, mpre), x)
    return ap, mpre, mrec


class APResult(NamedTuple):
    """Per-class results of :func:`ap_per_class` (rows follow ``classes``)."""

    tp: np.ndarray  # (nc,) true positives at the chosen confidence
    fp: np.ndarray  # (nc,) false positives at the chosen confidence
    p: np.ndarray  # (nc,) precision at the chosen confidence
    r: np.ndarray  # (nc,) recall at the chosen confidence
    f1: np.ndarray  # (nc,)
    ap: np.ndarray  # (nc, t) AP at each IoU threshold
    classes: np.ndarray  # (nc,) int class indices (those with labels)
    px: np.ndarray  # (1000,) confidence (or recall, for ``pr_curve``) axis
    p_curve: np.ndarray  # (nc, 1000) precision vs confidence
    r_curve: np.ndarray  # (nc, 1000) recall vs confidence
    f1_curve: np.ndarray  # (nc, 1000) F1 vs confidence
    pr_curve: np.ndarray  # (nc, 1000) precision vs recall at the first IoU threshold (envelope)
    conf_index: int  # index into ``px`` of the chosen confidence


def ap_per_class(tp, conf, pred_cls, target_cls, eps=1e-16):
    """AP per class and P/R/F1 at the confidence of the best smoothed mean F1.

    Args:
        tp: ``(n, t)`` bool/0-1 array, correctness of each prediction at each IoU threshold.
        conf: ``(n,)`` prediction confidences.
        pred_cls: ``(n,)`` predicted classes.
        target_cls: ``(m,)`` classes of all labels.

    Only classes present in ``target_cls`` are scored; one without predictions gets zeros.
    """
    tp, conf, pred_cls, target_cls = (_to_numpy(a) for a in (tp, conf, pred_cls, target_cls))
    tp = tp.reshape(len(tp), -1) if tp.ndim == 1 else tp
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, nt = np.unique(target_cls, return_counts=True)
    nc, n_iou = classes.shape[0], tp.shape[1]
    px = np.linspace(0, 1, 1000)
    ap = np.zeros((nc, n_iou))
    p_curve, r_curve, pr_curve = np.zeros((nc, 1000)), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(classes):
        mine = pred_cls == c
        if not mine.any():
            continue
        tpc = tp[mine].cumsum(0)
        fpc = (1 - tp[mine]).cumsum(0)
        recall = tpc / (nt[ci] + eps)
        precision = tpc / (tpc + fpc)
        # curves against confidence (decreasing, hence the negated axes for np.interp)
        r_curve[ci] = np.interp(-px, -conf[mine], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-px, -conf[mine], precision[:, 0], left=1)
        for j in range(n_iou):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                pr_curve[ci] = np.interp(px, mrec, mpre)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    i = int(smooth(f1_curve.mean(0), 0.1).argmax()) if nc else 0
    p, r, f1 = p_curve[:, i], r_curve[:, i], f1_curve[:, i]
    tp_at = (r * nt).round()
    fp_at = (tp_at / (p + eps) - tp_at).round()
    return APResult(tp_at, fp_at, p, r, f1, ap, classes.astype(int), px, p_curve, r_curve, f1_curve, pr_curve, i)


class ConfusionMatrix:
    """``(nc + 1, nc + 1)`` counts, rows = predicted class, columns = true class; the last row/column is background.

    Detections below ``conf`` are ignored; a detection and a label are paired when their IoU exceeds ``iou_thres``
    (one-to-one, highest IoU first), whatever their classes.
    """

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def process_batch(self, detections, labels):
        """Add one image: ``detections`` ``(n, 6)`` ``x1, y1, x2, y2, conf, cls`` (or None), ``labels`` ``(m, 5)``
        ``cls, x1, y1, x2, y2`` (a 1-D array of label classes is accepted when ``detections`` is None).

        Follows YOLOv5 v7.0, including that unmatched detections count as background only when at least one pair
        in the image matched.
        """
        labels = _to_tensor(labels)
        if detections is None:
            classes = labels if labels.ndim == 1 else labels[:, 0]
            for gc in classes.int().tolist():
                self.matrix[self.nc, gc] += 1  # missed: background predicted
            return
        detections = _to_tensor(detections)
        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().tolist()
        det_classes = detections[:, 5].int().tolist()
        iou = box_iou(labels[:, 1:5], detections[:, :4])

        label_i, det_i = torch.nonzero(iou > self.iou_thres, as_tuple=True)
        pair_iou = iou[label_i, det_i].cpu().numpy()
        m_label, m_det = label_i.cpu().numpy(), det_i.cpu().numpy()
        if m_label.shape[0] > 1:
            m_label, m_det = _one_to_one(m_label, m_det, pair_iou, resort=True)
        matched = m_label.shape[0] > 0
        for i, gc in enumerate(gt_classes):
            hit = m_label == i
            if matched and hit.sum() == 1:
                self.matrix[det_classes[m_det[hit][0]], gc] += 1  # detected (right or wrong class)
            else:
                self.matrix[self.nc, gc] += 1  # missed
        if matched:
            for i, dc in enumerate(det_classes):
                if not (m_det == i).any():
                    self.matrix[dc, self.nc] += 1  # false alarm on background

    def tp_fp(self):
        """Per-class true and false positives (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]


class DetectionMetrics:
    """Accumulates per-image matches and reduces them to P, R, mAP50, mAP50-95.

    ``update(detections, labels)`` per image (same layouts as :func:`match_predictions`, same pixel space);
    ``compute()`` returns a dict with ``p, r, map50, map`` (means over the classes with labels), per-class arrays
    ``classes`` (the class index of each row), ``class_p``, ``class_r``, ``class_ap50``, ``class_ap`` (AP@0.5:0.95),
    ``nt`` (labels per class, length ``nc`` when given), ``seen`` (images) and the full :class:`APResult` under
    ``result``. As in YOLOv5, everything is zero (and ``result`` None) unless at least one detection matched.
    """

    def __init__(self, nc=None, iouv=IOU_THRESHOLDS):
        self.nc = nc
        self.iouv = iouv
        self.reset()

    def reset(self):
        self._correct, self._conf, self._pred_cls, self._target_cls = [], [], [], []
        self.seen = 0

    def update(self, detections, labels):
        detections = _to_tensor(detections) if detections is not None else torch.zeros((0, 6))
        labels = _to_tensor(labels) if labels is not None else torch.zeros((0, 5))
        self.seen += 1
        if not detections.shape[0] and not labels.shape[0]:
            return
        self._correct.append(match_predictions(detections, labels, self.iouv))
        self._conf.append(_to_numpy(detections[:, 4]))
        self._pred_cls.append(_to_numpy(detections[:, 5]))
        self._target_cls.append(_to_numpy(labels[:, 0]))

    def compute(self):
        n_iou = len(self.iouv)
        correct = np.concatenate(self._correct, 0) if self._correct else np.zeros((0, n_iou), bool)
        conf = np.concatenate(self._conf) if self._conf else np.zeros(0)
        pred_cls = np.concatenate(self._pred_cls) if self._pred_cls else np.zeros(0)
        target_cls = np.concatenate(self._target_cls) if self._target_cls else np.zeros(0)
        nt = np.bincount(target_cls.astype(int), minlength=self.nc or 0)
        out = dict(p=0.0, r=0.0, map50=0.0, map=0.0, nt=nt, seen=self.seen, result=None, classes=np.zeros(0, int),
                   class_p=np.zeros(0), class_r=np.zeros(0), class_ap50=np.zeros(0), class_ap=np.zeros(0))
        if correct.any():
            res = ap_per_class(correct, conf, pred_cls, target_cls)
            ap50, ap = res.ap[:, 0], res.ap.mean(1)
            out.update(p=float(res.p.mean()), r=float(res.r.mean()), map50=float(ap50.mean()), map=float(ap.mean()),
                       result=res, classes=res.classes, class_p=res.p, class_r=res.r, class_ap50=ap50, class_ap=ap)
        return out
