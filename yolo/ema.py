"""Exponential moving average of a model's weights (YOLOv5 / timm style).

The averaged copy ``ema.ema`` is kept in eval mode with gradients off. After the ``n``-th update its floating
point parameters and buffers are ``d * ema + (1 - d) * model`` with ``d = decay * (1 - exp(-n / tau))``: the ramp
makes the average follow the model closely early in training. Integer buffers (e.g. BatchNorm's
``num_batches_tracked``) are left as copied at construction. To checkpoint, save ``ema.ema.state_dict()`` (or the
module) and ``ema.updates``; to resume, build ``ModelEMA(model, updates=saved_updates)`` and load the state dict
into ``ema.ema``.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn

from yolo.models.yolo import unwrap_model

__all__ = ["ModelEMA", "ema_decay", "copy_attr"]


def ema_decay(updates: int, decay: float = 0.9999, tau: float = 2000) -> float:
    """The averaging weight after ``updates`` updates: ``decay * (1 - exp(-updates / tau))``."""
    return decay * (1 - math.exp(-updates / tau))


def copy_attr(dst, src, include=(), exclude=()) -> None:
    """Copy the public instance attributes of ``src`` onto ``dst``.

    Names starting with ``_`` are never copied, nor those in ``exclude``; a non-empty ``include`` restricts the
    copy to those names. ``training`` is only copied when named in ``include`` (so the EMA stays in eval mode).
    """
    for k, v in vars(src).items():
        if k.startswith("_") or k in exclude or (include and k not in include):
            continue
        if k == "training" and "training" not in include:
            continue
        setattr(dst, k, v)


class ModelEMA:
    """Moving average of ``model``'s state.

    Args:
        model: the model being trained (DataParallel/DDP wrappers are looked through).
        decay: the asymptotic averaging weight.
        tau: ramp time constant in updates.
        updates: number of updates already done (when resuming).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(unwrap_model(model)).eval()
        self.updates = updates
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int | None = None) -> float:
        """The averaging weight used at update count ``updates`` (default: the current count)."""
        return ema_decay(self.updates if updates is None else updates, self.decay_max, self.tau)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one update and move the floating point parameters and buffers toward ``model``'s."""
        self.updates += 1
        d = self.decay()
        msd = unwrap_model(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach().to(v.dtype), alpha=1 - d)

    def update_attr(self, model: nn.Module, include=(), exclude=("process_group", "reducer")) -> None:
        """Copy plain attributes (e.g. ``nc``, ``names``, ``hyp``, ``stride``) from ``model`` onto the EMA."""
        copy_attr(self.ema, unwrap_model(model), include, exclude)
