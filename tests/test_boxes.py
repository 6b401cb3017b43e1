"""Box conversions, clipping, rescaling and IoU."""

import math

import numpy as np
import pytest
import torch

from yolo.boxes import (
    bbox_iou,
    box_area,
    box_iou,
    clip_boxes,
    scale_boxes,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_conversions_round_trip(lib):
    xywh = np.array([[50.0, 40.0, 20.0, 10.0, 7.0], [5.0, 5.0, 10.0, 10.0, 8.0]])  # extra column carried along
    x = torch.tensor(xywh) if lib == "torch" else xywh
    xyxy = xywh2xyxy(x)
    assert type(xyxy) is type(x)
    assert np.asarray(xyxy).tolist() == [[40, 35, 60, 45, 7], [0, 0, 10, 10, 8]]
    assert np.allclose(np.asarray(xyxy2xywh(xyxy)), xywh)
    assert np.asarray(x).tolist() == xywh.tolist()  # inputs untouched


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_normalised_conversions(lib):
    xywhn = np.array([[0.5, 0.25, 0.2, 0.1]])
    x = torch.tensor(xywhn) if lib == "torch" else xywhn
    xyxy = xywhn2xyxy(x, w=200, h=100, padw=3, padh=4)
    assert np.allclose(np.asarray(xyxy), [[83, 24, 123, 34]])
    back = xyxy2xywhn(xyxy - torch.tensor([3, 4, 3, 4.0]) if lib == "torch" else xyxy - [3, 4, 3, 4], w=200, h=100)
    assert np.allclose(np.asarray(back), xywhn)


def test_xyxy2xywhn_clip_leaves_input_alone():
    xyxy = np.array([[-10.0, 20.0, 110.0, 60.0]])
    out = xyxy2xywhn(xyxy, w=100, h=50, clip=True, eps=1.0)  # clipped to [0, 99] x [0, 49]
    assert np.allclose(out, [[49.5 / 100, 34.5 / 50, 99 / 100, 29 / 50]])
    assert xyxy.tolist() == [[-10.0, 20.0, 110.0, 60.0]]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_clip_boxes_in_place(lib):
    b = np.array([[-5.0, -1.0, 120.0, 30.0], [10.0, 60.0, 20.0, 70.0]])
    x = torch.tensor(b) if lib == "torch" else b
    out = clip_boxes(x, (50, 100))  # (height, width)
    assert out is x
    assert np.asarray(x).tolist() == [[0, 0, 100, 30], [10, 50, 20, 50]]


def test_scale_boxes_computed_letterbox():
    # 480x640 (h, w) image letterboxed into 640x640: gain 1, 80 px padding top and bottom
    boxes = torch.tensor([[10.0, 90.0, 110.0, 190.0], [0.0, 0.0, 700.0, 700.0]])
    view = boxes[:, :4]
    scale_boxes((640, 640), view, (480, 640))
    assert boxes.tolist() == [[10, 10, 110, 110], [0, 0, 640, 480]]  # the view was rescaled in place, and clipped

    # 1280x640 (h, w) into 320x320: gain 0.25, 80 px padding left and right
    boxes = np.array([[88.0, 8.0, 128.0, 168.0], [8.0, 8.0, 328.0, 168.0]])
    scale_boxes((320, 320), boxes, (1280, 640))
    assert boxes.tolist() == [[32, 32, 192, 672], [0, 32, 640, 672]]


def test_scale_boxes_ratio_pad_uses_first_gain():
    boxes = torch.tensor([[16.0 + 10 * 0.5, 8.0 + 20 * 0.5, 16.0 + 30 * 0.5, 8.0 + 40 * 0.5]])
    scale_boxes((100, 100), boxes, (200, 200), ratio_pad=((0.5, 0.25), (16, 8)))
    assert torch.allclose(boxes, torch.tensor([[10.0, 20.0, 30.0, 40.0]]))


def test_box_area_and_box_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    assert box_area(a).tolist() == [100, 4]
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert torch.allclose(iou, torch.tensor([[1 / 3, 0, 1], [0, 0, 0.04]]), atol=1e-6)
    assert np.allclose(box_iou(a.numpy(), b.numpy()), iou.numpy())


def test_bbox_iou_variants():
    box = torch.tensor([[50.0, 50.0, 20.0, 10.0]])
    for kind in ({}, {"GIoU": True}, {"DIoU": True}, {"CIoU": True}):
        assert bbox_iou(box, box, **kind).item() == pytest.approx(1.0, abs=1e-6)

    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    b = torch.tensor([5.0, 0.0, 15.0, 10.0])
    iou = 50 / 150
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(iou, rel=1e-5)
    assert bbox_iou(xyxy2xywh(a[None]), xyxy2xywh(b[None])).item() == pytest.approx(iou, rel=1e-5)
    # enclosing box 15 x 10 (area 150 = union): GIoU = IoU; centres 5 apart, diagonal^2 = 325
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(iou, rel=1e-5)
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(iou - 25 / 325, rel=1e-5)
    # same aspect ratio: CIoU = DIoU
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(iou - 25 / 325, rel=1e-5)

    # disjoint boxes: GIoU negative
    c = torch.tensor([20.0, 0.0, 30.0, 10.0])
    assert bbox_iou(a, c, xywh=False, GIoU=True).item() == pytest.approx(-(300 - 200) / 300, rel=1e-5)


def test_ciou_aspect_term_and_gradient():
    a = torch.tensor([[10.0, 10.0, 4.0, 2.0]], requires_grad=True)  # cx, cy, w, h
    b = torch.tensor([[10.0, 10.0, 2.0, 2.0]])
    ciou = bbox_iou(a, b, CIoU=True)
    assert ciou.shape == (1, 1)
    iou = 4 / 8
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    alpha = v / (v - iou + 1)
    # centres coincide; the enclosing box is 4 x 2 (diagonal^2 = 20) but the centre term is 0
    assert ciou.item() == pytest.approx(iou - v * alpha, rel=1e-5)
    ciou.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
