"""The training engine's pure parts against upstream YOLOv5's formulas: optimizer groups, warmup, schedules,
accumulation, early stopping, freezing, multi-scale sizes."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from yolo.engine.loop import multi_scale
from yolo.engine.optim import (
    accumulate_steps,
    apply_warmup,
    build_optimizer,
    lr_lambda,
    scaled_weight_decay,
    warmup_iterations,
)
from yolo.engine.trainer import EarlyStopping, freeze_layers
from yolo.models import build_model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)  # weight and bias


def test_three_parameter_groups_in_upstreams_order():
    net = _Net()
    opt = build_optimizer(net, "SGD", lr=0.01, momentum=0.937, decay=5e-4)
    biases, weights, norms = (g["params"] for g in opt.param_groups)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(biases) == {id(net.bn.bias), id(net.head.bias)}
    assert ids(weights) == {id(net.conv.weight), id(net.head.weight)}
    assert ids(norms) == {id(net.bn.weight)}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.937


@pytest.mark.parametrize("name, cls", [("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW)])
def test_adam_betas_take_momentum(name, cls):
    opt = build_optimizer(_Net(), name, lr=0.001, momentum=0.9, decay=1e-4)
    assert isinstance(opt, cls)
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4, 0.0]


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer.name"):
        build_optimizer(_Net(), "rmsprop", 0.01, 0.9, 0.0)


@pytest.mark.parametrize("cos", [False, True])
def test_schedule_matches_upstream(cos):
    epochs, lrf = 30, 0.01
    lf = lr_lambda(lrf, epochs, cos)
    for x in (0, 1, 7, 15, 29, 30):
        if cos:  # upstream's one_cycle(1, lrf, epochs)
            want = ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
        else:  # upstream's linear lambda
            want = (1 - x / epochs) * (1.0 - lrf) + lrf
        assert lf(x) == pytest.approx(want, abs=1e-12)
    assert lf(0) == pytest.approx(1.0) and lf(epochs) == pytest.approx(lrf)


@pytest.mark.parametrize("batch, acc, decay", [(16, 4, 5e-4), (64, 1, 5e-4), (8, 8, 5e-4), (128, 1, 1e-3),
                                               (24, 3, 5e-4)])
def test_accumulation_and_decay_scaling(batch, acc, decay):
    assert accumulate_steps(batch) == acc  # nominal batch 64
    assert scaled_weight_decay(decay, batch) == pytest.approx(decay * batch * acc / 64)


def test_warmup_iterations_have_a_floor_of_100():
    assert warmup_iterations(3.0, 8) == 100
    assert warmup_iterations(3.0, 200) == 600
    assert warmup_iterations(0.5, 401) == 200


@pytest.mark.parametrize("ni", [0, 1, 37, 150, 299, 300])
def test_warmup_curves_match_upstream(ni):
    """lr: bias group from warmup_bias_lr down, others from 0 up, to initial_lr * lf(epoch); momentum from
    warmup_momentum to momentum; accumulation from 1 to 64 / batch."""
    hyp = SimpleNamespace(warmup_bias_lr=0.1, warmup_momentum=0.8, momentum=0.937)
    opt = build_optimizer(_Net(), "SGD", lr=0.01, momentum=0.937, decay=5e-4)
    for g in opt.param_groups:
        g["initial_lr"] = 0.01
    nw, batch, factor = 300, 16, 0.97
    acc = apply_warmup(opt, ni, nw, factor, hyp, batch)
    t = ni / nw
    assert acc == max(1, round(1 + t * (64 / batch - 1)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + t * (0.01 * factor - 0.1))
    for g in opt.param_groups[1:]:
        assert g["lr"] == pytest.approx(t * 0.01 * factor)
    for g in opt.param_groups:
        assert g["momentum"] == pytest.approx(0.8 + t * (0.937 - 0.8))


def test_early_stopping_counts_epochs_without_improvement():
    stop = EarlyStopping(patience=3)
    fits = [0.1, 0.2, 0.2, 0.15, 0.19, 0.18, 0.3]
    verdicts = [stop(e, f) for e, f in enumerate(fits)]
    # best at epoch 2 (ties count as improvement); epochs 3, 4 and 5 do not improve: stop after epoch 5
    assert verdicts == [False, False, False, False, False, True, False]
    assert stop.best_epoch == 6 and stop.best_fitness == 0.3


def test_early_stopping_off_with_zero_patience():
    stop = EarlyStopping(patience=0)
    assert not any(stop(e, 0.0 if e else 1.0) for e in range(500))


def test_freezing_first_layers_and_a_list():
    model = build_model("yolov5n", nc=3)
    frozen = freeze_layers(model, [10])
    assert frozen and all(int(n.split(".")[1]) < 10 for n in frozen)
    assert all(p.requires_grad == (int(n.split(".")[1]) >= 10) for n, p in model.named_parameters())
    frozen = freeze_layers(model, [0, 24])
    assert {int(n.split(".")[1]) for n in frozen} == {0, 24}
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.10."))


def test_multi_scale_sizes_are_stride_multiples_within_half_to_one_and_a_half():
    rng, imgs = random.Random(0), torch.zeros(2, 3, 320, 256)
    seen = set()
    for _ in range(200):
        out = multi_scale(imgs, 320, 32, rng)
        h, w = out.shape[2:]
        assert h % 32 == 0 and w % 32 == 0
        assert 160 <= max(h, w) <= 480 + 32
        assert abs(h / w - 320 / 256) < 0.2  # aspect kept (up to rounding to the stride)
        seen.add(max(h, w))
    assert len(seen) > 5 and min(seen) < 224 and max(seen) > 416
    assert np.isclose(out.float().mean().item(), 0.0)
