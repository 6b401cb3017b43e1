"""Weights that do not fit are an error where they must fit (validation, resume, prediction), and fine-tuning
transfer fails clearly when nothing transfers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yolo.checkpoint import CheckpointError, checked_model, load_checkpoint, load_model, save_checkpoint
from yolo.models import build_model
from yolo.models.stored import expected_shapes
from yolo.models.transfer import check_finite, load_state_strict, transfer_weights

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Our format, yolov5n with 80 classes and all its 349 tensors."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "good.pt", model=build_model("yolov5n"))


def edited(good: Path, out: Path, edit) -> Path:
    raw = torch.load(good, weights_only=True)
    edit(raw["state_dict"])
    torch.save(raw, out)
    return out


def _rename_all(sd):
    for k in list(sd):
        sd["backbone." + k] = sd.pop(k)


def _drop_one(sd):
    del sd["model.24.m.0.bias"]


def _reshape_one(sd):
    sd["model.0.conv.weight"] = sd["model.0.conv.weight"][:8]


def _nan_one(sd):
    sd["model.2.cv1.conv.weight"][0, 0, 0, 0] = math.nan


def test_meta_shapes_equal_the_built_model():
    model = build_model("yolov5s", nc=3)
    shapes = expected_shapes(model.yaml, "yolov5s")
    assert {k: tuple(v) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_checked_model_loads_every_tensor(good):
    model = checked_model(load_checkpoint(good), good)
    assert not model.training and model.nc == 80
    ref = load_checkpoint(good).state_dict
    assert all(torch.equal(v, ref[k].to(v.dtype)) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edit,needles", [
    (_rename_all, ("0/349 tensors fit", "349 missing", "349 unexpected (backbone.model.0.conv.weight")),
    (_drop_one, ("348/349 tensors fit", "1 missing (model.24.m.0.bias)")),
    (_reshape_one, ("348/349 tensors fit", "1 mis-shaped", "model.0.conv.weight [8, 3, 6, 6] vs [16, 3, 6, 6]")),
    (_nan_one, ("1 of 349 weight tensors hold NaN or inf (model.2.cv1.conv.weight)",)),
])
def test_checked_model_refuses_what_does_not_fit(good, tmp_path, edit, needles):
    path = edited(good, tmp_path / "bad.pt", edit)
    for load in (lambda: checked_model(load_checkpoint(path), path), lambda: load_model(path)):
        with pytest.raises(CheckpointError) as info:
            load()
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg
        for needle in needles:
            assert needle in msg, msg


def test_load_state_strict_and_check_finite():
    model = build_model("yolov5n", nc=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    load_state_strict(model, sd, "here.pt")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"here.pt: .*1 unexpected \(extra.weight\)"):
        load_state_strict(model, sd, "here.pt")
    with torch.no_grad():
        model.model[0].conv.weight[0] = math.inf
    with pytest.raises(CheckpointError, match="here.pt: 1 of .* hold NaN or inf"):
        check_finite(model, "here.pt")


def test_fine_tuning_transfer_by_name_and_shape_and_nothing_is_an_error(good):
    sd = load_checkpoint(good).state_dict
    assert transfer_weights(build_model("yolov5n", nc=3), sd, source=good) == (343, 349)
    other = {"backbone." + k: v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"no tensor fits the model by name and shape \(0/349 transferred\)"):
        transfer_weights(build_model("yolov5n", nc=3), other, source=good)
    nan = dict(sd, **{"model.0.conv.weight": torch.full_like(sd["model.0.conv.weight"], math.nan)})
    with pytest.raises(CheckpointError, match="NaN or inf"):
        transfer_weights(build_model("yolov5n"), nan, source=good)


# ---------------------------------------------------------------------------------------------------------------
# python -m yolo.val: one ERROR line and a non-zero exit, before any data is read


def run_val(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATASETS_DIR=str(tmp_path / "datasets"))
    missing_data = tmp_path / "nowhere.yaml"  # a data config that does not exist: reading it would be the error
    cmd = [sys.executable, "-m", "yolo.val", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
           f"data={missing_data}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "nowhere.yaml" not in errors[0]


def test_val_without_weights(tmp_path):
    one_error(run_val(tmp_path), "weights: required")


@pytest.mark.parametrize("edit,needle", [(_rename_all, "0/349 tensors fit"), (_drop_one, "348/349 tensors fit"),
                                         (_nan_one, "NaN or inf")])
def test_val_refuses_weights_that_do_not_fit(good, tmp_path, edit, needle):
    path = edited(good, tmp_path / "bad.pt", edit)
    one_error(run_val(tmp_path, f"weights={path}"), str(path), needle)
