"""The precision setting and upstream's AMP check."""

from __future__ import annotations

import logging

import pytest
import torch

from yolo.engine import precision as P
from yolo.errors import ConfigError
from yolo.models import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("setting, flags, mode", [
    ("auto", {"avx512_bf16"}, "bf16"), ("auto", {"amx_bf16", "avx2"}, "bf16"), ("auto", {"avx2"}, "off"),
    (True, {"amx_bf16"}, "bf16"), (False, {"amx_bf16"}, "off"), ("off", {"amx_bf16"}, "off"),
    ("bf16", set(), "bf16"), ("BF16", {"amx_bf16"}, "bf16"),
])
def test_choice_on_cpu(setting, flags, mode):
    p = P.choose(setting, CPU, flags=flags)
    assert p.mode == mode and p.reason
    assert p.scaler is False  # no scaler on CPU
    assert (p.dtype == torch.bfloat16) == (mode == "bf16")


@pytest.mark.parametrize("setting, match", [("fp16", "CUDA"), ("fp8", "one of"), ("half", "one of")])
def test_bad_or_impossible_choice_names_the_key(setting, match):
    with pytest.raises(ConfigError, match=rf"^amp: .*{match}"):
        P.choose(setting, CPU, flags={"amx_bf16"})


def test_cuda_auto_is_fp16_with_a_scaler():
    p = P.choose("auto", torch.device("cuda", 0))
    assert p.mode == "fp16" and p.scaler and p.dtype == torch.float16


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert P.cpu_fast_bf16(P.cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not P.cpu_fast_bf16(P.cpu_flags(info))
    assert P.cpu_flags(tmp_path / "missing") == set()


def test_amp_check_passes_for_a_sound_model():
    model = build_model("yolov5n", nc=80).to(memory_format=torch.channels_last)
    p = P.Precision("bf16", "cpu", "test")
    score, box = P.amp_disagreement(model, p)
    assert score <= P.SCORE_TOL and box <= P.BOX_TOL
    assert P.check_amp(model, p) is p
    assert model.training  # left as it was


def test_amp_check_turns_amp_off_when_outputs_disagree(caplog):
    """A model whose head goes wrong under autocast (as with broken AMP kernels): AMP is turned off, loudly."""
    model = build_model("yolov5n", nc=80)

    def broken_under_autocast(module, inputs, output):
        return output + 5.0 if torch.is_autocast_enabled("cpu") else output

    for conv in model.detect.m:
        conv.register_forward_hook(broken_under_autocast)
    with caplog.at_level(logging.WARNING, logger="yolo"):
        p = P.check_amp(model, P.Precision("bf16", "cpu", "test"))
    assert p.mode == "off" and not p.enabled and "AMP check failed" in p.reason
    assert any("AMP checks failed" in r.getMessage() for r in caplog.records)
