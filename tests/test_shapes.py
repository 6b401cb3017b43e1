"""The synthetic shapes dataset (determinism, layout, labels) and the dataset plots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from yolo.data import shapes
from yolo.data.plots import plot_images, plot_labels, run_in_background

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 24, 6  # index 19 of train is a background-only image; 0, 10, 20 are PNGs


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent.name in ("train", "val")
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return shapes.generate_shapes(tmp_path_factory.mktemp("ds") / "shapes", seed=0, n_train=N_TRAIN, n_val=N_VAL)


def _read_labels(path: Path) -> np.ndarray:
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def test_layout_and_counts(dataset):
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        images = sorted((dataset / "images" / split).iterdir())
        labels = sorted((dataset / "labels" / split).glob("*.txt"))
        assert len(images) == n and len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
        suffixes = {p.suffix for p in images}
        assert suffixes == {".jpg", ".png"}
    train_labels = [_read_labels(p) for p in sorted((dataset / "labels" / "train").glob("*.txt"))]
    counts = [len(x) for x in train_labels]
    assert counts[19] == 0  # background-only image (empty label file)
    assert all(1 <= c <= shapes.MAX_OBJECTS for i, c in enumerate(counts) if i != 19)
    allx = np.concatenate(train_labels)
    assert set(np.unique(allx[:, 0]).astype(int)) <= set(range(len(shapes.CLASS_NAMES)))
    assert len(np.unique(allx[:, 0])) >= 4  # several classes appear
    assert (allx[:, 1:] > 0).all() and (allx[:, 1:] <= 1).all()
    assert allx[:, 3:].min() > 0.05 and allx[:, 3:].max() < 0.85  # objects are reasonably large
    for p in sorted((dataset / "images" / "train").iterdir())[:5]:
        img = cv2.imread(str(p))
        assert img is not None and shapes.IMG_MIN <= min(img.shape[:2]) and max(img.shape[:2]) <= shapes.IMG_MAX


def test_deterministic_and_idempotent(dataset, tmp_path):
    again = shapes.generate_shapes(tmp_path / "again", seed=0, n_train=N_TRAIN, n_val=N_VAL)
    assert _hashes(again) == _hashes(dataset)
    marker = json.loads((again / shapes.MARKER).read_text())
    assert marker["seed"] == 0 and marker["version"] == shapes.SHAPES_VERSION

    # a second call with the same parameters does not touch the files
    probe = again / "images" / "train" / "train_00001.jpg"
    mtime = probe.stat().st_mtime_ns
    shapes.generate_shapes(again, seed=0, n_train=N_TRAIN, n_val=N_VAL)
    assert probe.stat().st_mtime_ns == mtime

    # another seed regenerates (and a stale cache next to the labels goes away)
    (again / "labels" / "train.cache").write_text("stale")
    shapes.generate_shapes(again, seed=1, n_train=N_TRAIN, n_val=N_VAL)
    assert json.loads((again / shapes.MARKER).read_text())["seed"] == 1
    assert _hashes(again) != _hashes(dataset)
    assert not (again / "labels" / "train.cache").exists()
    assert len(list((again / "images" / "train").iterdir())) == N_TRAIN

    # an incomplete dataset (no marker) is regenerated
    (again / shapes.MARKER).unlink()
    shapes.generate_shapes(again, seed=0, n_train=N_TRAIN, n_val=N_VAL)
    assert _hashes(again) == _hashes(dataset)


def test_labels_match_drawn_objects(dataset):
    for index in (0, 10):  # PNG images: lossless, so the file equals the rendering exactly
        img, objects = shapes.render_image(0, "train", index)
        stem = shapes.image_name("train", index)
        saved = cv2.imread(str(dataset / "images" / "train" / f"{stem}.png"))
        assert np.array_equal(saved, img)
        lab = _read_labels(dataset / "labels" / "train" / f"{stem}.txt")
        assert len(lab) == len(objects) >= 1
        h, w = img.shape[:2]
        later = np.zeros((h, w), bool)  # pixels covered by objects drawn afterwards
        for o, row in zip(reversed(objects), lab[::-1]):
            x1, y1, x2, y2 = o.box
            assert row[0] == o.cls
            assert row[1:] == pytest.approx([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h],
                                            abs=1e-6)
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # tight box
            visible = o.mask & ~later
            assert visible.sum() >= 0.7 * o.mask.sum()  # overlaps are limited
            # every visible pixel of the object lies inside its box
            vy, vx = np.nonzero(visible)
            assert ((vx >= x1) & (vx < x2) & (vy >= y1) & (vy < y2)).all()
            later |= o.mask


def test_data_yaml_describes_the_generator():
    cfg = yaml.safe_load((ROOT / "conf" / "data" / "shapes.yaml").read_text())
    assert cfg["path"] == "shapes" and cfg["download"] == "shapes"
    assert cfg["train"] == "images/train" and cfg["val"] == "images/val"
    names = cfg["names"]
    names = [names[i] for i in range(len(names))] if isinstance(names, dict) else names
    assert tuple(names) == shapes.CLASS_NAMES


def test_plots_on_a_shapes_batch(dataset, tmp_path):
    images, targets, labels, paths = [], [], [], []
    for i, p in enumerate(sorted((dataset / "images" / "train").iterdir())[:6]):
        img = cv2.resize(cv2.imread(str(p)), (128, 128))
        images.append(img[..., ::-1].transpose(2, 0, 1))
        lab = _read_labels(dataset / "labels" / "train" / f"{p.stem}.txt")
        labels.append(lab)
        targets += [[i, *row] for row in lab]
        paths.append(p)
    batch = np.stack(images)
    targets = np.array(targets)
    grid = plot_images(batch, targets, paths, tmp_path / "train_batch0.jpg", shapes.CLASS_NAMES)
    assert grid.shape == (3 * 128, 3 * 128, 3) and (tmp_path / "train_batch0.jpg").stat().st_size > 0
    # predictions with a confidence column, float images in [0, 1], normalised -> pixel boxes
    preds = np.concatenate([targets[:, :2], targets[:, 2:] * 128, np.full((len(targets), 1), 0.9)], 1)
    plot_images(batch / 255.0, preds, None, tmp_path / "pred.jpg", {i: n for i, n in enumerate(shapes.CLASS_NAMES)})
    assert cv2.imread(str(tmp_path / "pred.jpg")).shape == (384, 384, 3)
    t = run_in_background(plot_labels, np.concatenate(labels), shapes.CLASS_NAMES, tmp_path / "labels.jpg")
    t.join(timeout=60)
    assert cv2.imread(str(tmp_path / "labels.jpg")) is not None
