"""The YOLOv5 training loss: CIoU box regression, objectness and classification BCE.

``ComputeLoss(model, hyp)(preds, targets)`` returns ``(loss * batch_size, [box, obj, cls])`` as YOLOv5 v7.0 does:

* targets are assigned to cells/anchors by :func:`yolo.targets.build_targets`;
* box loss: mean ``1 - CIoU`` between the decoded prediction (``xy = 2 * sigmoid - 0.5``,
  ``wh = (2 * sigmoid) ** 2 * anchor``) and the target, per level;
* objectness: BCE over every anchor/cell, where assigned cells target the (detached, clamped at 0) CIoU of their
  prediction; the levels are weighted ``[4.0, 1.0, 0.4]`` (P3-P5) or ``[4.0, 1.0, 0.25, 0.06, 0.02]`` (more levels);
* classification: BCE on the assigned cells with (optionally smoothed) one-hot targets, only when ``nc > 1``;
* the three parts are multiplied by ``hyp['box']``, ``hyp['obj']`` and ``hyp['cls']``. Those gains are normally
  first adapted to the model and image size with :func:`scale_loss_gains`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from yolo.boxes import bbox_iou
from yolo.models.yolo import unwrap_model
from yolo.targets import build_targets

__all__ = ["ComputeLoss", "FocalLoss", "smooth_bce", "scale_loss_gains", "level_balance"]


def smooth_bce(eps: float = 0.1) -> tuple[float, float]:
    """Positive and negative BCE targets under label smoothing ``eps``: ``(1 - eps / 2, eps / 2)``."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def level_balance(nl: int) -> list[float]:
    """Objectness weight of each detection level (small-stride levels weigh more)."""
    return [4.0, 1.0, 0.4] if nl == 3 else [4.0, 1.0, 0.25, 0.06, 0.02][:nl]


def scale_loss_gains(hyp: Mapping, nl: int, nc: int, imgsz: int, label_smoothing: float | None = None) -> dict:
    """A copy of ``hyp`` with the loss gains adapted as upstream's train.py does.

    ``box *= 3 / nl``; ``cls *= nc / 80 * 3 / nl``; ``obj *= (imgsz / 640) ** 2 * 3 / nl``. ``label_smoothing``
    is set from the argument when given, else kept from ``hyp`` (default 0.0). The input is not modified.
    """
    out = dict(hyp)
    layers = 3 / nl
    out["box"] = hyp["box"] * layers
    out["cls"] = hyp["cls"] * nc / 80 * layers
    out["obj"] = hyp["obj"] * (imgsz / 640) ** 2 * layers
    out["label_smoothing"] = float(label_smoothing if label_smoothing is not None else hyp.get("label_smoothing", 0.0))
    return out


class FocalLoss(nn.Module):
    """Focal loss on top of a ``BCEWithLogitsLoss`` (its ``pos_weight`` and ``reduction`` are honoured).

    Each element's BCE is multiplied by ``alpha_t * (1 - p_t) ** gamma`` where ``p_t`` is the predicted
    probability of the target value and ``alpha_t = alpha`` for targets of 1 (``1 - alpha`` for 0); soft
    targets interpolate linearly.
    """

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        pos_weight = getattr(self.loss_fcn, "pos_weight", None)
        loss = F.binary_cross_entropy_with_logits(pred, true, pos_weight=pos_weight, reduction="none")
        prob = pred.sigmoid()
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def _device_of(model, detect) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return detect.anchors.device


class ComputeLoss:
    """YOLOv5's loss for a detection model (see the module docstring).

    Args:
        model: a model exposing ``.detect`` (``nc``, ``nl``, ``na``, ``anchors`` (nl, na, 2) in grid units,
            ``stride``), possibly wrapped in (Distributed)DataParallel.
        hyp: hyperparameters with ``box``, ``obj``, ``cls``, ``cls_pw``, ``obj_pw``, ``anchor_t``, ``fl_gamma`` and
            optionally ``label_smoothing``; ``None`` falls back to ``model.hyp``.
        autobalance: adapt the per-level objectness weights during training (upstream's option, off by default).

    The anchors are read from the Detect layer on every call, so moving the model or re-fitting anchors after
    construction is safe.
    """

    sort_obj_iou = False  # write objectness targets in increasing IoU order when several targets share a cell
    gr = 1.0  # objectness target = (1 - gr) + gr * iou

    def __init__(self, model, hyp: Mapping | None = None, autobalance: bool = False):
        model = unwrap_model(model)
        detect = model.detect
        h = dict(hyp if hyp is not None else model.hyp)
        device = _device_of(model, detect)

        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        self.cp, self.cn = smooth_bce(h.get("label_smoothing", 0.0))
        gamma = h.get("fl_gamma", 0.0)
        if gamma > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, gamma), FocalLoss(bce_obj, gamma)

        self.detect = detect
        self.nl, self.na, self.nc = int(detect.nl), int(detect.na), int(detect.nc)
        self.balance = level_balance(self.nl)
        self.ssi = [int(s) for s in detect.stride].index(16) if autobalance else 0
        self.BCEcls, self.BCEobj = bce_cls, bce_obj
        self.hyp, self.autobalance, self.device = h, autobalance, device

    @property
    def anchors(self) -> torch.Tensor:
        return self.detect.anchors

    def build_targets(self, preds, targets):
        """Per-level ``(tcls, tbox, indices, anch)``; see :func:`yolo.targets.build_targets`."""
        return build_targets(preds, targets, self.anchors.to(self.device), self.hyp["anchor_t"])

    def __call__(self, preds, targets):
        """``preds``: list of ``(bs, na, ny, nx, 5 + nc)`` raw outputs; ``targets``: ``(n, 6)`` normalised rows.

        Returns ``(total, items)``: ``total`` of shape ``(1,)`` = batch size x (box + obj + cls) with gradients,
        ``items`` the detached ``[box, obj, cls]`` (each already multiplied by its gain).
        """
        dev = self.device
        lbox = torch.zeros(1, device=dev)
        lobj = torch.zeros(1, device=dev)
        lcls = torch.zeros(1, device=dev)
        tcls, tbox, indices, anch = self.build_targets(preds, targets.to(dev))

        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=dev)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), dim=1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anch[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True).squeeze(-1)
                lbox = lbox + (1.0 - iou).mean()

                score = iou.detach().clamp(0).type(tobj.dtype)
                if self.sort_obj_iou:
                    order = score.argsort()
                    b, a, gj, gi, score = b[order], a[order], gj[order], gi[order], score[order]
                if self.gr < 1:
                    score = (1.0 - self.gr) + self.gr * score
                tobj[b, a, gj, gi] = score

                if self.nc > 1:
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=dev), tcls[i]] = self.cp
                    lcls = lcls + self.BCEcls(pcls, t)

            obji = self.BCEobj(pi[..., 4], tobj)
            lobj = lobj + obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()

        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()
