"""Non-maximum suppression."""

import pytest
import torch
import torchvision

from yolo.nms import _greedy_nms, non_max_suppression


def _pred(rows, nc=3):
    """(1, n, 5 + nc) prediction from rows of (cx, cy, w, h, obj, {class: score})."""
    out = torch.zeros((1, len(rows), 5 + nc))
    for i, (cx, cy, w, h, obj, scores) in enumerate(rows):
        out[0, i, :5] = torch.tensor([cx, cy, w, h, obj])
        for c, s in scores.items():
            out[0, i, 5 + c] = s
    return out


def test_overlapping_boxes_of_a_class_are_suppressed():
    pred = _pred(
        [
            (50, 50, 20, 20, 0.9, {0: 0.9}),  # kept
            (51, 50, 20, 20, 0.8, {0: 0.9}),  # IoU ~0.9 with the first: suppressed
            (150, 150, 20, 20, 0.7, {0: 0.9}),  # elsewhere: kept
            (50, 50, 20, 20, 0.6, {1: 0.9}),  # other class on the same spot: kept
            (90, 90, 10, 10, 0.2, {0: 0.9}),  # objectness below the threshold
            (10, 10, 10, 10, 0.9, {0: 0.2}),  # score 0.18 below the threshold
        ]
    )
    (out,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45)
    assert out.shape == (3, 6)
    assert out[:, 4].tolist() == pytest.approx([0.81, 0.63, 0.54])  # obj x cls, descending
    assert out[:, 5].tolist() == [0, 0, 1]
    assert out[0, :4].tolist() == [40, 40, 60, 60]  # xyxy


def test_agnostic_classes_filter_and_tuple_input():
    pred = _pred([(50, 50, 20, 20, 0.9, {0: 0.9}), (50, 50, 20, 20, 0.6, {1: 0.9}), (150, 50, 20, 20, 0.6, {2: 0.9})])
    assert len(non_max_suppression(pred, agnostic=True)[0]) == 2
    (out,) = non_max_suppression((pred, None), classes=[1, 2])
    assert out[:, 5].tolist() == [1, 2]


def test_multi_label_and_max_det():
    pred = _pred([(50, 50, 20, 20, 0.9, {0: 0.9, 2: 0.5}), (150, 50, 20, 20, 0.8, {1: 0.9})])
    (single,) = non_max_suppression(pred, conf_thres=0.25)
    assert single[:, 5].tolist() == [0, 1]
    (multi,) = non_max_suppression(pred, conf_thres=0.25, multi_label=True)
    assert multi[:, 5].tolist() == [0, 1, 2]
    assert multi[:, 4].tolist() == pytest.approx([0.81, 0.72, 0.45])
    (top,) = non_max_suppression(pred, conf_thres=0.25, multi_label=True, max_det=2)
    assert top[:, 5].tolist() == [0, 1]


def test_empty_images():
    pred = torch.zeros((2, 10, 8))
    out = non_max_suppression(pred)
    assert len(out) == 2 and all(o.shape == (0, 6) for o in out)


def test_chunked_greedy_nms_equals_full_nms():
    g = torch.Generator().manual_seed(0)
    n = 5000
    xy = torch.rand((n, 2), generator=g) * 600
    wh = torch.rand((n, 2), generator=g) * 80 + 4
    boxes = torch.cat((xy, xy + wh), 1) + torch.randint(0, 5, (n, 1), generator=g) * 7680.0
    scores = torch.rand(n, generator=g).sort(descending=True).values
    for iou_thres, max_det in ((0.6, 300), (0.3, 300), (0.6, 4000)):
        full = torchvision.ops.nms(boxes, scores, iou_thres)[:max_det]
        assert torch.equal(_greedy_nms(boxes, scores, iou_thres, max_det), full)
