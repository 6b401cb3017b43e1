"""Validation entry: parity with upstream's val.py on COCO128, and one clear error line on bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "datasets" / "coco128"

needs_shared = pytest.mark.skipif(not (WEIGHTS.exists() and COCO128.exists()), reason="../shared data not present")

# upstream val.py (yolov5==7.0.14) on the same weights and data, batch 32, conf 0.001, IoU 0.6
UPSTREAM = {640: (0.57151, 0.50824, 0.55969, 0.36079), 320: (0.45246, 0.44527, 0.45257, 0.28964)}


def run_val(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATASETS_DIR=str(SHARED / "datasets"))
    cmd = [sys.executable, "-m", "yolo.val", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def all_row(text: str) -> tuple[float, ...]:
    m = re.search(r"^\s*all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", text, re.M)
    assert m, text[-2000:]
    assert (int(m[1]), int(m[2])) == (128, 929)
    return tuple(float(x) for x in m.groups()[2:])


def check_parity(imgsz: int, tmp_path: Path) -> None:
    out = run_val(f"weights={WEIGHTS}", "data=coco128", f"imgsz={imgsz}", "batch_size=32", "plots=false",
                  tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = all_row(out.stdout + out.stderr)
    for name, a, b in zip(("P", "R", "mAP50", "mAP50-95"), ours, UPSTREAM[imgsz]):
        assert abs(a - b) <= 0.003, f"{name} at {imgsz}: ours {a} upstream {b}"
    assert re.search(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image", out.stdout)


@needs_shared
def test_val_parity_320(tmp_path):
    check_parity(320, tmp_path)


@needs_shared
@pytest.mark.slow
def test_val_parity_640(tmp_path):
    check_parity(640, tmp_path)


@needs_shared
def test_val_bf16_close_to_fp32(tmp_path):
    """``amp=bf16`` runs the forward pass under bf16 autocast (any CPU can, fast or not); mAP stays within 0.01
    of the fp32 figures (measured: +0.002/+0.003 at 320), P and R move more (score thresholds)."""
    out = run_val(f"weights={WEIGHTS}", "data=coco128", "imgsz=320", "batch_size=32", "plots=false", "amp=bf16",
                  tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AMP: bf16" in out.stdout + out.stderr
    ours = all_row(out.stdout + out.stderr)
    assert any(abs(a - b) > 0.0005 for a, b in zip(ours, UPSTREAM[320])), "bf16 gave fp32's figures"
    for name, a, b in zip(("mAP50", "mAP50-95"), ours[2:], UPSTREAM[320][2:]):
        assert abs(a - b) <= 0.01, f"{name} at 320 with bf16: ours {a} fp32 {b}"


def test_val_fp16_on_cpu_is_one_line(tmp_path):
    out = run_val(f"weights={WEIGHTS}", "data=coco128", "amp=fp16", tmp_path=tmp_path)
    assert_one_error_line(out, "amp")


def assert_one_error_line(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_weights(tmp_path):
    missing = tmp_path / "nope.pt"
    assert_one_error_line(run_val(f"weights={missing}", tmp_path=tmp_path), str(missing))


@needs_shared
def test_truncated_weights(tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(WEIGHTS.read_bytes()[: WEIGHTS.stat().st_size // 3])
    assert_one_error_line(run_val(f"weights={bad}", tmp_path=tmp_path), str(bad))


def test_text_file_named_pt(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not the weights you are looking for\n")
    assert_one_error_line(run_val(f"weights={bad}", tmp_path=tmp_path), str(bad))


@needs_shared
@pytest.mark.parametrize("layout", ["empty", "missing"])
def test_bad_image_folder(tmp_path, layout):
    root = tmp_path / "ds"
    if layout == "empty":
        (root / "images" / "val").mkdir(parents=True)
    data = tmp_path / "custom.yaml"
    names = [f"class{i}" for i in range(80)]  # as many as the weights predict, so the data is what fails
    data.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames: {names}\n")
    out = run_val(f"weights={WEIGHTS}", f"data={data}", tmp_path=tmp_path)
    assert_one_error_line(out, "images/val")
