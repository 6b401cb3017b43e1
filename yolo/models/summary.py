"""One-line model summary: layers, parameters, gradients and GFLOPs, in upstream's wording.

FLOPs come from ``torch.utils.flop_counter`` (which counts 2 FLOPs per multiply-accumulate of convolutions and
matrix products), measured on one image of the model's largest stride and scaled to ``imgsz`` as upstream does;
convolution cost is linear in the number of output pixels, so the scaling is exact for multiples of that stride.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, number of parameters that require gradients)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """Forward-pass GFLOPs of ``model`` for one ``imgsz`` image (``(h, w)`` or a square side)."""
    p = next(model.parameters())
    stride = getattr(model, "stride", None)
    s = max(int(stride.max()), 32) if isinstance(stride, torch.Tensor) and stride.numel() else 32
    ch = getattr(model, "yaml", {}).get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    h, w = (imgsz, imgsz) if isinstance(imgsz, (int, float)) else imgsz
    was_training = model.training
    model.eval()  # eval: BatchNorm statistics stay untouched
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, ch, s, s, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9 * (h / s) * (w / s)


def model_name(model: nn.Module) -> str:
    """``YOLOv5s`` for a model built from ``yolov5s.yaml``, ``Model`` when the file is unknown."""
    yaml_file = getattr(model, "yaml_file", None)
    return Path(yaml_file).stem.replace("yolov5", "YOLOv5") if yaml_file else "Model"


def model_summary(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> str:
    """``"<name> summary: N layers, P parameters, G gradients, F GFLOPs"``."""
    n_p, n_g = count_parameters(model)
    layers = len(list(model.modules()))
    gflops = model_gflops(model, imgsz)
    return f"{model_name(model)} summary: {layers} layers, {n_p} parameters, {n_g} gradients, {gflops:.1f} GFLOPs"
