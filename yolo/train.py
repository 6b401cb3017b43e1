"""``train(cfg, callbacks) -> TrainResults``: the library's training entry, with the default integrations.

A :class:`yolo.engine.trainer.Trainer` with, in this order, the plots callback (unless ``noplots``), the MLflow
callback (when ``mlflow.enabled``), the DDP trace (when ``YOLO_DDP_TRACE`` is set), those named in
``YOLO_TRAIN_CALLBACKS`` (a Hydra sweep's trial reporter) and the caller's callbacks (e.g. evolution's pruning).
``Trainer(cfg, callbacks).fit()`` trains with none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from yolo.engine import distributed
from yolo.engine.callbacks import callbacks_from_env
from yolo.engine.distributed import TraceCallback
from yolo.engine.trainer import Trainer, TrainResults
from yolo.plot_callback import PlotsCallback
from yolo.tracking.callback import MlflowCallback

__all__ = ["TrainResults", "default_callbacks", "train"]


def default_callbacks(cfg) -> list[Any]:
    callbacks: list[Any] = []
    if not cfg.noplots:
        callbacks.append(PlotsCallback())
    if cfg.mlflow.enabled:
        callbacks.append(MlflowCallback())
    trace = TraceCallback.from_env()
    if trace is not None:
        callbacks.append(trace)
    return callbacks + callbacks_from_env(cfg)


def train(cfg, callbacks: Iterable[Any] = (), save_dir: str | Path | None = None) -> TrainResults:
    """Train a detector as configured by ``cfg`` (a validated :class:`yolo.config.TrainConfig`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is one process of a DDP run (see :mod:`yolo.engine.distributed`):
    each process trains on its share of every epoch; rank 0 alone validates, plots, saves checkpoints, logs to
    MLflow and calls the rank-0 events of ``callbacks``; every process returns rank 0's results.
    """
    info = distributed.DistInfo.from_env()
    try:
        with distributed.quiet_unless_main(info):
            return Trainer(cfg, [*default_callbacks(cfg), *callbacks], save_dir).fit()
    finally:
        distributed.shutdown()
