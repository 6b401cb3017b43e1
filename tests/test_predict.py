"""``python -m yolo.predict`` and the ``Predictor`` API: boxes in original pixels, sources, outputs, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import COCO128, ROOT, WEIGHTS, compose, needs_coco128, needs_weights
from yolo.annotate import draw_detections, label_lines
from yolo.boxes import box_iou, xyxy2xywh
from yolo.config import check_predict_config
from yolo.predict import _classes, main, run
from yolo.predictor import Predictor
from yolo.sources import SourceError, iter_frames, resolve_sources

IMAGES = COCO128 / "images" / "train2017"
ZEBRA = IMAGES / "000000000034.jpg"  # one zebra filling most of the picture (coco128 label: class 22)
PLANE = IMAGES / "000000000081.jpg"  # one airplane (class 4)
BEAR = IMAGES / "000000000502.jpg"  # one bear (class 21)


def tiny_image(w: int = 96, h: int = 64, seed: int = 0) -> np.ndarray:
    """A small BGR image: noise with a filled rectangle."""
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(im, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), (0, 0, 255), -1)
    return im


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> bool:
    """A video of ``frames`` (mp4v); False when this OpenCV cannot write and read it back."""
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not vw.isOpened():
        return False
    for f in frames:
        vw.write(f)
    vw.release()
    return len(read_video(path)) == len(frames)


def read_video(path: Path) -> list[np.ndarray]:
    cap, out = cv2.VideoCapture(str(path)), []
    while True:
        ok, im = cap.read()
        if not ok:
            break
        out.append(im)
    cap.release()
    return out


def gt_boxes(image: Path) -> tuple[np.ndarray, np.ndarray]:
    """coco128's labels of ``image`` as (classes, xyxy in original pixels)."""
    h, w = cv2.imread(str(image)).shape[:2]
    rows = np.loadtxt(COCO128 / "labels" / "train2017" / f"{image.stem}.txt", ndmin=2)
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    return rows[:, 0].astype(int), np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not available")
    return Predictor(WEIGHTS, imgsz=320, device="cpu")


# ---- boxes in original pixels ---------------------------------------------------------------------------------------
class FixedBackend:
    """A backend that 'detects' one box given in input pixels: checks the seam and the mapping back exactly."""

    names, stride, device = ["thing", "other"], 32, torch.device("cpu")

    def __init__(self, cxcywh):
        self.cxcywh, self.shapes = cxcywh, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(batch.shape))
        assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1
        row = torch.tensor([*self.cxcywh, 0.9, 0.1, 0.8])  # objectness 0.9, class 1 at 0.8
        return row.repeat(batch.shape[0], 1, 1)


def test_backend_seam_boxes_in_original_pixels():
    # 200x100 at imgsz 64: gain 0.32, letterboxed to 64x32 (rect: no padding); input box (32,16,32,16)
    backend = FixedBackend((32.0, 16.0, 32.0, 16.0))
    det = Predictor(backend=backend, imgsz=64)([tiny_image(200, 100)])[0]
    assert backend.shapes == [(1, 3, 32, 64)]
    np.testing.assert_allclose(det.boxes, [[50, 25, 150, 75]], atol=1e-4)
    np.testing.assert_allclose(det.scores, [0.72], atol=1e-6)
    assert det.classes.tolist() == [1] and det.names[1] == "other" and det.shape == (100, 200)
    # square letterbox: 64x64 with 16 px of padding above and below; the same box 16 px lower maps the same
    backend = FixedBackend((32.0, 32.0, 32.0, 16.0))
    det = Predictor(backend=backend, imgsz=64, rect=False)(tiny_image(200, 100))[0]
    assert backend.shapes == [(1, 3, 64, 64)]
    np.testing.assert_allclose(det.boxes, [[50, 25, 150, 75]], atol=1e-4)


@needs_weights
@needs_coco128
def test_known_image_detection_matches_its_label(predictor):
    images = (ZEBRA, PLANE, BEAR)
    det = predictor([str(p) for p in images])
    for d, image in zip(det, images):
        classes, boxes = gt_boxes(image)
        assert d.path == str(image) and d.shape == cv2.imread(str(image)).shape[:2]
        assert len(d) and d.classes[0] == classes[0] and d.scores[0] > 0.5, d
        assert float(box_iou(d.boxes[:1], boxes[:1])[0, 0]) > 0.85, (d.boxes[0], boxes[0])


@needs_weights
@needs_coco128
@pytest.mark.parametrize("image", [PLANE, BEAR], ids=["plane", "bear"])
def test_resized_and_flipped_images_give_the_same_boxes(predictor, image):
    im = cv2.imread(str(image))
    h, w = im.shape[:2]
    base, big, flip = predictor([im, cv2.resize(im, (w * 2, h * 2)), im[:, ::-1]])
    assert big.shape == (2 * h, 2 * w) and len(base) and len(big) and len(flip)
    np.testing.assert_allclose(big.boxes[0] / 2, base.boxes[0], atol=2)  # pixels of the original
    mirrored = flip.boxes[:1, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [w, 0, w, 0]
    assert float(box_iou(mirrored, base.boxes[:1])[0, 0]) > 0.95, (mirrored, base.boxes[0])
    assert big.classes[0] == flip.classes[0] == base.classes[0]


@needs_weights
@needs_coco128
def test_batches_paths_and_arrays_agree(predictor):
    paths = [str(p) for p in sorted(IMAGES.glob("*.jpg"))[:4]]
    one = predictor(paths)
    batched = Predictor(backend=predictor.backend, imgsz=320, batch_size=4)(
        [cv2.imread(p) for p in paths])
    for a, b in zip(one, batched):
        assert len(a) == len(b) and b.path is None
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@needs_weights
@needs_coco128
def test_classes_filter(predictor):
    everything = predictor(str(ZEBRA))[0]
    zebras = Predictor(backend=predictor.backend, imgsz=320, classes=22)(str(ZEBRA))[0]
    assert len(zebras) and set(zebras.classes.tolist()) == {22}
    assert len(everything) >= len(zebras)
    assert _classes(compose("predict", ["classes=0"]).classes) == [0]
    assert _classes(compose("predict", ["classes=[0,2]"]).classes) == [0, 2]


def test_api_refuses_bad_settings_and_inputs(tmp_path):
    backend = FixedBackend((32.0, 16.0, 32.0, 16.0))
    with pytest.raises(Exception, match="^conf_thres: must be in"):
        Predictor(backend=backend, conf_thres=1.5)
    with pytest.raises(SourceError, match="does not exist"):
        Predictor(backend=backend, imgsz=64)([str(tmp_path / "nope.jpg")])
    (tmp_path / "bad.jpg").write_text("not a picture")
    with pytest.raises(SourceError, match="bad.jpg: cannot be decoded"):
        Predictor(backend=backend, imgsz=64)(str(tmp_path / "bad.jpg"))


# ---- output formats ----------------------------------------------------------------------------------------------
def test_label_lines_in_upstream_format():
    boxes = np.array([[10, 20, 110, 220], [0.5, 1, 33.3, 2]], np.float32)
    lines = label_lines(boxes, np.array([0.87654321, 0.25], np.float32), np.array([3, 0]), (400, 200), True)
    assert lines[0] == "3 0.3 0.3 0.5 0.5 0.876543"
    # upstream's arithmetic: float32 torch, xyxy2xywh / gain, then '%g ' per value
    gn = torch.tensor((400, 200))[[1, 0, 1, 0]]
    xywh = (xyxy2xywh(torch.tensor(boxes[1]).view(1, 4)) / gn).view(-1).tolist()
    line = (0.0, *xywh, float(np.float32(0.25)))
    assert lines[1] == ("%g " * len(line)).rstrip() % line
    assert label_lines(boxes, np.ones(2, np.float32), np.array([3, 0]), (400, 200))[0] == "3 0.3 0.3 0.5 0.5"


def test_drawing_keeps_the_original_and_marks_the_boxes():
    im = np.zeros((100, 100, 3), np.uint8)
    out = draw_detections(im, np.array([[10, 40, 70, 90]], np.float32), np.array([0.9]), np.array([0]), ["cat"], 2)
    assert not im.any() and out.shape == im.shape
    assert out[80, 10].any() and out[35, 12].any() and not out[80, 40].any()  # edge, caption above, inside


# ---- sources -----------------------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.jpg"):
        cv2.imwrite(str(tmp_path / "imgs" / name), tiny_image())
    (tmp_path / "imgs" / "notes.txt").write_text("a note, not a list of images\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("imgs/sub/c.jpg\n\nimgs/a.jpg\n")
    return tmp_path


def test_sources_folder_glob_list_and_lists(tree):
    imgs = tree / "imgs"
    assert resolve_sources(str(imgs)) == [str(imgs / "a.jpg"), str(imgs / "b.png")]  # not recursive, sorted
    assert resolve_sources(str(tree / "**" / "*.jpg")) == [str(imgs / "a.jpg"), str(imgs / "sub" / "c.jpg")]
    assert resolve_sources(str(tree / "list.txt")) == [str(imgs / "sub" / "c.jpg"), str(imgs / "a.jpg")]
    both = resolve_sources([str(imgs / "b.png"), str(tree / "list.txt"), str(imgs)])
    assert both == [str(imgs / n) for n in ("b.png", "sub/c.jpg", "a.jpg")]  # each file once, first place kept


@pytest.mark.parametrize("entry,message", [
    ("nope.jpg", "nope.jpg does not exist"),
    ("empty", "folder .*empty holds no image or video file"),
    ("*.gif", "matches no image or video file"),
    ("imgs/notes.txt", r"a note, not a list of images \(listed in .*notes.txt\) does not exist"),
    ("fake.mp4", "cannot open the video .*fake.mp4"),
    ("bad_list.txt", r"nope.png \(listed in .*bad_list.txt\) does not exist"),
])
def test_bad_sources_are_one_clear_error(tree, entry, message):
    (tree / "fake.mp4").write_text("not a video")
    (tree / "bad_list.txt").write_text("imgs/a.jpg\nnope.png\n")
    with pytest.raises(SourceError, match="^source: .*" + message):
        resolve_sources(str(tree / entry))


def test_unreadable_images_are_skipped_with_a_warning(tree, caplog):
    good = tree / "imgs" / "a.jpg"
    (tree / "truncated.jpg").write_bytes(good.read_bytes()[:120])
    (tree / "text.png").write_text("hello")
    files = [str(tree / "truncated.jpg"), str(good), str(tree / "text.png")]
    with caplog.at_level("WARNING", logger="yolo"):
        frames = list(iter_frames(files))
    assert [f.path for f in frames] == [str(good)]
    assert "truncated.jpg: cannot be decoded" in caplog.text and "text.png: cannot be decoded" in caplog.text


# ---- the command -------------------------------------------------------------------------------------------------
def run_cli(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "yolo.predict", "device=cpu", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``main()`` in this process (no interpreter start): exit code and stderr."""
    old = sys.argv
    sys.argv = ["yolo.predict", "device=cpu", *argv]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    errors = [ln for ln in err.splitlines() if ln.startswith("ERROR:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("case", ["no-weights", "missing-weights", "missing", "empty", "no-images", "video",
                                  "conf", "classes", "amp"])
def test_bad_input_is_one_line_before_the_run_folder(tree, case, capsys):
    (tree / "fake.mp4").write_text("not a video")
    (tree / "docs").mkdir()
    (tree / "docs" / "readme.md").write_text("no images here")
    weights = f"weights={WEIGHTS}"
    argv, needle = {
        "no-weights": ([f"source={tree / 'imgs'}"], "weights: required"),
        "missing-weights": ([f"weights={tree / 'w.pt'}", f"source={tree / 'imgs'}"], "w.pt: no such file"),
        "missing": ([weights, f"source=[{tree / 'imgs'},{tree / 'nope.jpg'}]"], "nope.jpg does not exist"),
        "empty": ([weights, f"source={tree / 'empty'}"], "holds no image or video"),
        "no-images": ([weights, f"source={tree / 'docs'}"], "docs holds no image or video"),
        "video": ([weights, f"source={tree / 'fake.mp4'}"], "cannot open the video"),
        "conf": ([weights, f"source={tree / 'imgs'}", "conf_thres=2"], "conf_thres: must be in [0, 1]"),
        "classes": ([weights, f"source={tree / 'imgs'}", "classes=[a]"], "classes"),
        "amp": ([weights, f"source={tree / 'imgs'}", "amp=fp16"], "amp: fp16 needs a CUDA device"),
    }[case]
    if "weights=" + str(WEIGHTS) in argv and not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not available")
    code, err = in_process([*argv, f"hydra.run.dir={tree / 'run'}"], capsys)
    assert_one_error(code, err, needle)
    assert not (tree / "run").exists()


def test_help_runs(capsys):
    code, _ = in_process(["--help"], capsys)
    assert code in (0, None)


@needs_weights
@needs_coco128
def test_command_end_to_end(tree, predictor):
    """Images from a folder, a glob, a .txt list and a video in one run; a bad file skipped; every output."""
    frames = [cv2.resize(cv2.imread(str(PLANE)), (192, 128))] * 5
    has_video = write_video(tree / "clip.mp4", frames)
    shutil.copyfile(ZEBRA, tree / "imgs" / "zebra.jpg")
    (tree / "imgs" / "broken.jpg").write_bytes(ZEBRA.read_bytes()[:150])
    (tree / "other").mkdir()
    cv2.imwrite(str(tree / "other" / "a.jpg"), tiny_image(seed=1))  # same name as imgs/a.jpg
    sources = [str(tree / "imgs"), str(tree / "other" / "*.jpg"), str(tree / "list.txt")]
    sources += [str(tree / "clip.mp4")] if has_video else []
    out_dir = tree / "out"
    out = run_cli(f"weights={WEIGHTS}", f"source=[{','.join(sources)}]", "imgsz=320", "save_txt=true",
                  "save_conf=true", f"hydra.run.dir={out_dir}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text and re.search(r"WARNING: .*broken\.jpg: cannot be decoded", text), text[-3000:]
    assert re.search(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image at shape "
                     r"\(1, 3, 320, 320\)", text), text[-2000:]
    assert f"Results saved to {out_dir}" in text

    records = json.loads((out_dir / "predictions.json").read_text())
    images = [r for r in records if "frame" not in r]
    assert [Path(r["path"]).name for r in images] == ["a.jpg", "b.png", "zebra.jpg", "a.jpg", "c.jpg"]
    for name in ("a.jpg", "b.png", "zebra.jpg", "a_2.jpg", "c.jpg"):  # annotated, nothing overwritten
        assert cv2.imread(str(out_dir / name)) is not None, name
    zebra = next(r for r in images if r["path"].endswith("zebra.jpg"))
    api = predictor(str(ZEBRA))[0]
    assert (zebra["width"], zebra["height"]) == (api.shape[1], api.shape[0])
    assert [d["class"] for d in zebra["detections"]] == api.classes.tolist()
    assert zebra["detections"][0]["name"] == "zebra"
    np.testing.assert_allclose([d["box"] for d in zebra["detections"]], api.boxes, atol=2e-3)
    np.testing.assert_allclose([d["confidence"] for d in zebra["detections"]], api.scores, atol=1e-5)

    rows = (out_dir / "labels" / "zebra.txt").read_text().splitlines()
    assert all(re.fullmatch(r"\d+( [-\d.e]+){5}", r) for r in rows), rows
    expected = label_lines(api.boxes, api.scores, api.classes, api.shape, save_conf=True)
    np.testing.assert_allclose(np.loadtxt(rows, ndmin=2), np.loadtxt(expected, ndmin=2), atol=1e-4)
    if has_video:
        video_records = [r for r in records if "frame" in r]
        assert [r["frame"] for r in video_records] == [1, 2, 3, 4, 5]
        assert len(read_video(out_dir / "clip.mp4")) == 5
        assert any((out_dir / "labels").glob("clip_*.txt"))
    assert not list(out_dir.glob(".*partial*"))


@needs_weights
def test_no_readable_image_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_text("text, not a JPEG")
    monkeypatch.chdir(tmp_path)  # outside Hydra the run folder is runs/predict/<time> here
    cfg = compose("predict", [f"weights={WEIGHTS}", f"source={tmp_path / 'a.jpg'}", "device=cpu", "imgsz=64"])
    with pytest.raises(SourceError, match="none of the 1 file"):
        run(cfg)


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["yolo-predict"] == "yolo.predict:main"


def test_predict_schema_checks_sources_first(tree):
    cfg = compose("predict", [f"weights={ROOT / 'pyproject.toml'}", f"source={tree / 'imgs'}"])
    check_predict_config(cfg)  # the weights file is only looked at when loaded
    with pytest.raises(SourceError):
        check_predict_config(compose("predict", [f"weights={ROOT / 'pyproject.toml'}", f"source={tree / 'x'}"]))
