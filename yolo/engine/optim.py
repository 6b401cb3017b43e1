"""Optimizer, learning-rate schedule and warmup, following upstream YOLOv5's recipe.

Parameter groups (in this order, as upstream builds them):
  0. biases (no weight decay; warmup starts them at ``hyp.warmup_bias_lr``),
  1. all other weights (decayed),
  2. normalisation-layer weights (no weight decay).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64  # upstream accumulates gradients up to this batch size


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """Split parameters into (biases, decayed weights, norm weights)."""
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    biases, weights, norm_weights = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif name == "weight" and isinstance(module, norm_types):
                norm_weights.append(p)
            else:
                weights.append(p)
    return biases, weights, norm_weights


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, decay: float,
                    nesterov: bool = True) -> torch.optim.Optimizer:
    biases, weights, norm_weights = parameter_groups(model)
    key = name.lower()
    if key == "sgd":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=nesterov)
    elif key == "adam":
        opt = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif key == "adamw":
        opt = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"optimizer.name={name!r} is not one of SGD, Adam, AdamW")
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    return opt


def lr_lambda(lrf: float, epochs: int, cos: bool = False) -> Callable[[float], float]:
    """LR multiplier per epoch: one-cycle cosine from 1 to ``lrf``, or linear from 1 to ``lrf``."""
    if cos:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


def accumulate_steps(batch_size: int) -> int:
    """Optimizer steps happen every this many batches, so the effective batch is about 64."""
    return max(round(NOMINAL_BATCH / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int) -> float:
    return weight_decay * batch_size * accumulate_steps(batch_size) / NOMINAL_BATCH


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int) -> int:
    return max(round(warmup_epochs * batches_per_epoch), 100)


def apply_warmup(optimizer: torch.optim.Optimizer, ni: int, nw: int, epoch_factor: float, hyp,
                 batch_size: int) -> int:
    """Set each group's lr/momentum for iteration ``ni`` of a warmup lasting ``nw`` iterations.

    The bias group ramps down from ``warmup_bias_lr``, the others up from 0, to ``initial_lr * lf(epoch)``;
    momentum ramps from ``warmup_momentum`` to ``momentum``.  Returns the accumulation for this iteration
    (1 at the start, growing to the nominal-batch value).
    """
    xi = [0, nw]
    accumulate = max(1, int(np.interp(ni, xi, [1, NOMINAL_BATCH / batch_size]).round()))
    for j, group in enumerate(optimizer.param_groups):
        start = hyp.warmup_bias_lr if j == 0 else 0.0
        group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * epoch_factor]))
        if "momentum" in group:  # SGD only; Adam's beta1 is not warmed up (as upstream)
            group["momentum"] = float(np.interp(ni, xi, [hyp.warmup_momentum, hyp.momentum]))
    return accumulate
