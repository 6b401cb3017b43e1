"""One training epoch over objects, not the config (the shape of torchvision's ``train_one_epoch``).

:class:`Stepper` owns what happens after the forward pass: the (scaled) backward pass, accumulation up to the
nominal batch, gradient clipping, the optimizer step and the EMA update. :func:`train_one_epoch` feeds it batches
and reports each one to ``on_batch``; it raises :class:`TrainingDiverged` as soon as the loss is NaN or infinite,
before that loss reaches the weights.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolo.engine import distributed
from yolo.engine.precision import Precision
from yolo.errors import UserError
from yolo.utils.progress import progress

PROGRESS_HEADER = ("%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops, keeping the last good checkpoint."""


class Stepper:
    """Backward, accumulation, clipping, optimizer step and EMA update for one model (``world_size`` processes)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 ema: Any = None, world_size: int = 1, accumulate: int = 1):
        self.model, self.optimizer, self.scaler, self.ema = model, optimizer, scaler, ema
        self.world_size = world_size
        self.accumulate = accumulate
        self.last_step = -1  # global index of the batch of the last optimizer step
        self.steps = 0

    def due(self, ni: int) -> bool:
        return ni - self.last_step >= self.accumulate

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over the processes; scaling restores the sum over the global batch
        self.scaler.scale(loss * self.world_size).backward()

    def step(self, ni: int) -> None:
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        self.last_step = ni
        self.steps += 1


def multi_scale(imgs: torch.Tensor, imgsz: int, gs: int, rng: random.Random) -> torch.Tensor:
    """Resize a batch to a random size in [0.5, 1.5] x ``imgsz`` (a multiple of ``gs``), as upstream."""
    size = rng.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = size / max(imgs.shape[2:])
    if sf != 1:
        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
        imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
    return imgs


def diverged_message(loss: torch.Tensor, epoch: int, batch: int, last: Path | None) -> str:
    kept = f"the last good checkpoint is {last}" if last is not None and last.exists() else "no checkpoint was saved"
    return (f"training diverged: the loss is {float(loss.detach().float().sum())} at epoch {epoch}, batch {batch}; "
            f"stopped, {kept} (try a lower hyp.lr0 or hyp.warmup_bias_lr)")


def train_one_epoch(model: nn.Module, loader, compute_loss: Callable, stepper: Stepper, device: torch.device,
                    epoch: int, epochs: int, *, warmup: Callable[[int, int], int | None] = lambda ni, e: None,
                    resize: Callable[[torch.Tensor], torch.Tensor] | None = None, precision: Precision | None = None,
                    on_batch: Callable[[int, tuple], None] | None = None, show: bool = True,
                    last_checkpoint: Path | None = None) -> torch.Tensor:
    """Train ``model`` for one pass over ``loader``; returns the mean (box, obj, cls) loss of the epoch.

    ``warmup(ni, epoch)`` may set learning rates for global batch ``ni`` and return the accumulation to use;
    ``resize`` changes a batch's size (multi-scale); ``precision`` runs the forward pass and the loss under
    autocast (weights, optimizer and EMA stay fp32); ``on_batch(i, (imgs, targets, paths))`` sees each batch.
    """
    model.train()
    nb = len(loader)
    mloss = torch.zeros(3, device=device)
    pbar = progress(enumerate(loader), total=nb, bar_format="{l_bar}{bar:10}{r_bar}", disable=not show)
    stepper.optimizer.zero_grad()
    for i, (imgs, targets, paths, _) in pbar:
        ni = i + nb * epoch
        imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last).float() / 255
        accumulate = warmup(ni, epoch)
        if accumulate is not None:
            stepper.accumulate = accumulate
        if resize is not None:
            imgs = resize(imgs)
        step_now = stepper.due(ni)
        with distributed.gradient_sync(model, step_now):
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                loss, loss_items = compute_loss(model(imgs), targets.to(device))
            if not bool(torch.isfinite(loss).all()):
                raise TrainingDiverged(diverged_message(loss, epoch, i, last_checkpoint))
            stepper.backward(loss)
        if step_now:
            stepper.step(ni)
        mloss = (mloss * i + loss_items) / (i + 1)
        if show:
            mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
            pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                f"{epoch}/{epochs - 1}", mem, *mloss, targets.shape[0], imgs.shape[-1]))
        if on_batch is not None:
            on_batch(i, (imgs, targets, paths))
    return mloss
