"""What the data side trusts from files it did not write: label rows, images, caches, and what the user sees."""

from __future__ import annotations

import builtins
import io
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo.data import config as data_config
from yolo.data.dataset import YoloDataset
from yolo.data.labels import img2label_paths, list_image_files, scan_dataset, verify_image_label

GOOD = "0 0.5 0.5 0.2 0.2\n"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CACHE_DIR", str(tmp_path / "yolo-cache"))


def image(path: Path, w: int = 48, h: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path


def labelled_set(root: Path, rows: dict[str, str]) -> list[str]:
    """One image per entry of ``rows`` (name → label file text) under ``root/images``; the sorted image list."""
    for i, (name, text) in enumerate(rows.items()):
        label = Path(img2label_paths([image(root / "images" / f"{name}.jpg", seed=i)])[0])
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(text, encoding="utf-8")
    return list_image_files(root / "images")


# ------------------------------------------------------------------ label rows
@pytest.mark.parametrize("row", [
    "nan 0.5 0.5 0.2 0.2",  # class id
    "inf 0.5 0.5 0.2 0.2",
    "0 nan 0.5 0.2 0.2",  # coordinates
    "0 0.5 0.5 inf 0.2",
    "0 0.5 -inf 0.2 0.2",
    "1 0.1 0.2 0.5 NaN 0.5 0.6",  # a polygon (segment) row
    "2 0.1 0.2 0.5 0.2 0.5 0.6 Infinity 0.3",
])
def test_non_finite_label_value_skips_that_file_naming_file_and_line(tmp_path, caplog, row):
    files = labelled_set(tmp_path, {"a": GOOD, "bad": f"{GOOD}{row}\n", "c": "1 0.3 0.3 0.1 0.1\n"})
    with caplog.at_level(logging.WARNING, logger="yolo"):
        scan = scan_dataset(files, 80, tmp_path / "scan.cache", workers=2)
    assert (scan.labelled, scan.corrupt) == (2, 1)
    assert [Path(f).stem for f in scan.im_files] == ["a", "c"]  # the other files are kept
    assert np.isfinite(np.concatenate(scan.labels)).all()
    label_file = img2label_paths([tmp_path / "images" / "bad.jpg"])[0]
    warnings = [r.getMessage() for r in caplog.records if "bad.jpg" in r.getMessage()]
    assert len(warnings) == 1 and f"{label_file}, line 2" in warnings[0] and "non-finite" in warnings[0]


def test_utf8_bom_label_file_is_read(tmp_path):
    img = image(tmp_path / "images" / "a.jpg")
    label = Path(img2label_paths([img])[0])
    label.parent.mkdir(parents=True)
    label.write_bytes(b"\xef\xbb\xbf" + b"2 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n")
    r = verify_image_label(img, label, 80)
    assert r.status == "labelled" and not r.message
    np.testing.assert_allclose(r.labels[:, 0], [2, 1])


def test_utf8_bom_image_list_is_read(tmp_path):
    a, b = image(tmp_path / "images" / "a.jpg"), image(tmp_path / "images" / "b.jpg")
    lst = tmp_path / "train.txt"
    lst.write_bytes("\ufeffimages/a.jpg\nimages/b.jpg\n".encode())
    assert list_image_files(lst) == [str(a), str(b)]


def test_oversized_label_file_is_corrupt_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr("yolo.data.labels.MAX_LABEL_BYTES", 1000)
    img = image(tmp_path / "images" / "a.jpg")
    label = Path(img2label_paths([img])[0])
    label.parent.mkdir(parents=True)
    label.write_text(GOOD * 100)  # 1,800 bytes
    r = verify_image_label(img, label, 80)
    assert r.status == "corrupt" and str(label) in r.message and "limit" in r.message


# ------------------------------------------------------------------ images the decoder cannot read
def _jpeg_with_bogus_huffman_table() -> bytes:
    """A JPEG whose markers parse (PIL opens and verifies it) but whose Huffman table libjpeg rejects."""
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    data = bytearray(buf.tobytes())
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 21] = b"\xff" * 16  # code counts summing far over 256
    return bytes(data)


def _png_with_broken_image_data() -> bytes:
    """A PNG with a valid header and chunk CRCs (PIL's verify() passes) whose compressed pixels do not inflate."""
    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    png = buf.tobytes()
    at = png.index(b"IDAT")
    n = struct.unpack(">I", png[at - 4: at])[0]
    body = bytearray(png[at + 4: at + 4 + n])
    body[2:20] = b"\xff" * 18
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    return png[: at + 4] + bytes(body) + crc + png[at + 8 + n:]


@pytest.mark.parametrize("name, make", [("bad.jpg", _jpeg_with_bogus_huffman_table),
                                        ("bad.png", _png_with_broken_image_data)])
def test_undecodable_image_with_valid_header_is_rejected_by_the_scan(tmp_path, caplog, name, make):
    from PIL import Image

    files = labelled_set(tmp_path, {"a": GOOD, "b": GOOD})
    bad = tmp_path / "images" / name
    bad.write_bytes(make())
    Path(img2label_paths([bad])[0]).write_text(GOOD)
    with Image.open(bad) as im:  # the header is fine: the old scan's check
        im.verify()
    assert cv2.imread(str(bad)) is None  # but the loader's decoder cannot read it
    with caplog.at_level(logging.WARNING, logger="yolo"):
        d = YoloDataset(tmp_path / "images", img_size=64, nc=80)
    assert sorted(Path(f).name for f in d.im_files) == ["a.jpg", "b.jpg"] and len(files) == 2
    assert any(str(bad) in r.getMessage() and "corrupt image" in r.getMessage() for r in caplog.records)
    assert all(d[i][0].shape[0] == 3 for i in range(len(d)))  # every image that reaches the loader loads


# ------------------------------------------------------------------ our own label cache
def _upstream_cache(path: Path) -> bytes:
    """A label cache in upstream YOLOv5's format (a pickled dict saved with np.save), as its bytes."""
    x = {"hash": "0" * 32, "version": 0.6, "results": (1, 0, 0, 0, 1), "msgs": [], "labels": []}
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_label_cache_is_ours_and_upstreams_is_neither_read_nor_written(tmp_path, monkeypatch):
    labelled_set(tmp_path, {"a": GOOD, "b": "1 0.3 0.3 0.1 0.1\n"})
    upstream = tmp_path / "labels.cache"  # the labels folder is tmp_path/labels: upstream's <labels dir>.cache
    content = _upstream_cache(upstream)
    mtime = upstream.stat().st_mtime_ns
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    first = YoloDataset(tmp_path / "images", img_size=64, nc=80)
    second = YoloDataset(tmp_path / "images", img_size=64, nc=80)
    monkeypatch.undo()
    ours = tmp_path / "labels.yolo-hydra.cache"
    assert ours.is_file() and str(ours) in opened
    assert str(upstream) not in opened
    assert upstream.read_bytes() == content and upstream.stat().st_mtime_ns == mtime
    assert second.im_files == first.im_files and not list(tmp_path.glob(".*.tmp"))


def _npz_bytes(arrays: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for k, v in arrays.items():
            member = io.BytesIO()
            np.save(member, v)
            z.writestr(f"{k}.npy", member.getvalue())
    return buf.getvalue()


def test_hostile_label_cache_is_ignored_without_allocating(tmp_path):
    from yolo.data.labels import CACHE_VERSION, dataset_hash, load_label_cache, save_label_cache

    files = labelled_set(tmp_path, {"a": GOOD})
    key = dataset_hash(files, img2label_paths(files), "nc=80")
    cache = tmp_path / "c.cache"
    scan = scan_dataset(files, 80, cache)
    assert load_label_cache(cache, key) is not None
    good = dict(np.load(cache, allow_pickle=False))
    # a header that claims 8 TB of labels in a file of a few hundred bytes
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 5)})
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as z:
        for k, v in good.items():
            member = io.BytesIO()
            if k == "labels":
                member.write(header.getvalue() + b"\0" * 20)
            else:
                np.save(member, v)
            z.writestr(f"{k}.npy", member.getvalue())
    for hostile in (huge.getvalue(), _npz_bytes(good, zipfile.ZIP_DEFLATED),
                    _npz_bytes({**good, "lengths": good["lengths"] + 5}),
                    _npz_bytes({**good, "labels": np.full_like(good["labels"], np.nan)}),
                    _npz_bytes({**good, "messages": np.array([{"x": 1}], dtype=object)})):
        cache.write_bytes(hostile)
        assert load_label_cache(cache, key) is None
    assert int(good["version"]) == CACHE_VERSION and save_label_cache(cache, scan, key)
    assert load_label_cache(cache, key).labelled == 1


# ------------------------------------------------------------------ disk image cache
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_disk_cache_ignores_a_foreign_npy_beside_the_image(tmp_path):
    labelled_set(tmp_path, {"a": GOOD, "b": GOOD})
    images = tmp_path / "images"
    np.save(images / "a.npy", np.zeros((5, 5, 3), np.uint8))  # not this image: another size
    stale = images / f".b.npy.{_dead_pid()}.0badc0de.tmp"  # what a killed writer left
    stale.write_bytes(b"half a file")
    plain = YoloDataset(images, img_size=64, nc=80)
    cached = YoloDataset(images, img_size=64, nc=80, cache="disk")
    assert all(torch.equal(plain[i][0], cached[i][0]) for i in range(len(plain)))
    assert np.load(images / "a.npy").shape == (40, 48, 3)  # rewritten with the decoded image
    assert not list(images.glob(".*.tmp"))


def test_stale_label_cache_temp_is_removed(tmp_path):
    labelled_set(tmp_path, {"a": GOOD})
    stale = tmp_path / f".labels.yolo-hydra.cache.{_dead_pid()}.0badc0de.tmp"
    stale.write_bytes(b"half a cache")
    YoloDataset(tmp_path / "images", img_size=64, nc=80)
    assert (tmp_path / "labels.yolo-hydra.cache").is_file() and not stale.exists()


# ------------------------------------------------------------------ what the user sees
def test_shapes_generation_says_so_and_shows_progress(tmp_path, caplog, capsys):
    from yolo.data.shapes import generate_shapes

    root = tmp_path / "shapes"
    with caplog.at_level(logging.INFO, logger="yolo"):
        generate_shapes(root, seed=0, n_train=4, n_val=2)
    lines = [r.getMessage() for r in caplog.records if "shapes" in r.getMessage().lower()]
    assert len(lines) == 1 and str(root) in lines[0] and "4 train + 2 val" in lines[0]
    assert "6/6" in capsys.readouterr().err  # the progress bar reached the end
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        generate_shapes(root, seed=0, n_train=4, n_val=2)  # already there: silent
    assert not caplog.records


def test_datasets_root_not_set_is_one_clear_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data_config, "_announced_roots", set(), raising=False)
    monkeypatch.delenv("DATASETS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    for datasets_dir in (None, "datasets"):  # nothing given, or the config schema's default
        monkeypatch.setattr(data_config, "_announced_roots", set(), raising=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="yolo"):
            data_config.load_data_config("coco128", datasets_dir)
            data_config.load_data_config("coco128", datasets_dir)  # said once
        lines = [r.getMessage() for r in caplog.records if "DATASETS_DIR" in r.getMessage()]
        assert len(lines) == 1 and str((tmp_path / "datasets").resolve()) in lines[0] and "not set" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        data_config.load_data_config("coco128", tmp_path / "mine")  # chosen: nothing to say
        monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "env"))
        data_config.load_data_config("coco128")
    assert not [r for r in caplog.records if "DATASETS_DIR" in r.getMessage()]
