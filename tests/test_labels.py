"""Image/label verification, the parallel scan and its cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from yolo.data.config import DatasetError
from yolo.data.labels import (LabelScan, img2label_paths, label_cache_path, list_image_files, scan_dataset,
                              verify_image_label, writable_cache_path)

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "images" / "train2017"


def make_image(path: Path, w: int = 32, h: int = 24, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def pair(root: Path, name: str = "a", labels: str | None = "0 0.5 0.5 0.2 0.2\n", **kw) -> tuple[str, str]:
    img = make_image(root / "images" / f"{name}.jpg", **kw)
    label = Path(img2label_paths([img])[0])
    if labels is not None:
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(labels)
    return str(img), str(label)


def check(img, label, nc=80, **kw):
    return verify_image_label(img, label, nc, **kw)


# ------------------------------------------------------------------ paths
def test_img2label_paths_replaces_last_images_folder():
    p = os.path.join(os.sep, "data", "images", "set", "images", "x.one.JPG")
    assert img2label_paths([p]) == [os.path.join(os.sep, "data", "images", "set", "labels", "x.one.txt")]


def test_list_image_files_from_folder_and_txt(tmp_path):
    a = make_image(tmp_path / "images" / "sub" / "a.png")
    b = make_image(tmp_path / "images" / "b.jpg")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text(f"images/b.jpg\n{a}\n\n")
    assert list_image_files(tmp_path / "images") == sorted([str(a), str(b)])
    assert list_image_files([tmp_path / "list.txt"]) == sorted([str(a), str(b)])
    with pytest.raises(DatasetError, match="does not exist"):
        list_image_files(tmp_path / "nope")


# ------------------------------------------------------------------ one pair
def test_good_pair(tmp_path):
    r = check(*pair(tmp_path, labels="3 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n", w=40, h=30))
    assert r.status == "labelled" and r.size == (40, 30) and not r.message
    np.testing.assert_allclose(r.labels, [[3, 0.5, 0.5, 0.2, 0.2], [1, 0.1, 0.1, 0.1, 0.1]])
    assert r.labels.dtype == np.float32


def test_truncated_jpeg_kept_with_warning_file_unchanged(tmp_path):
    img, label = pair(tmp_path, w=64, h=64)
    data = Path(img).read_bytes()
    Path(img).write_bytes(data[: len(data) * 3 // 4])
    r = check(img, label)
    assert r.status == "labelled" and "truncated JPEG" in r.message
    assert Path(img).read_bytes() == data[: len(data) * 3 // 4]


def test_zero_byte_image_is_corrupt(tmp_path):
    img, label = pair(tmp_path)
    Path(img).write_bytes(b"")
    r = check(img, label)
    assert r.status == "corrupt" and img in r.message and r.labels is None


def test_unreadable_format_is_corrupt(tmp_path):
    img, label = pair(tmp_path)
    Path(img).write_text("this is not a picture")
    assert check(img, label).status == "corrupt"


def test_image_under_10_pixels_is_corrupt(tmp_path):
    r = check(*pair(tmp_path, w=9, h=40))
    assert r.status == "corrupt" and "under 10 pixels" in r.message


@pytest.mark.parametrize("row", ["0 0.5 0.5 0.2", "0 0.5 0.5 0.2 0.2 0.3", "0 a b c d"])
def test_label_with_wrong_columns_is_corrupt(tmp_path, row):
    r = check(*pair(tmp_path, labels=f"0 0.5 0.5 0.1 0.1\n{row}\n"))
    assert r.status == "corrupt" and "line 2" in r.message


@pytest.mark.parametrize("row, why", [("0 -0.1 0.5 0.2 0.2", "negative"), ("0 0.5 1.2 0.2 0.2", "out of bounds"),
                                      ("-1 0.5 0.5 0.2 0.2", "non-negative integer")])
def test_label_out_of_range_values_are_corrupt(tmp_path, row, why):
    r = check(*pair(tmp_path, labels=row + "\n"))
    assert r.status == "corrupt" and why in r.message


def test_rounding_tolerance_is_clipped(tmp_path):
    r = check(*pair(tmp_path, labels="0 0.5 0.5 1.000001 0.2\n"))
    assert r.status == "labelled" and r.labels[0, 3] == 1.0


def test_polygon_row_becomes_its_box(tmp_path):
    r = check(*pair(tmp_path, labels="2 0.1 0.2 0.5 0.2 0.5 0.6\n"))
    np.testing.assert_allclose(r.labels, [[2, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)


def test_duplicate_rows_dropped_with_warning(tmp_path):
    r = check(*pair(tmp_path, labels="1 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n1 0.5 0.5 0.2 0.2\n"))
    assert r.status == "labelled" and "1 duplicate" in r.message
    np.testing.assert_allclose(r.labels[:, 0], [1, 0])  # first occurrences, file order


def test_class_id_beyond_nc_is_an_error_naming_file_and_line(tmp_path):
    img, label = pair(tmp_path, labels="0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=f"{label}:2: class id 7 .* nc=5"):
        check(img, label, nc=5)
    assert check(img, label, nc=5, single_cls=True).status == "labelled"


def test_empty_and_missing_label_files_are_backgrounds(tmp_path):
    empty = check(*pair(tmp_path, "e", labels="\n  \n"))
    missing = check(*pair(tmp_path, "m", labels=None))
    assert (empty.status, missing.status) == ("empty", "missing")
    assert empty.labels.shape == missing.labels.shape == (0, 5)


def test_exif_rotated_jpeg(tmp_path):
    path = tmp_path / "images" / "rot.jpg"
    path.parent.mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored (40 wide, 20 high) image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    r = check(str(path), img2label_paths([path])[0])
    assert r.size == (20, 40)  # width, height as displayed
    loaded = cv2.imread(str(path))
    assert loaded.shape[:2] == (40, 20)  # OpenCV applies the orientation too
    assert loaded[:10].mean() > 200 and loaded[-10:].mean() < 50  # the band is now at the top


# ------------------------------------------------------------------ scan + cache
def small_set(root: Path, n: int = 4) -> list[str]:
    for i in range(n):
        pair(root, f"im{i}", labels=f"{i % 3} 0.5 0.5 0.2 0.2\n", seed=i)
    return list_image_files(root / "images")


def test_scan_counts_and_cache_roundtrip(tmp_path):
    files = small_set(tmp_path)
    pair(tmp_path, "bg", labels=None)
    Path(pair(tmp_path, "bad")[0]).write_bytes(b"")
    files = list_image_files(tmp_path / "images")
    cache = tmp_path / "labels.cache"
    scan = scan_dataset(files, 80, cache, workers=2)
    assert (scan.labelled, scan.backgrounds, scan.corrupt, scan.total, scan.instances) == (4, 1, 1, 6, 4)
    assert len(scan.im_files) == 5 and scan.shapes.shape == (5, 2) and not scan.from_cache
    again = scan_dataset(files, 80, cache)
    assert again.from_cache and again.im_files == scan.im_files and again.summary == scan.summary
    for a, b in zip(again.labels, scan.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.shapes, scan.shapes)
    assert not scan_dataset(files, 79, cache).from_cache  # nc is part of the key


def test_stale_cache_is_rebuilt(tmp_path):
    files = small_set(tmp_path)
    cache = tmp_path / "labels.cache"
    scan_dataset(files, 80, cache)
    label = Path(img2label_paths(files[:1])[0])
    label.write_text("2 0.5 0.5 0.2 0.2\n")  # same size, new content and mtime
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    scan = scan_dataset(files, 80, cache)
    assert not scan.from_cache and scan.labels[0][0, 0] == 2


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    files = small_set(tmp_path)
    cache = tmp_path / "labels.cache"
    cache.write_bytes(b"\x93NUMPY garbage")
    scan = scan_dataset(files, 80, cache)
    assert not scan.from_cache and scan.labelled == 4
    assert scan_dataset(files, 80, cache).from_cache  # rewritten


def test_unwritable_cache_location_warns_and_continues(tmp_path, caplog):
    files = small_set(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="yolo"):
        scan = scan_dataset(files, 80, blocker / "sub" / "labels.cache")
    assert scan.labelled == 4 and "not writable" in caplog.text


def test_read_only_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "cachedir"))
    try:
        target = writable_cache_path(ro / "labels.cache")
    finally:
        ro.chmod(0o755)
    assert target.parent == tmp_path / "cachedir" and target.name.endswith("labels.cache")
    assert writable_cache_path(tmp_path / "x.cache") == tmp_path / "x.cache"


def test_all_corrupt_is_one_clear_error(tmp_path):
    for i in range(3):
        Path(pair(tmp_path, f"c{i}")[0]).write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images.*all 3"):
        scan_dataset(list_image_files(tmp_path / "images"), 80, None)


def test_label_cache_path_beside_upstreams_with_a_name_of_its_own(tmp_path):
    labels = [str(tmp_path / "labels" / "train" / "a.txt")]
    assert label_cache_path(labels) == tmp_path / "labels" / "train.yolo-hydra.cache"  # upstream: train.cache
    lst = tmp_path / "train.txt"
    lst.write_text("")
    assert label_cache_path(labels, [lst]) == tmp_path / "train.yolo-hydra.cache"


@pytest.mark.skipif(not COCO128.is_dir(), reason="shared COCO128 not available")
def test_scan_coco128(tmp_path):
    scan = scan_dataset(list_image_files(COCO128), 80, tmp_path / "coco128.cache", workers=2)
    assert isinstance(scan, LabelScan)
    assert (scan.total, scan.labelled, scan.backgrounds, scan.corrupt, scan.instances) == (128, 126, 2, 0, 929)
    assert scan.summary.endswith("126 images, 2 backgrounds, 0 corrupt")
    assert (tmp_path / "coco128.cache").is_file()


def test_png_image_is_valid(tmp_path):
    """A plain PNG scans as a good image (reading EXIF before verify() used to mark every PNG corrupt)."""
    import cv2

    img = tmp_path / "images" / "a.png"
    img.parent.mkdir(parents=True)
    cv2.imwrite(str(img), np.full((32, 48, 3), 200, np.uint8))
    lbl = tmp_path / "labels" / "a.txt"
    lbl.parent.mkdir(parents=True)
    lbl.write_text("0 0.5 0.5 0.2 0.2\n")
    res = verify_image_label(str(img), str(lbl), nc=1)
    assert res.status == "labelled" and res.size == (48, 32), res
