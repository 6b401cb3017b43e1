"""Model zoo: YAML parsing, parameter counts, upstream state-dict names, forward contract, fusion, summary."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from yolo.models import (
    C3,
    Conv,
    Detect,
    DetectionModel,
    build_model,
    make_divisible,
    model_summary,
    parse_model,
)

ROOT = Path(__file__).resolve().parents[1]
CONF_MODEL = ROOT / "conf" / "model"

# Upstream v7.0's parameter counts at nc=80.
PARAMS = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "yolov5m": 21_190_557,
    "yolov5l": 46_563_709,
    "yolov5x": 86_749_405,
}


@pytest.fixture(scope="module")
def yolov5n() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(CONF_MODEL / "yolov5n.yaml")


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_upstream(name):
    cfg = OmegaConf.load(CONF_MODEL / f"{name}.yaml")  # as Hydra hands the config group entry over
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.save == [4, 6, 10, 14, 17, 20, 23]


def test_zoo_yaml_files_differ_only_in_multiples():
    cfgs = {n: OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{n}.yaml")) for n in PARAMS}
    multiples = {n: (c.pop("depth_multiple"), c.pop("width_multiple")) for n, c in cfgs.items()}
    assert multiples == {
        "yolov5n": (0.33, 0.25),
        "yolov5s": (0.33, 0.50),
        "yolov5m": (0.67, 0.75),
        "yolov5l": (1.0, 1.0),
        "yolov5x": (1.33, 1.25),
    }
    first = cfgs["yolov5n"]
    assert all(c == first for c in cfgs.values())
    assert first["head"][1] == [-1, 1, "nn.Upsample", ["None", 2, "nearest"]]
    assert first["head"][-1] == [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]


def test_state_dict_names_follow_upstream(yolov5n):
    sd = yolov5n.state_dict()
    assert len(sd) == 349
    for key in [
        "model.0.conv.weight",
        "model.0.bn.running_var",
        "model.2.m.0.cv1.bn.running_mean",
        "model.2.cv3.conv.weight",
        "model.9.cv2.bn.num_batches_tracked",
        "model.24.m.0.weight",
        "model.24.m.2.bias",
        "model.24.anchors",
    ]:
        assert key in sd, key
    assert "model.24.stride" not in sd  # non-persistent buffer
    assert sd["model.0.conv.weight"].shape == (16, 3, 6, 6)  # stem: 6x6, stride 2, pad 2
    assert sd["model.24.m.0.weight"].shape == (255, 64, 1, 1)
    assert yolov5n.model[0].conv.stride == (2, 2) and yolov5n.model[0].conv.padding == (2, 2)
    assert yolov5n.model[0].conv.bias is None
    assert isinstance(yolov5n.model[11], nn.Upsample) and yolov5n.model[11].mode == "nearest"
    assert yolov5n.model[2].type.endswith("C3") and yolov5n.model[2].f == -1 and yolov5n.model[12].f == [-1, 6]


def test_depth_and_width_rounding():
    assert make_divisible(64 * 0.25, 8) == 16 and make_divisible(1024 * 1.25, 8) == 1280
    assert make_divisible(100 * 0.75, 8) == 80
    model = DetectionModel(CONF_MODEL / "yolov5m.yaml")
    # yolov5m: depth 0.67 -> C3 repeats 3,6,9,3 -> 2,4,6,2 ; width 0.75
    assert [len(model.model[i].m) for i in (2, 4, 6, 8)] == [2, 4, 6, 2]
    assert model.model[0].conv.out_channels == 48
    assert model.model[13].m[0].add is False  # head C3 blocks without shortcut
    assert model.model[2].m[0].add is True


def test_batchnorm_and_activation(yolov5n):
    bns = [m for m in yolov5n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    acts = {id(m.act) for m in yolov5n.modules() if isinstance(m, Conv)}
    assert len(acts) == 1 and isinstance(yolov5n.model[0].act, nn.SiLU)


def test_anchors_in_grid_units_and_bias_prior(yolov5n):
    det = yolov5n.detect
    assert isinstance(det, Detect) and det.anchors.shape == (3, 3, 2)
    assert torch.allclose(det.anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))
    assert torch.allclose(det.anchors[2, 2], torch.tensor([373 / 32, 326 / 32]))
    # bias prior on a fresh model: conv init bias + log(8 / (640/s)^2) for obj, + log(0.6/(nc-0.99999)) for cls
    torch.manual_seed(1)
    fresh = DetectionModel(CONF_MODEL / "yolov5n.yaml")
    torch.manual_seed(1)
    seq, _ = parse_model(OmegaConf.load(CONF_MODEL / "yolov5n.yaml"))
    for conv_ref, conv, s in zip(seq[-1].m, fresh.detect.m, (8, 16, 32)):
        b0, b = conv_ref.bias.view(3, -1), conv.bias.detach().view(3, -1)
        assert torch.allclose(b[:, 4] - b0[:, 4], torch.full((3,), math.log(8 / (640 / s) ** 2)), atol=1e-5)
        assert torch.allclose(b[:, 5:] - b0[:, 5:], torch.full((3, 80), math.log(0.6 / (80 - 0.99999))), atol=1e-5)


def test_anchor_order_is_checked():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / "yolov5n.yaml"))
    cfg["anchors"] = cfg["anchors"][::-1]  # largest anchors on P3: upstream flips them back
    model = DetectionModel(cfg)
    assert torch.allclose(model.detect.anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))


def test_forward_train_and_eval_shapes(yolov5n):
    x = torch.rand(2, 3, 128, 96)
    yolov5n.train()
    out = yolov5n(x)
    assert [tuple(t.shape) for t in out] == [(2, 3, 16, 12, 85), (2, 3, 8, 6, 85), (2, 3, 4, 3, 85)]
    out[0].sum().backward()  # gradients flow
    assert yolov5n.model[0].conv.weight.grad is not None
    yolov5n.zero_grad(set_to_none=True)
    yolov5n.eval()
    with torch.no_grad():
        pred, raw = yolov5n(x)
    assert pred.shape == (2, 3 * (16 * 12 + 8 * 6 + 4 * 3), 85)
    assert len(raw) == 3 and raw[2].shape == (2, 3, 4, 3, 85)
    # decoding of one cell by hand: level 1, anchor 2, cell (y=5, x=4)
    p = raw[1][0, 2, 5, 4].sigmoid()
    offset = 3 * 16 * 12 + (2 * 8 * 6 + 5 * 6 + 4)
    expect_xy = (p[:2] * 2 - 0.5 + torch.tensor([4.0, 5.0])) * 16
    expect_wh = (p[2:4] * 2) ** 2 * yolov5n.detect.anchors[1, 2] * 16
    assert torch.allclose(pred[0, offset, :2], expect_xy, atol=1e-4)
    assert torch.allclose(pred[0, offset, 2:4], expect_wh, atol=1e-4)
    assert torch.allclose(pred[0, offset, 4:], p[4:], atol=1e-6)


def test_nc_override_and_names():
    model = build_model(CONF_MODEL / "yolov5n.yaml", nc=3)
    assert model.nc == 3 and model.yaml["nc"] == 3 and model.names == ["0", "1", "2"]
    assert model.detect.m[0].out_channels == 3 * 8
    assert build_model("yolov5n").yaml_file == "yolov5n.yaml"  # zoo name
    model.nc = 3  # assigning the same value is allowed (upstream's training does it)
    with pytest.raises(ValueError):
        model.nc = 4
    model.stride = [8, 16, 32]
    assert model.stride.tolist() == [8.0, 16.0, 32.0] and model.detect.stride is model.stride


def test_fuse_matches_unfused():
    torch.manual_seed(0)
    model = DetectionModel(CONF_MODEL / "yolov5n.yaml").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        x = torch.rand(1, 3, 64, 64)
        ref = model(x)[0]
        fused = model.fuse()
        assert fused is model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        out = model(x)[0]
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3)


def test_activation_override_is_local():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / "yolov5n.yaml"))
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    model = DetectionModel(cfg)
    assert isinstance(model.model[0].act, nn.LeakyReLU) and model.model[0].act.negative_slope == 0.1
    assert isinstance(DetectionModel(CONF_MODEL / "yolov5n.yaml").model[0].act, nn.SiLU)
    cfg["activation"] = "__import__('os').system('true')"
    with pytest.raises(ValueError, match="unsupported activation"):
        DetectionModel(cfg)


def test_unknown_module_is_rejected():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / "yolov5n.yaml"))
    cfg["backbone"][0][2] = "Focus"
    with pytest.raises(ValueError, match="unknown module 'Focus'"):
        DetectionModel(cfg)


def test_c3_block_shapes():
    block = C3(32, 64, n=2, shortcut=False)
    assert block(torch.rand(1, 32, 8, 8)).shape == (1, 64, 8, 8) and len(block.m) == 2


def test_summary_line(yolov5n):
    yolov5n.train()
    before = {k: v.clone() for k, v in yolov5n.state_dict().items()}
    line = model_summary(yolov5n, imgsz=640)
    assert line == "YOLOv5n summary: 214 layers, 1872157 parameters, 1872157 gradients, 4.5 GFLOPs"
    assert yolov5n.training  # mode restored
    after = yolov5n.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # counting FLOPs left BatchNorm stats alone


def test_summary_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "yolo.models", "model=yolov5n", "imgsz=320", "nc=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "YOLOv5n summary: 214 layers, 1767976 parameters, 1767976 gradients, 1.0 GFLOPs" in res.stdout
