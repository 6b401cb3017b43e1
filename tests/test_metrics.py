"""Metrics: hand-worked cases and upstream's own COCO128 predictions scored against the dataset labels."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from yolo.boxes import clip_boxes, xywhn2xyxy
from yolo.metrics import (
    ConfusionMatrix,
    DetectionMetrics,
    ap_per_class,
    compute_ap,
    fitness,
    match_predictions,
    smooth,
)
from yolo.plots import plot_ap_curves, plot_confusion_matrix

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO128 = SHARED / "datasets" / "coco128"
PREDICTIONS = SHARED / "reference" / "yolov5n_coco128_640_predictions.json"


# --- compute_ap ------------------------------------------------------------------------------------------------------


def test_compute_ap_perfect_detector():
    # np.interp takes the last of the repeated recall-1 sentinels (precision 0) at x = 1, so the last of the 100
    # trapezoids is only half: a perfect class scores 0.995, as in YOLOv5.
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(0.995)
    assert mrec.tolist() == [0.0, 0.5, 1.0, 1.0] and mpre.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_compute_ap_hand_worked():
    # 2 labels; predictions by confidence: TP, FP, TP -> recall 0.5, 0.5, 1.0; precision 1, 0.5, 2/3.
    # Envelope: 1, 1, 2/3, 2/3, 0 at recall 0, 0.5, 0.5, 1, 1. Sampled at 0, 0.01, ..., 1: 1 below 0.5, 2/3 from 0.5
    # (np.interp takes the last repeated point) up to 0.99, and 0 at 1.
    ap, mpre, _ = compute_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert mpre.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 2 / 3, 0.0])
    assert ap == pytest.approx(0.49 * 1 + 0.01 * (1 + 2 / 3) / 2 + 0.49 * 2 / 3 + 0.01 * (2 / 3) / 2)


def test_compute_ap_nothing_found():
    ap, _, _ = compute_ap(np.array([0.0, 0.0]), np.array([0.0, 0.0]))
    assert ap == 0.0


# --- match_predictions -----------------------------------------------------------------------------------------------


def test_match_one_label_two_overlapping_detections():
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]])
    detections = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0, 0.9, 0],  # exact
            [0.0, 0.0, 10.0, 9.0, 0.8, 0],  # IoU 0.9
            [0.0, 0.0, 10.0, 10.0, 0.7, 1],  # wrong class
        ]
    )
    correct = match_predictions(detections, labels)
    assert correct.shape == (3, 10) and correct.dtype == bool
    assert correct[0].all()
    assert not correct[1].any() and not correct[2].any()


def test_match_thresholds_and_greedy_by_detection_order():
    labels = torch.tensor([[3, 0.0, 0.0, 10.0, 10.0], [3, 20.0, 0.0, 30.0, 10.0]])
    detections = torch.tensor(
        [
            [0.0, 0.0, 10.0, 6.0, 0.9, 3],  # IoU 0.6 with label 0
            [20.0, 0.0, 30.0, 10.0, 0.8, 3],  # exact on label 1
        ]
    )
    correct = match_predictions(detections, labels)
    # IoU 0.6 -> correct at 0.50, 0.55, 0.60 only
    assert correct[0].tolist() == [True, True, True] + [False] * 7
    assert correct[1].all()


def test_match_empty_inputs():
    assert match_predictions(torch.zeros((0, 6)), torch.tensor([[0, 0, 0, 1, 1.0]])).shape == (0, 10)
    assert not match_predictions(torch.tensor([[0, 0, 1, 1, 0.5, 0]]), torch.zeros((0, 5))).any()


# --- ap_per_class, smooth, fitness -----------------------------------------------------------------------------------


def test_ap_per_class_perfect_and_missing_class():
    tp = np.ones((2, 10), bool)
    res = ap_per_class(tp, np.array([0.9, 0.8]), np.array([0, 0]), np.array([0, 0, 5]))
    assert res.classes.tolist() == [0, 5]
    assert res.ap[0] == pytest.approx(np.full(10, 0.995))
    assert res.ap[1] == pytest.approx(np.zeros(10))  # labelled class without predictions
    assert res.p[0] == pytest.approx(1.0) and res.r[0] == pytest.approx(1.0)
    assert res.tp.tolist() == [2.0, 0.0]
    assert res.px.shape == (1000,) and res.f1_curve.shape == (2, 1000) and res.pr_curve.shape == (2, 1000)


def test_smooth_keeps_constants_and_length():
    y = np.full(1000, 0.3)
    assert smooth(y, 0.1) == pytest.approx(y)
    assert smooth(np.arange(100.0)).shape == (100,)  # window 5 here (YOLOv5's formula would give an even 6)
    assert smooth(np.arange(10.0), 0.2).tolist() == pytest.approx([1 / 3, 1, 2, 3, 4, 5, 6, 7, 8, 26 / 3])


def test_fitness():
    assert fitness([0.5, 0.5, 0.6, 0.4]) == pytest.approx(0.1 * 0.6 + 0.9 * 0.4)
    out = fitness(np.array([[1, 1, 1, 1, 7.0], [0, 0, 0.5, 0.0, 7.0]]))
    assert out == pytest.approx([1.0, 0.05])


def test_detection_metrics_accumulates():
    m = DetectionMetrics(nc=3)
    m.update(torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0]]), torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]]))
    m.update(None, torch.tensor([[2, 0.0, 0.0, 10.0, 10.0]]))  # missed
    m.update(torch.zeros((0, 6)), torch.zeros((0, 5)))  # background image
    out = m.compute()
    assert out["seen"] == 3 and out["nt"].tolist() == [1, 0, 1]
    assert out["classes"].tolist() == [0, 2]
    assert out["class_ap50"] == pytest.approx([0.995, 0.0]) and out["class_ap"] == pytest.approx([0.995, 0.0])
    assert out["map50"] == pytest.approx(0.4975) and out["r"] == pytest.approx(0.5)

    m.reset()
    m.update(torch.tensor([[50.0, 50.0, 60.0, 60.0, 0.9, 0]]), torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]]))
    out = m.compute()
    assert (out["p"], out["r"], out["map50"], out["map"], out["result"]) == (0.0, 0.0, 0.0, 0.0, None)


# --- ConfusionMatrix -------------------------------------------------------------------------------------------------


def test_confusion_matrix():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0], [1, 20.0, 0.0, 30.0, 10.0], [1, 50.0, 50.0, 60.0, 60.0]])
    detections = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0, 0.9, 0],  # right
            [20.0, 0.0, 30.0, 10.0, 0.8, 0],  # wrong class
            [80.0, 80.0, 90.0, 90.0, 0.7, 1],  # background
            [0.0, 0.0, 10.0, 10.0, 0.1, 1],  # below conf: ignored
        ]
    )
    cm.process_batch(detections, labels)
    cm.process_batch(None, torch.tensor([1.0]))  # image without detections
    expected = np.array([[1, 1, 0], [0, 0, 1], [0, 2, 0]])
    assert (cm.matrix == expected).all()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]


# --- upstream's own predictions on COCO128 ---------------------------------------------------------------------------


def _coco128_labels():
    """{stem: (m, 5) float32 tensor cls, x1, y1, x2, y2 in original pixels} for every image."""
    labels = {}
    for image in sorted((COCO128 / "images" / "train2017").glob("*.jpg")):
        with Image.open(image) as im:
            w, h = im.size  # COCO128 has no EXIF rotations
        path = COCO128 / "labels" / "train2017" / f"{image.stem}.txt"
        rows = np.loadtxt(path, dtype=np.float32, ndmin=2) if path.exists() else np.zeros((0, 5), np.float32)
        if len(rows):
            _, first = np.unique(rows, axis=0, return_index=True)
            if len(first) < len(rows):  # exact duplicates, dropped as upstream does
                rows = rows[first]
        lb = torch.from_numpy(rows.reshape(-1, 5))
        lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h)
        clip_boxes(lb[:, 1:], (h, w))
        labels[image.stem] = lb
    return labels


@pytest.mark.skipif(not PREDICTIONS.exists(), reason="shared reference data not available")
def test_reference_predictions_coco128():
    predictions = defaultdict(list)
    for d in json.loads(PREDICTIONS.read_text()):  # kept in upstream's order (per image, confidence descending)
        x, y, w, h = d["bbox"]
        predictions[d["image_id"]].append([x, y, x + w, y + h, d["score"], d["category_id"]])
    labels = _coco128_labels()
    assert len(labels) == 128 and sum(len(v) for v in labels.values()) == 929

    metrics = DetectionMetrics(nc=80)
    for image_id, rows in predictions.items():
        metrics.update(torch.tensor(rows, dtype=torch.float32), labels.pop(f"{image_id:012d}"))
    for lb in labels.values():  # images without predictions still count their labels
        metrics.update(None, lb)
    out = metrics.compute()
    print(f"P {out['p']:.6f} R {out['r']:.6f} mAP50 {out['map50']:.6f} mAP50-95 {out['map']:.6f}")
    assert out["seen"] == 128 and out["nt"].sum() == 929
    assert out["p"] == pytest.approx(0.57151, abs=5e-5)
    assert out["r"] == pytest.approx(0.50824, abs=5e-5)
    assert out["map50"] == pytest.approx(0.55969, abs=5e-5)
    assert out["map"] == pytest.approx(0.36079, abs=5e-5)


# --- plots -----------------------------------------------------------------------------------------------------------


def test_plots_write_files(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    res = ap_per_class(rng.random((n, 10)) < 0.5, rng.random(n), rng.integers(0, 3, n), rng.integers(0, 3, 60))
    paths = plot_ap_curves(res, tmp_path / "val", {0: "cat", 1: "dog", 2: "bird"}, dpi=40)
    assert [p.name for p in paths] == ["PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"]
    cm = ConfusionMatrix(nc=3)
    cm.matrix = rng.integers(0, 9, (4, 4)).astype(float)
    paths.append(plot_confusion_matrix(cm.matrix, ["cat", "dog", "bird"], tmp_path / "confusion_matrix.png", dpi=40))
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
