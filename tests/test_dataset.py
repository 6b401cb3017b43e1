"""YoloDataset and create_dataloader: upstream's val geometry, training samples, seeding, caching, weights."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo.data.config import DatasetError
from yolo.data.dataset import Draw, YoloDataset, image_weights_from_labels, rect_batch_shapes
from yolo.data.labels import img2label_paths
from yolo.data.loader import EpochSampler, create_dataloader

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "images" / "train2017"
HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0,
           flipud=0.5, fliplr=0.5, mosaic=1.0, mixup=0.5)
SIZES = [(48, 32), (32, 48), (40, 40), (64, 20), (30, 60), (50, 45), (36, 36), (80, 40), (40, 70), (44, 33)]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "yolo-cache"))


@pytest.fixture
def toy(tmp_path) -> Path:
    """10 images (w, h from SIZES) with 1-2 boxes each, classes 0..2; image 9 is a background."""
    images = tmp_path / "toy" / "images" / "train"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        f = images / f"{i:02d}.jpg"
        cv2.imwrite(str(f), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        label = Path(img2label_paths([f])[0])
        label.parent.mkdir(parents=True, exist_ok=True)
        rows = [] if i == 9 else [f"{i % 3} 0.5 0.5 0.5 0.4"] + ([f"{(i + 1) % 3} 0.3 0.3 0.2 0.2"] if i % 2 else [])
        label.write_text("\n".join(rows))
    return images


# ------------------------------------------------------------------ validation geometry
def test_load_image_resizes_long_side(toy):
    d = YoloDataset(toy, img_size=64, nc=3)
    i = d.im_files.index(str(toy / "00.jpg"))
    img, hw0, hw = d.load_image(i)
    raw = cv2.imread(d.im_files[i])
    assert hw0 == (32, 48) and hw == (43, 64) == img.shape[:2]  # ceil(32 * 64 / 48)
    np.testing.assert_array_equal(img, cv2.resize(raw, (64, 43), interpolation=cv2.INTER_LINEAR))  # upscaling
    small = YoloDataset(toy, img_size=32, nc=3)
    np.testing.assert_array_equal(small.load_image(i)[0], cv2.resize(raw, (32, 22), interpolation=cv2.INTER_AREA))


def test_rect_batch_shapes_rule():
    shapes = np.array([[640, 480], [480, 640], [640, 640], [640, 320]])  # w, h
    order, bs = rect_batch_shapes(shapes, batch_size=2, img_size=640, stride=32, pad=0.5)
    np.testing.assert_array_equal(order, [3, 0, 2, 1])  # by h / w
    np.testing.assert_array_equal(bs, [[512, 672], [672, 672]])  # ceil([0.75, 1] * 20 + 0.5) * 32, mixed batch


@pytest.mark.skipif(not COCO128.is_dir(), reason="shared COCO128 not available")
@pytest.mark.parametrize("img_size, batch, shapes, pixel_sum, pad", [
    (640, 32, [[448, 672], [512, 672], [672, 672], [672, 608]], 70979842, (16.0, 29.5)),
    (320, 16, [[256, 352]] * 5 + [[352, 352], [352, 320], [352, 256]], 22802245, (16.0, 30.5)),
])
def test_val_matches_upstream_on_coco128(img_size, batch, shapes, pixel_sum, pad):
    """Numbers produced by upstream YOLOv5 7.0.14's LoadImagesAndLabels(rect=True, pad=0.5, stride=32)."""
    d = YoloDataset(COCO128, img_size=img_size, batch_size=batch, rect=True, pad=0.5)
    assert d.batch_shapes.tolist() == shapes
    assert [Path(d.im_files[i]).name for i in (0, 1, 63, 127)] == [
        "000000000357.jpg", "000000000472.jpg", "000000000009.jpg", "000000000415.jpg"]
    img, labels, path, (hw0, (ratio, p)) = d[5]
    assert Path(path).name == "000000000431.jpg" and hw0 == (389, 640) and p == pad
    assert tuple(img.shape) == (3, *shapes[0]) and int(img.sum()) == pixel_sum


def test_val_item_shapes_rescale_boxes_back(toy):
    d = YoloDataset(toy, img_size=64, batch_size=4, rect=True, pad=0.5, nc=3)
    for i in range(len(d)):
        img, labels, path, ((h0, w0), ((rh, rw), (dw, dh))) = d[i]
        assert img.dtype == torch.uint8 and img.is_contiguous() and img.shape[1:] == tuple(d.batch_shapes[d.batch[i]])
        H, W = img.shape[1:]
        x = (labels[:, 2].numpy() * W - dw) / rw  # back to original pixels, as val's scale_boxes does
        y = (labels[:, 3].numpy() * H - dh) / rh
        np.testing.assert_allclose(x / w0, d.labels[i][:, 1], atol=1e-4)
        np.testing.assert_allclose(y / h0, d.labels[i][:, 2], atol=1e-4)


def test_val_image_is_rgb_of_letterboxed_bgr(toy):
    from yolo.data.augment import letterbox

    d = YoloDataset(toy, img_size=64, nc=3)
    img, *_ = d[0]
    expected, _, _ = letterbox(d.load_image(0)[0], 64, auto=False, scaleup=False)
    np.testing.assert_array_equal(img.numpy(), expected[:, :, ::-1].transpose(2, 0, 1))


# ------------------------------------------------------------------ training samples
def test_augmented_sample_is_valid(toy):
    d = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3)
    boxes = 0
    for i in range(len(d)):
        img, labels, _, shapes = d[i]
        assert tuple(img.shape) == (3, 64, 64) and shapes is None  # mosaic
        assert labels.shape[1] == 6 and (labels[:, 2:] >= 0).all() and (labels[:, 2:] <= 1).all()
        assert set(labels[:, 1].tolist()) <= {0.0, 1.0, 2.0}
        boxes += len(labels)
    assert boxes >= len(d)  # the checks above saw boxes, not only empty label arrays


def test_seeded_samples_are_reproducible(toy):
    a = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, seed=1)
    b = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, seed=1)
    c = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, seed=2)
    same = [torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(len(a))]
    assert all(same) and sum(len(a[i][1]) for i in range(len(a))) >= len(a)  # boxes compared, not empty arrays
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(len(a)))
    b.set_epoch(1)
    assert not all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert torch.equal(b[Draw(3, 0, 3)][0], a[3][0])  # a Draw key fixes the randomness explicitly


def test_mosaic_decodes_only_tiles_it_samples(toy, monkeypatch):
    hyp = {**HYP, "mixup": 0.0}
    lazy = YoloDataset(toy, img_size=64, augment=True, hyp=hyp, nc=3)
    eager = YoloDataset(toy, img_size=64, augment=True, hyp=hyp, nc=3, cache="ram")  # tiles are arrays
    decoded = []
    load = lazy.load_image
    monkeypatch.setattr(lazy, "load_image", lambda i: decoded.append(i) or load(i))
    for epoch in range(3):
        lazy.set_epoch(epoch)
        eager.set_epoch(epoch)
        for i in range(len(lazy)):
            (img, labels, *_), (img2, labels2, *_) = lazy[i], eager[i]
            assert torch.equal(img, img2) and torch.equal(labels, labels2)
    assert 0 < len(decoded) < 4 * 3 * len(lazy)  # some tiles never reached the output


def test_mosaic_falls_back_when_scanned_shape_is_wrong(toy):
    a = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3)
    b = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3)
    b.shapes = b.shapes + 7  # as if the scan had mis-predicted every decoded size
    for i in range(len(a)):
        (img, labels, *_), (img2, labels2, *_) = a[i], b[i]
        assert torch.equal(img, img2) and torch.equal(labels, labels2)


def test_letterbox_branch_when_mosaic_off(toy):
    d = YoloDataset(toy, img_size=64, augment=True, hyp={**HYP, "mosaic": 0.0}, nc=3)
    img, labels, _, shapes = d[1]
    assert tuple(img.shape) == (3, 64, 64) and shapes[0] == (48, 32)


def test_single_cls(toy):
    d = YoloDataset(toy, img_size=64, nc=1, single_cls=True)
    assert all((lb[:, 0] == 0).all() for lb in d.labels)


def test_training_needs_labels(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DatasetError, match="no labels"):
        YoloDataset(images, img_size=32, augment=True)
    assert len(YoloDataset(images, img_size=32)) == 1  # validation on backgrounds is fine


def test_exif_orientation_applied(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(images / "r.jpg", exif=exif)
    d = YoloDataset(images, img_size=40)
    assert d.shapes.tolist() == [[20, 40]]  # width, height as displayed
    assert d.load_image(0)[0].shape[:2] == (40, 20)


# ------------------------------------------------------------------ caching
def test_ram_cache_gives_identical_samples(toy):
    plain = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3)
    cached = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, cache="ram")
    assert cached.cache_bytes == sum(im.nbytes for im in cached.ims) > 0
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], cached[i][0])


def test_auto_cache_keeps_images_in_ram_only_when_they_fit(toy, monkeypatch, caplog):
    import yolo.data.dataset as ds

    plain = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3)
    with caplog.at_level("INFO", logger="yolo"):
        auto = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, cache="auto")
    assert auto.cache_bytes > 0 and all(im is not None for im in auto.ims)
    assert "cache=auto: ram" in caplog.text
    assert all(torch.equal(plain[i][0], auto[i][0]) for i in range(len(plain)))
    # over the limit (or over the share of the available memory): no cache, and the line says why
    monkeypatch.setattr(ds, "AUTO_CACHE_MAX_BYTES", auto.cache_bytes // 2)
    caplog.clear()
    with caplog.at_level("INFO", logger="yolo"):
        big = YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, cache="auto")
    assert big.cache_bytes == 0 and all(im is None for im in big.ims)
    assert "cache=auto: none" in caplog.text and "over the" in caplog.text
    monkeypatch.setattr(ds, "AUTO_CACHE_MAX_BYTES", 2**40)
    monkeypatch.setattr(ds, "_available_memory", lambda: auto.cache_bytes)  # 25% of it is too little
    assert YoloDataset(toy, img_size=64, augment=True, hyp=HYP, nc=3, cache="auto").cache_bytes == 0


def test_disk_cache_falls_back_when_folder_read_only(toy, tmp_path):
    toy.chmod(0o555)
    try:
        d = YoloDataset(toy, img_size=64, nc=3, cache="disk")
    finally:
        toy.chmod(0o755)
    assert not list(toy.glob("*.npy"))
    assert all(f.parent == tmp_path / "yolo-cache" and f.exists() for f in d.npy_files)
    plain = YoloDataset(toy, img_size=64, nc=3)
    assert all(torch.equal(plain[i][0], d[i][0]) for i in range(len(d)))


def test_disk_cache_next_to_images(toy):
    d = YoloDataset(toy, img_size=64, nc=3, cache="disk")
    assert sorted(toy.glob("*.npy")) == sorted(d.npy_files) and d.cache_bytes > 0


# ------------------------------------------------------------------ loader
def _batches(loader, epochs=2):
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [(imgs.clone(), targets.clone(), paths) for imgs, targets, paths, _ in loader]
    return out


def test_loader_batches_independent_of_worker_count(toy):
    kw = dict(hyp=HYP, augment=True, shuffle=True, seed=3, nc=3)
    l0, _ = create_dataloader(toy, 64, 4, 32, workers=0, **kw)
    l2, _ = create_dataloader(toy, 64, 4, 32, workers=2, **kw)
    assert l2.num_workers == 2 and l2.persistent_workers
    b0, b2 = _batches(l0), _batches(l2)
    assert len(b0) == 6
    for (i0, t0, p0), (i2, t2, p2) in zip(b0, b2):
        assert p0 == p2 and torch.equal(i0, i2) and torch.equal(t0, t2)
    assert b0[0][2] != b0[3][2]  # reshuffled in epoch 1


def test_collate_writes_image_index(toy):
    loader, _ = create_dataloader(toy, 64, 4, 32, workers=0, nc=3)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (4, 3, 64, 64) and imgs.dtype == torch.uint8 and len(paths) == len(shapes) == 4
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3} and targets.shape[1] == 6
    assert targets[:, 0].tolist() == sorted(targets[:, 0].tolist())


def test_rect_disables_shuffle_with_warning(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="yolo"):
        loader, d = create_dataloader(toy, 64, 4, 32, rect=True, shuffle=True, workers=0, nc=3)
    assert "incompatible with shuffle" in caplog.text and not loader.sampler.shuffle


def test_epoch_advances_when_not_set(toy):
    loader, d = create_dataloader(toy, 64, 4, 32, workers=0, shuffle=True, nc=3)
    first = [p for _, _, paths, _ in loader for p in paths]
    second = [p for _, _, paths, _ in loader for p in paths]
    assert d.epoch == 2 and first != second and sorted(first) == sorted(second)


def test_image_weights(toy):
    labels = [np.array([[0, .5, .5, .1, .1], [0, .5, .5, .1, .1]]), np.array([[2, .5, .5, .1, .1]]), np.zeros((0, 5))]
    np.testing.assert_allclose(image_weights_from_labels(labels, [0.1, 0.2, 0.7]), [0.2, 0.7, 0.0])
    loader, d = create_dataloader(toy, 64, 4, 32, workers=0, image_weights=True, augment=True, hyp=HYP, nc=3)
    assert not loader.persistent_workers and not d.rect
    d.update_image_weights([0.0, 0.0, 1.0])  # only images holding class 2 can be drawn
    has2 = {i for i, lb in enumerate(d.labels) if (lb[:, 0] == 2).any()}
    drawn = set(EpochSampler(d, seed=0).order(0).tolist())
    assert drawn and drawn <= has2
    imgs, *_ = next(iter(loader))
    assert imgs.shape == (4, 3, 64, 64)
