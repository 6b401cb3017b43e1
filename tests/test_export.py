"""``python -m yolo.export``: ONNX and TorchScript files that reproduce PyTorch, their metadata, where they are
written, one error line for bad input, and ``yolo.val`` on an exported file (yolov5n at imgsz 320)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import COCO128, CONF, ROOT, WEIGHTS, compose, needs_coco128, needs_weights
from yolo import export as export_mod
from yolo.checkpoint import checked_model, load_checkpoint
from yolo.errors import CheckpointError
from yolo.export import TOLERANCE, DecodedOutput, export, output_path
from yolo.runtime import ExportedModel, load_inference_model, weights_format
from yolo.val import run as val_run

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (pip install -e '.[export]')")
IMGSZ = 320
COCO_NAMES = list(yaml.safe_load((CONF / "data" / "coco128.yaml").read_text())["names"].values())


def do_export(weights: Path, *overrides: str):
    return export(compose("export", [f"weights={weights}", f"imgsz={IMGSZ}", "device=cpu", *overrides]))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A folder of our own holding a copy of yolov5n.pt (exports land beside it)."""
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not available")
    d = tmp_path_factory.mktemp("weights")
    shutil.copy(WEIGHTS, d / "yolov5n.pt")
    return d


@pytest.fixture(scope="module")
def exported(weights_dir) -> dict:
    """yolov5n exported once per kind: static ONNX, dynamic ONNX, TorchScript."""
    out = {}
    if HAS_ONNX:
        out["onnx"] = do_export(weights_dir / "yolov5n.pt", "format=onnx")
        out["onnx-dynamic"] = do_export(weights_dir / "yolov5n.pt", "format=onnx", "dynamic=true",
                                        f"output={weights_dir / 'dynamic.onnx'}")
    out["torchscript"] = do_export(weights_dir / "yolov5n.pt", "format=torchscript", "dynamic=true")
    return out


@pytest.fixture(scope="module")
def reference(weights_dir):
    return DecodedOutput(checked_model(load_checkpoint(weights_dir / "yolov5n.pt"), "w", fuse=True)).eval()


BOX_ATOL, BOX_RTOL, SCORE_TOL = TOLERANCE[False]  # boxes: 1e-3 px + 1e-5 x |value| (float32's reach), scores 1e-4


def assert_close(path: Path, reference, shape) -> None:
    """The file at ``path`` gives ``reference``'s output on a seeded input of ``shape``."""
    im = torch.rand(shape, generator=torch.Generator().manual_seed(7))
    loaded = load_inference_model(path, "cpu")
    with torch.inference_mode():
        want = reference(im)
        got, raw = loaded.model(im)
    assert raw is None and got.shape == want.shape
    diff = (got - want).abs()
    box_excess = (diff[..., :4] - BOX_ATOL - BOX_RTOL * want[..., :4].abs()).max().item()
    assert box_excess <= 0 and diff[..., 4:].max().item() <= SCORE_TOL, (shape, diff[..., :4].max().item())


# ---- the files reproduce PyTorch ---------------------------------------------------------------------------------
@needs_onnx
def test_onnx_static_matches_pytorch(exported, reference, weights_dir):
    res = exported["onnx"]
    assert res.path == weights_dir / "yolov5n.onnx"  # beside the weights
    assert res.box_ratio <= 1 and res.score_diff <= SCORE_TOL
    assert res.box_diff < 3e-3  # measured 4e-4 px at 320
    assert_close(res.path, reference, (1, 3, IMGSZ, IMGSZ))
    loaded = load_inference_model(res.path)
    assert loaded.input_shape == (1, 3, IMGSZ, IMGSZ) and not loaded.dynamic and loaded.backend == "onnx"


@needs_onnx
def test_onnx_dynamic_matches_pytorch_at_other_shapes(exported, reference):
    res = exported["onnx-dynamic"]
    assert res.shapes == [(1, 3, IMGSZ, IMGSZ), (2, 3, 160, IMGSZ)]  # the check ran at a second shape too
    assert res.box_ratio <= 1 and res.score_diff <= SCORE_TOL
    for shape in ((3, 3, 256, 192), (1, 3, 640, 480)):
        assert_close(res.path, reference, shape)
    loaded = load_inference_model(res.path)
    assert loaded.dynamic and loaded.input_shape is None


def test_torchscript_matches_pytorch(exported, reference, weights_dir):
    res = exported["torchscript"]
    assert res.path == weights_dir / "yolov5n.torchscript"
    assert res.box_diff <= 1e-3 and res.score_diff <= SCORE_TOL  # the same kernels as PyTorch: (nearly) exact
    assert_close(res.path, reference, (2, 3, 256, 320))
    loaded = load_inference_model(res.path)
    assert loaded.backend == "torchscript" and loaded.names == COCO_NAMES and loaded.stride == 32


@needs_onnx
def test_onnx_metadata_round_trips(exported):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported["onnx"].path)).metadata_props}
    assert json.loads(props["names"]) == COCO_NAMES
    assert props["stride"] == "32" and json.loads(props["imgsz"]) == [IMGSZ, IMGSZ]
    assert props["dynamic"] == "false" and props["batch"] == "1"
    loaded = load_inference_model(exported["onnx"].path)
    assert loaded.names == COCO_NAMES and loaded.stride == 32


def test_pt_goes_through_strict_loading(weights_dir):
    loaded = load_inference_model(weights_dir / "yolov5n.pt")
    assert loaded.backend == "pytorch" and loaded.dynamic and loaded.names == COCO_NAMES
    assert weights_format("a/b.ONNX") == "onnx" and weights_format("best.pt") == "pytorch"
    bad = weights_dir / "garbage.onnx"
    bad.write_text("not a model\n")
    if HAS_ONNX:
        with pytest.raises(CheckpointError, match="garbage.onnx"):
            load_inference_model(bad)


def test_fixed_batch_backend_pads_a_short_batch():
    class Fixed(ExportedModel):
        def run(self, images):
            assert images.shape[0] == 4  # the file's fixed batch
            return images.flatten(1)[:, None, :8]

    model = Fixed({"names": ["a"], "dynamic": False, "batch": 4})
    im = torch.rand(3, 3, 32, 32)
    out, raw = model(im)
    assert raw is None and torch.equal(out, im.flatten(1)[:, None, :8])


# ---- where the file goes -----------------------------------------------------------------------------------------
@needs_onnx
def test_output_honoured_and_imgsz_rounded_up(weights_dir, tmp_path, caplog):
    target = tmp_path / "sub" / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="yolo"):
        res = export(compose("export", [f"weights={weights_dir / 'yolov5n.pt'}", "imgsz=300", "device=cpu",
                                        f"output={target}"]))
    assert res.path == target and target.is_file()
    assert "updating to 320" in caplog.text
    assert load_inference_model(target).input_shape == (1, 3, 320, 320)
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]  # no temporary file left


def test_read_only_folder_falls_back_to_run_folder(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "ro" / "best.pt"
    weights.parent.mkdir()
    assert output_path(weights, "onnx", None, tmp_path / "run") == weights.with_suffix(".onnx")
    monkeypatch.setattr(export_mod, "writable", lambda folder: False)
    with caplog.at_level(logging.WARNING, logger="yolo"):
        assert output_path(weights, "onnx", None, tmp_path / "run") == tmp_path / "run" / "best.onnx"
    assert "not writable" in caplog.text and str(tmp_path / "run") in caplog.text
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert output_path(weights, "torchscript", str(out_dir), None) == out_dir / "best.torchscript"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_seen(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert not export_mod.writable(ro) and export_mod.writable(tmp_path)
    finally:
        ro.chmod(0o755)


# ---- bad input: one line, exit code 1 ---------------------------------------------------------------------------
def run_export(*args: str, tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    argv = ["yolo.export", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", *args]
    code = f"{prelude}import runpy, sys; sys.argv = {argv!r}; runpy.run_module('yolo.export', run_name='__main__', " \
           f"alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_error_line(out: subprocess.CompletedProcess, *needles: str) -> None:
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("case", ["missing", "unreadable", "format", "onnx-weights", "half-on-cpu"])
def test_bad_input_is_one_line(case, tmp_path):
    text_pt = tmp_path / "notes.pt"
    text_pt.write_text("these are not weights\n")
    args, needle = {
        "missing": ([f"weights={tmp_path / 'nope.pt'}"], "nope.pt"),
        "unreadable": ([f"weights={text_pt}"], "notes.pt"),
        "format": ([f"weights={text_pt}", "format=tflite"], "format: must be one of onnx, torchscript"),
        "onnx-weights": ([f"weights={tmp_path / 'best.onnx'}"], "weights: export takes a PyTorch checkpoint"),
        "half-on-cpu": ([f"weights={text_pt}", "half=true", "format=torchscript"], "half:"),
    }[case]
    assert_one_error_line(run_export(*args, tmp_path=tmp_path), needle)


def test_missing_onnx_packages_is_one_line(tmp_path):
    block = "import sys; sys.modules['onnxruntime'] = None; sys.modules['onnx'] = None; "
    out = run_export(f"weights={tmp_path / 'nope.pt'}", "format=onnx", tmp_path=tmp_path, prelude=block)
    assert_one_error_line(out, 'pip install -e ".[export]"', "format=onnx")


def test_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'yolo-export = "yolo.export:main"' in text and 'export = ["onnx>=1.16", "onnxruntime>=1.18"]' in text


# ---- val through the ONNX backend --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    """A data YAML over 8 COCO128 images (a .txt list of their paths; the label cache goes beside it)."""
    if not COCO128.is_dir():
        pytest.skip(f"{COCO128} not available")
    d = tmp_path_factory.mktemp("few")
    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:8]
    (d / "val.txt").write_text("".join(f"{p}\n" for p in images))
    (d / "few.yaml").write_text(yaml.safe_dump({"path": str(d), "train": "val.txt", "val": "val.txt",
                                                "names": COCO_NAMES}))
    return d / "few.yaml"


def val(weights: Path, data: Path, *extra: str):
    cfg = compose("val", [f"weights={weights}", "data=external", f"data.file={data}", f"imgsz={IMGSZ}",
                          "batch_size=4", "device=cpu", "workers=0", "plots=false", *extra])
    return val_run(cfg)


@needs_onnx
@needs_weights
@needs_coco128
def test_val_on_onnx_matches_pt(exported, weights_dir, few_images, caplog):
    pt = val(weights_dir / "yolov5n.pt", few_images)
    dynamic = val(exported["onnx-dynamic"].path, few_images)  # rectangular batches of 4, as the .pt
    for a, b in zip(pt.metrics, dynamic.metrics):
        assert abs(a - b) <= 1e-3, (pt.metrics, dynamic.metrics)
    with caplog.at_level(logging.INFO, logger="yolo"):
        static = val(exported["onnx"].path, few_images)  # fixed (1, 3, 320, 320): square images, batch 1
    assert "fixed batch of 1" in caplog.text and static.images == 8
    for a, b in zip(pt.metrics[2:], static.metrics[2:]):
        assert abs(a - b) <= 0.05, (pt.metrics, static.metrics)
    assert pt.map50 > 0.3


@needs_onnx
@needs_weights
def test_val_refuses_another_imgsz_for_a_fixed_onnx(exported, few_images):
    from yolo.errors import ConfigError

    with pytest.raises(ConfigError, match="imgsz: .* fixed 320x320"):
        val(exported["onnx"].path, few_images, "imgsz=640")


@needs_weights
@needs_coco128
def test_val_on_torchscript_matches_pt(exported, weights_dir, few_images):
    pt = val(weights_dir / "yolov5n.pt", few_images)
    ts = val(exported["torchscript"].path, few_images)  # dynamic: rectangular batches, as the .pt
    for a, b in zip(pt.metrics, ts.metrics):
        assert abs(a - b) <= 1e-3, (pt.metrics, ts.metrics)


# ---- prediction on an exported file -------------------------------------------------------------------------------
@needs_onnx
@needs_coco128
@pytest.mark.parametrize("kind", ["onnx-dynamic", "onnx", "torchscript"])
def test_predict_on_an_exported_file_matches_pt(exported, weights_dir, kind, caplog):
    from yolo.predictor import Predictor

    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:3]
    pt = Predictor(weights_dir / "yolov5n.pt", imgsz=IMGSZ, device="cpu", rect=kind != "onnx")(images)
    with caplog.at_level(logging.WARNING, logger="yolo"):
        ex = Predictor(exported[kind].path, imgsz=IMGSZ, device="cpu", batch_size=2)(images)
    assert [len(d) for d in ex] == [len(d) for d in pt] and sum(len(d) for d in pt) > 0
    for a, b in zip(ex, pt):
        assert (a.classes == b.classes).all()
        assert abs(a.boxes - b.boxes).max() < 0.05 and abs(a.scores - b.scores).max() < 1e-3
    assert "input only" not in caplog.text  # the fixed export was made at this imgsz


@needs_onnx
def test_predict_with_amp_on_an_exported_file_is_one_line(exported):
    from yolo.errors import ConfigError
    from yolo.predictor import Predictor

    with pytest.raises(ConfigError, match="amp: bf16 applies to PyTorch checkpoints"):
        Predictor(exported["onnx"].path, device="cpu", amp="bf16")
