"""Model EMA (yolo.ema)."""

import math

import pytest
import torch
import torch.nn as nn

from yolo.ema import ModelEMA, copy_attr, ema_decay


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    m.nc, m.names, m.hyp = 2, ["a", "b"], {"lr0": 0.01}
    return m


def test_decay_formula():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema_decay(10**6) == pytest.approx(0.9999)
    assert ema_decay(10, decay=0.5, tau=10) == pytest.approx(0.5 * (1 - math.exp(-1)))
    ema = ModelEMA(_model(), decay=0.99, tau=100, updates=50)
    assert ema.decay() == pytest.approx(0.99 * (1 - math.exp(-0.5)))
    assert ema.decay(7) == pytest.approx(0.99 * (1 - math.exp(-0.07)))


def test_copy_is_independent_eval_and_frozen():
    model = _model()
    ema = ModelEMA(model)
    assert ema.ema is not model and not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for a, b in zip(ema.ema.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_update_moves_toward_model_by_the_formula():
    model = _model()
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked += 5
    ema.update(model)
    assert ema.updates == 1
    d = 0.9 * (1 - math.exp(-1.0))
    sd, msd = ema.ema.state_dict(), model.state_dict()
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * start[k] + (1 - d) * msd[k])
            if not torch.equal(start[k], msd[k]):  # closer to the model than before (running_var is unchanged)
                assert (v - msd[k]).abs().sum() < (start[k] - msd[k]).abs().sum()
        else:
            assert torch.equal(v, start[k])  # integer buffers are not averaged

    # repeated updates converge to a fixed model
    for _ in range(200):
        ema.update(model)
    for k, v in ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, msd[k], atol=1e-5, rtol=1e-5)


def test_first_update_with_zero_initial_count_ramp():
    # with the default tau the first updates follow the model almost completely
    model = _model()
    ema = ModelEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1)
    ema.update(model)
    w_ema, w = ema.ema[0].weight, model[0].weight
    d = ema_decay(1)
    assert d < 1e-3
    torch.testing.assert_close(w_ema, d * -w + (1 - d) * w)


def test_update_attr_and_state_dict_round_trip():
    model = _model()
    ema = ModelEMA(model)
    model.nc, model.names, model.extra = 5, ["x"] * 5, "hello"
    model.train()
    ema.update_attr(model, include=["nc", "names"])
    assert ema.ema.nc == 5 and ema.ema.names == ["x"] * 5 and not hasattr(ema.ema, "extra")
    ema.update_attr(model)  # everything public except 'training'
    assert ema.ema.extra == "hello" and not ema.ema.training

    ema.update(model)
    saved = {"ema": ema.ema.state_dict(), "updates": ema.updates}
    restored = ModelEMA(_model(), updates=saved["updates"])
    restored.ema.load_state_dict(saved["ema"])
    assert restored.updates == 1
    for a, b in zip(restored.ema.state_dict().values(), ema.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_copy_attr_rules():
    class Obj:
        pass

    src, dst = Obj(), Obj()
    src.a, src.b, src._c, src.process_group = 1, 2, 3, 4
    copy_attr(dst, src, exclude=("process_group",))
    assert (dst.a, dst.b) == (1, 2) and not hasattr(dst, "_c") and not hasattr(dst, "process_group")


def test_wrapped_model_is_unwrapped():
    model = _model()
    ema = ModelEMA(nn.DataParallel(model))
    assert isinstance(ema.ema, nn.Sequential)
    ema.update(nn.DataParallel(model))
    assert ema.updates == 1
