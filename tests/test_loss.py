"""YOLOv5 loss (yolo.loss): hand-worked values, label smoothing, focal loss, gains, gradients."""

import math

import pytest
import torch
import torch.nn as nn

from yolo.loss import ComputeLoss, FocalLoss, level_balance, scale_loss_gains, smooth_bce
from yolo.targets import build_targets

HYP = dict(box=0.05, cls=0.5, cls_pw=1.0, obj=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0)
LOG2 = math.log(2.0)
COCO_ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


class FakeDetect(nn.Module):
    """Just the attributes ComputeLoss reads from the model's Detect layer."""

    def __init__(self, nc, anchors_px, strides):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl = len(anchors_px)
        self.na = len(anchors_px[0]) // 2
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32))
        anchors = torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("anchors", anchors / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(2, self.no * self.na, 1) for _ in range(self.nl))


class FakeModel(nn.Module):
    """A tiny model whose train-mode output has the Detect layout: per level (bs, na, ny, nx, no)."""

    def __init__(self, nc=4, anchors_px=COCO_ANCHORS_PX, strides=(8, 16, 32)):
        super().__init__()
        self.detect = FakeDetect(nc, anchors_px, strides)

    def forward(self, x):
        d, out = self.detect, []
        for conv, s in zip(d.m, d.stride):
            y = conv(nn.functional.avg_pool2d(x, int(s)))
            bs, _, ny, nx = y.shape
            out.append(y.view(bs, d.na, d.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return out


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p / (1 - p))


def _deterministic_case():
    """RNG-free predictions and targets for a 64 x 64 input, 3 levels, nc = 4, batch 2."""
    bs, na, nc = 2, 3, 4
    preds = []
    for i, (ny, nx) in enumerate([(8, 8), (4, 4), (2, 2)]):
        x = torch.arange(bs * na * ny * nx * (5 + nc), dtype=torch.float32)
        preds.append((torch.sin(x * 0.37 + i) * 2.0).view(bs, na, ny, nx, 5 + nc))
    targets = torch.tensor(
        [
            [0, 1, 0.30, 0.40, 0.20, 0.30],
            [0, 3, 0.72, 0.55, 0.50, 0.35],
            [1, 0, 0.10, 0.90, 0.08, 0.12],
            [1, 2, 0.52, 0.47, 0.90, 0.80],
            [1, 1, 0.66, 0.21, 0.15, 0.05],
        ]
    )
    return preds, targets


# ---------------------------------------------------------------- helpers


def test_smooth_bce_and_balance():
    assert smooth_bce(0.0) == (1.0, 0.0)
    cp, cn = smooth_bce(0.1)
    assert cp == pytest.approx(0.95) and cn == pytest.approx(0.05)
    assert level_balance(3) == [4.0, 1.0, 0.4]
    assert level_balance(5) == [4.0, 1.0, 0.25, 0.06, 0.02]
    assert level_balance(4) == [4.0, 1.0, 0.25, 0.06]


def test_scale_loss_gains_yolov5n_320():
    hyp = dict(HYP, label_smoothing=0.0)
    out = scale_loss_gains(hyp, nl=3, nc=80, imgsz=320)
    assert out["box"] == pytest.approx(0.05 * 3 / 3)
    assert out["obj"] == pytest.approx(1.0 * (320 / 640) ** 2)  # 0.25
    assert out["cls"] == pytest.approx(0.5 * 80 / 80)
    assert out["label_smoothing"] == 0.0
    assert hyp["obj"] == 1.0  # input untouched
    assert out["anchor_t"] == 4.0  # other keys pass through


def test_scale_loss_gains_other_sizes_and_label_smoothing():
    out = scale_loss_gains(HYP, nl=4, nc=20, imgsz=1280, label_smoothing=0.1)
    assert out["box"] == pytest.approx(0.05 * 0.75)
    assert out["cls"] == pytest.approx(0.5 * 20 / 80 * 0.75)
    assert out["obj"] == pytest.approx(1.0 * 4 * 0.75)
    assert out["label_smoothing"] == 0.1
    assert scale_loss_gains(dict(HYP, label_smoothing=0.2), 3, 80, 640)["label_smoothing"] == 0.2


# ---------------------------------------------------------------- hand-worked loss values


def _one_level_model(nc=1):
    # one level, 4 x 4 grid (stride 16, 64 px input), one anchor of 1 x 1 cells
    return FakeModel(nc=nc, anchors_px=[[16, 16]], strides=(16,))


def test_no_targets_gives_log2_objectness():
    model = FakeModel(nc=4)
    preds = [torch.zeros(2, 3, n, n, 9) for n in (8, 4, 2)]
    hyp = dict(HYP, obj=0.7)
    loss, items = ComputeLoss(model, hyp)(preds, torch.zeros((0, 6)))
    expected_obj = LOG2 * (4.0 + 1.0 + 0.4) * 0.7
    torch.testing.assert_close(items, torch.tensor([0.0, expected_obj, 0.0]))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(2 * expected_obj, rel=1e-6)


def test_all_zero_logits_are_a_perfect_box_and_give_a_known_objectness_bce():
    # Target centre (1.5, 2.5) cells, size 1 x 1 cell: fractions (0.5, 0.5) add no neighbours, tbox = (0.5, 0.5, 1, 1).
    # Zero logits decode to xy = 2 * 0.5 - 0.5 = 0.5 and wh = (2 * 0.5) ** 2 * 1 = 1: the target exactly.
    # Objectness: the matched cell targets CIoU = 1 with pos_weight 2 -> 2 * log 2; 15 other cells -> log 2 each.
    model = _one_level_model(nc=1)
    hyp = dict(HYP, obj_pw=2.0, box=1.0, obj=1.0)
    targets = torch.tensor([[0, 0, 1.5 / 4, 2.5 / 4, 0.25, 0.25]])
    preds = [torch.zeros(1, 1, 4, 4, 6)]
    loss, items = ComputeLoss(model, hyp)(preds, targets)
    box, obj, cls = items.tolist()
    assert box == pytest.approx(0.0, abs=1e-6)
    assert obj == pytest.approx(4.0 * (2 * LOG2 + 15 * LOG2) / 16, rel=1e-5)  # level weight 4.0 for a single level
    assert cls == 0.0  # nc == 1: no class loss
    assert loss.item() == pytest.approx(box + obj, rel=1e-6)


def _perfect_logits(preds, model, targets, hyp):
    """Set the box logits of every assigned cell so that it decodes to its target exactly."""
    d = model.detect
    _, tbox, indices, anch = build_targets(preds, targets, d.anchors, hyp["anchor_t"])
    for p, tb, (b, a, gj, gi), an in zip(preds, tbox, indices, anch):
        p[b, a, gj, gi, 0:2] = _logit((tb[:, :2] + 0.5) / 2)
        p[b, a, gj, gi, 2:4] = _logit(torch.sqrt(tb[:, 2:] / an) / 2)
    return indices


def test_perfect_prediction_has_zero_box_loss_and_smoothed_class_entropy():
    model = FakeModel(nc=3)
    hyp = dict(HYP, box=1.0, cls=1.0, label_smoothing=0.1)
    targets = torch.tensor([[0, 2, 0.41, 0.57, 0.50, 0.45]])  # 32 x 28.8 px: matches anchors on all 3 levels
    preds = [torch.zeros(1, 3, n, n, 8) for n in (8, 4, 2)]
    indices = _perfect_logits(preds, model, targets, hyp)
    assert all(len(ix[0]) > 0 for ix in indices)
    # class logits at the smoothed targets: 0.95 for class 2, 0.05 for the others
    for p, (b, a, gj, gi) in zip(preds, indices):
        p[b, a, gj, gi, 5:] = _logit(torch.tensor([0.05, 0.05, 0.95]))
    for p in preds:
        p.requires_grad_()

    loss, items = ComputeLoss(model, hyp)(preds, targets)
    box, _, cls = items.tolist()
    assert box == pytest.approx(0.0, abs=1e-5)
    # BCE(logit(q), q) is the entropy of q, the same for 0.95 and 0.05; one such mean per level
    entropy = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    assert cls == pytest.approx(3 * entropy, rel=1e-4)

    loss.backward()
    for p, (b, a, gj, gi) in zip(preds, indices):
        # the class logits sit at the minimum of the smoothed BCE: no gradient on them
        torch.testing.assert_close(p.grad[b, a, gj, gi, 5:], torch.zeros(len(b), 3), atol=1e-6, rtol=0)


def test_label_smoothing_targets_are_used():
    model = FakeModel(nc=3)
    loss_fn = ComputeLoss(model, dict(HYP, label_smoothing=0.2))
    assert (loss_fn.cp, loss_fn.cn) == pytest.approx((0.9, 0.1))
    assert (ComputeLoss(model, HYP).cp, ComputeLoss(model, HYP).cn) == (1.0, 0.0)


def test_matches_upstream_v7_reference_values():
    # Values produced by upstream YOLOv5 v7.0's ComputeLoss on the same RNG-free inputs (CPU, float32).
    preds, targets = _deterministic_case()
    cases = [
        (HYP, 12.832704544067383, [0.1420777589082718, 4.9306464195251465, 1.343627691268921]),
        (
            dict(box=0.05, cls=0.3, cls_pw=1.3, obj=0.7, obj_pw=0.8, anchor_t=3.0, fl_gamma=1.5, label_smoothing=0.1),
            4.072633266448975,
            [0.144395112991333, 1.6212821006774902, 0.2706395089626312],
        ),
    ]
    for hyp, total, items in cases:
        loss, got = ComputeLoss(FakeModel(nc=4), hyp)(preds, targets)
        assert loss.item() == pytest.approx(total, rel=1e-5)
        assert got.tolist() == pytest.approx(items, rel=1e-5)


# ---------------------------------------------------------------- focal loss


def test_focal_loss_hand_values():
    fl = FocalLoss(nn.BCEWithLogitsLoss(reduction="none"), gamma=1.5, alpha=0.25)
    z = torch.zeros(2)
    got = fl(z, torch.tensor([0.0, 1.0]))
    expected = torch.tensor([LOG2 * 0.75 * 0.5**1.5, LOG2 * 0.25 * 0.5**1.5])
    torch.testing.assert_close(got, expected)
    mean = FocalLoss(nn.BCEWithLogitsLoss(), gamma=1.5)(z, torch.tensor([0.0, 1.0]))
    assert mean.item() == pytest.approx(expected.mean().item())


def test_focal_loss_keeps_bce_ordering_and_down_weights_easy_examples():
    logits = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    ones = torch.ones(5)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, ones, reduction="none")
    focal = FocalLoss(nn.BCEWithLogitsLoss(reduction="none"), gamma=2.0, alpha=0.5)(logits, ones)
    assert torch.all(bce[1:] < bce[:-1]) and torch.all(focal[1:] < focal[:-1])  # same ordering
    assert torch.all(focal < bce)
    ratio = focal / bce
    assert torch.all(ratio[1:] < ratio[:-1])  # confident (easy) examples are damped the most
    # gamma = 0 and alpha = 0.5 is half the BCE
    half = FocalLoss(nn.BCEWithLogitsLoss(reduction="none"), gamma=0.0, alpha=0.5)(logits, ones)
    torch.testing.assert_close(half, bce * 0.5)


def test_focal_loss_is_used_when_fl_gamma_positive():
    model = FakeModel(nc=4)
    loss_fn = ComputeLoss(model, dict(HYP, fl_gamma=1.5, obj_pw=1.7))
    assert isinstance(loss_fn.BCEcls, FocalLoss) and isinstance(loss_fn.BCEobj, FocalLoss)
    assert loss_fn.BCEobj.loss_fcn.pos_weight.item() == pytest.approx(1.7)
    assert not isinstance(ComputeLoss(model, HYP).BCEcls, FocalLoss)


# ---------------------------------------------------------------- totals and gradients


def test_total_is_batch_size_times_items_and_gradients_flow():
    torch.manual_seed(0)
    model = FakeModel(nc=4)
    x = torch.rand(3, 2, 64, 64)
    preds = model(x)
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.2, 0.3], [2, 3, 0.7, 0.6, 0.4, 0.5]])
    loss, items = ComputeLoss(model, HYP)(preds, targets)
    assert not items.requires_grad and items.shape == (3,)
    assert loss.item() == pytest.approx(3 * items.sum().item(), rel=1e-6)
    assert all(v > 0 for v in items.tolist())
    loss.backward()
    for conv in model.detect.m:
        assert conv.weight.grad is not None
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_anchors_are_read_at_call_time():
    model = FakeModel(nc=4)
    preds, targets = _deterministic_case()
    loss_fn = ComputeLoss(model, HYP)
    before = loss_fn(preds, targets)[1]
    with torch.no_grad():
        model.detect.anchors.mul_(1.5)  # e.g. AutoAnchor after the loss was built
    after = loss_fn(preds, targets)[1]
    assert not torch.allclose(before, after)
    fresh = ComputeLoss(model, HYP)(preds, targets)[1]
    torch.testing.assert_close(after, fresh)


def test_hyp_falls_back_to_model_hyp_and_wrappers_are_unwrapped():
    model = FakeModel(nc=4)
    model.hyp = dict(HYP)
    preds, targets = _deterministic_case()
    a = ComputeLoss(model)(preds, targets)[1]
    b = ComputeLoss(nn.DataParallel(model), HYP)(preds, targets)[1]
    torch.testing.assert_close(a, b)


def test_autobalance_updates_level_weights():
    model = FakeModel(nc=4)
    preds, targets = _deterministic_case()
    loss_fn = ComputeLoss(model, HYP, autobalance=True)
    assert loss_fn.ssi == 1
    loss_fn(preds, targets)
    assert loss_fn.balance[1] == pytest.approx(1.0)  # normalised to the stride-16 level
    assert loss_fn.balance != [4.0, 1.0, 0.4]


def test_with_the_real_detection_model():
    from yolo.models import DetectionModel

    model = DetectionModel("yolov5n", nc=3).train()
    preds = model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.25, 0.7, 0.2, 0.1]])
    hyp = scale_loss_gains(HYP, model.detect.nl, model.detect.nc, 64)
    loss, items = ComputeLoss(model, hyp)(preds, targets)
    assert torch.isfinite(loss).all() and items.shape == (3,)
    loss.backward()
    assert model.detect.m[0].weight.grad.abs().sum() > 0
