"""Checkpoints: the upstream yolov5n.pt read without upstream's code, forward parity, transfer, our own format."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from yolo.checkpoint import (
    FORMAT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
    strip_optimizer,
)
from yolo.models import DetectionModel, build_model
from yolo.models.transfer import transfer_weights

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
REFERENCE = SHARED / "reference" / "yolov5n_forward_seed0_320.npy"

needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} not available")


@pytest.fixture(scope="module")
def upstream_ckpt() -> Checkpoint:
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not available")
    return load_checkpoint(WEIGHTS)


@pytest.fixture(scope="module")
def yolov5n_pretrained():
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not available")
    return load_model(WEIGHTS)


# ---------------------------------------------------------------------------------------------------------------
# upstream file


def test_upstream_checkpoint_fields(upstream_ckpt):
    ck = upstream_ckpt
    assert ck.source == "upstream"
    assert ck.model_yaml["nc"] == 80 and ck.model_yaml["width_multiple"] == 0.25
    assert ck.names[:3] == ["person", "bicycle", "car"] and len(ck.names) == 80
    assert ck.stride == [8.0, 16.0, 32.0]
    assert ck.epoch == -1 and ck.optimizer is None and ck.ema_state_dict is None and ck.updates is None
    assert len(ck.state_dict) == 349
    floats = [v for v in ck.state_dict.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert ck.state_dict["model.2.m.0.cv1.bn.num_batches_tracked"].dtype == torch.int64
    assert sum(v.numel() for k, v in ck.state_dict.items() if "running" not in k and "num_batches" not in k
               and k != "model.24.anchors") == 1_872_157
    assert ck.extra["date"].startswith("2022-02-08")
    assert ck.state_dict["model.24.anchors"].shape == (3, 3, 2)
    assert torch.allclose(ck.state_dict["model.24.anchors"][0, 0], torch.tensor([1.25, 1.625]))


def test_upstream_names_match_our_model(upstream_ckpt):
    ours = DetectionModel(upstream_ckpt.model_yaml).state_dict()
    theirs = upstream_ckpt.state_dict
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_full_transfer_and_log(upstream_ckpt, caplog):
    model = build_model("yolov5n")
    with caplog.at_level("INFO", logger="yolo.models.transfer"):
        n, total = transfer_weights(model, upstream_ckpt.state_dict, source=WEIGHTS)
    assert (n, total) == (349, 349)
    assert f"Transferred 349/349 items from {WEIGHTS}" in caplog.text


def test_transfer_to_other_nc_skips_only_head_convs(upstream_ckpt):
    model = build_model("yolov5n", nc=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n, total = transfer_weights(model, upstream_ckpt.state_dict)
    assert (n, total) == (343, 349)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    untouched = {k for k in after if k.startswith("model.24.m.")}
    assert untouched == {f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert not changed & untouched
    assert torch.equal(after["model.0.conv.weight"], upstream_ckpt.state_dict["model.0.conv.weight"])


def test_load_model_other_nc_names():
    model, ck = load_model(WEIGHTS, nc=3) if WEIGHTS.is_file() else pytest.skip("no weights")
    assert model.nc == 3 and model.names == ["0", "1", "2"] and not model.training
    model80, _ = load_model(WEIGHTS, model_cfg="yolov5n")
    assert model80.names[0] == "person"


def test_forward_parity_with_upstream(yolov5n_pretrained):
    model, _ = yolov5n_pretrained
    assert not model.training and next(model.parameters()).dtype == torch.float32
    torch.manual_seed(0)
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        out = model(x)[0]
    ref = torch.from_numpy(np.load(REFERENCE))
    assert out.shape == ref.shape == (1, 6300, 85)
    box_diff = (out[..., :4] - ref[..., :4]).abs().max().item()
    score_diff = (out[..., 4:] - ref[..., 4:]).abs().max().item()
    print(f"max |diff| boxes {box_diff:.3g} px, scores {score_diff:.3g}")
    assert box_diff <= 2e-3
    assert score_diff <= 1e-4


def test_fused_matches_unfused(yolov5n_pretrained):
    model, _ = yolov5n_pretrained
    fused, _ = load_model(WEIGHTS, fuse=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 3, 256, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x)[0], fused(x)[0]
    assert (a[..., :4] - b[..., :4]).abs().max() < 5e-3
    assert (a[..., 4:] - b[..., 4:]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# errors


def _one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.pt")


@needs_weights
def test_truncated_file(tmp_path):
    data = WEIGHTS.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _one_line_error(path)


def test_text_file_named_pt(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("this is not a checkpoint\n")
    assert "not a PyTorch checkpoint" in _one_line_error(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "evil_plain.pt"
    plain.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"model": _Evil(marker), "epoch": 1}, zipped)
    for path in (plain, zipped):
        msg = _one_line_error(path)
        assert "forbidden global" in msg and "system" in msg
    evaled = tmp_path / "eval.pt"
    evaled.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")
    assert "builtins.eval" in _one_line_error(evaled)
    assert not marker.exists()


def test_not_a_yolo_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    assert "not a YOLOv5 checkpoint" in _one_line_error(path)


# ---------------------------------------------------------------------------------------------------------------
# an upstream-style file with EMA, optimizer and numpy fitness (made with stand-in classes under models.*)


def test_upstream_style_prefers_ema(tmp_path, monkeypatch):
    pkg = types.ModuleType("models")
    mod = types.ModuleType("models.yolo")

    class Model(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            nn.init.constant_(self.model[0].weight, value)
            self.yaml = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25}
            self.names = {0: "cat", 1: "dog"}
            self.stride = torch.tensor([8.0, 16.0, 32.0])

    Model.__module__, Model.__qualname__ = "models.yolo", "Model"
    mod.Model, pkg.yolo = Model, mod
    monkeypatch.setitem(sys.modules, "models", pkg)
    monkeypatch.setitem(sys.modules, "models.yolo", mod)
    path = tmp_path / "last.pt"
    torch.save({"epoch": 4, "best_fitness": np.float64(0.25), "model": Model(1.0).half(), "ema": Model(2.0).half(),
                "updates": 40, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
                "opt": {"epochs": 5, "imgsz": 640}, "git": None, "date": "today"}, path)
    monkeypatch.delitem(sys.modules, "models")
    monkeypatch.delitem(sys.modules, "models.yolo")

    ck = load_checkpoint(path)
    assert ck.source == "upstream" and ck.epoch == 4 and ck.updates == 40
    assert ck.best_fitness == 0.25 and isinstance(ck.best_fitness, float)
    assert ck.names == ["cat", "dog"] and ck.stride == [8.0, 16.0, 32.0]
    assert ck.config == {"epochs": 5, "imgsz": 640}
    assert ck.optimizer["param_groups"][0]["lr"] == 0.01
    assert set(ck.state_dict) == {"model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias",
                                  "model.1.running_mean", "model.1.running_var", "model.1.num_batches_tracked"}
    assert torch.all(ck.state_dict["model.0.weight"] == 2.0)  # EMA preferred
    assert ck.ema_state_dict is ck.state_dict
    assert torch.all(ck.extra["model_state_dict"]["model.0.weight"] == 1.0)
    assert ck.extra["date"] == "today"


# ---------------------------------------------------------------------------------------------------------------
# our format


def test_native_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    model.names = ["a", "b", "c"]
    ema = build_model("yolov5n", nc=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    model(torch.rand(1, 3, 64, 64))[0].sum().backward()
    opt.step()
    cfg = OmegaConf.create({"epochs": 3, "hyp": {"lr0": 0.01}, "data": "coco128"})
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, model=model, ema=ema, optimizer=opt, epoch=2, best_fitness=np.float64(0.5),
                    updates=7, config=cfg, extra={"where": tmp_path})
    assert not list(path.parent.glob("*.tmp"))

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["version"] == 1
    assert raw["state_dict"]["model.0.conv.weight"].dtype == torch.float16
    assert raw["config"] == {"epochs": 3, "hyp": {"lr0": 0.01}, "data": "coco128"}
    assert isinstance(raw["date"], str) and raw["extra"] == {"where": str(tmp_path)}

    ck = load_checkpoint(path)
    assert ck.source == "native" and ck.epoch == 2 and ck.best_fitness == 0.5 and ck.updates == 7
    assert ck.names == ["a", "b", "c"] and ck.stride == [8.0, 16.0, 32.0] and ck.model_yaml["nc"] == 3
    sd = model.state_dict()
    assert set(ck.state_dict) == set(sd)
    assert all(torch.equal(ck.state_dict[k], sd[k].half().float()) for k in sd if sd[k].is_floating_point())
    assert torch.equal(ck.ema_state_dict["model.0.conv.weight"], ema.model[0].conv.weight.half().float())
    assert len(ck.optimizer["state"]) > 0
    opt2 = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(ck.optimizer)

    loaded, ck2 = load_model(path)
    assert loaded.names == ["a", "b", "c"] and loaded.nc == 3
    ref = model.half().float().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], ref(x)[0], atol=1e-5)

    stripped = strip_optimizer(path, tmp_path / "best.pt")
    ck3 = load_checkpoint(stripped)
    assert ck3.optimizer is None and ck3.ema_state_dict is None and ck3.epoch == -1 and ck3.best_fitness is None
    assert torch.equal(ck3.state_dict["model.0.conv.weight"], ck.ema_state_dict["model.0.conv.weight"])
    assert stripped.stat().st_size < path.stat().st_size


@needs_weights
def test_strip_converts_upstream_file(tmp_path):
    out = strip_optimizer(WEIGHTS, tmp_path / "yolov5n_native.pt")
    assert torch.load(out, weights_only=True)["format"] == FORMAT_NAME
    ck = load_checkpoint(out)
    assert ck.names[0] == "person" and len(ck.state_dict) == 349
