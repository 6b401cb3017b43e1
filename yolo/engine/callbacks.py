"""The trainer's events, and how callbacks listen to them (the shape of ultralytics' ``utils/callbacks``).

The trainer fires named events and knows no integration: MLflow tracking, plots, evolution's pruning reports and
the DDP trace are callbacks attached by whoever calls ``train(cfg, callbacks)``. A callback is any object with
methods named after the events it wants (others are skipped); every hook takes the
:class:`yolo.engine.trainer.Trainer`, whose state it reads (and ``ckpt_extra``, a dict every checkpoint records,
which it may add to):

======================  ====================================================================================
event                   fired (on rank 0 only under DDP, except where said) / what the trainer then holds
======================  ====================================================================================
``on_train_start``      model, data, optimizer and loaders are built: ``save_dir``, ``epochs``,
                        ``start_epoch``, ``nc``, ``names``, ``imgsz``, ``cfg``, ``resumed``
``on_train_epoch_start`` an epoch begins (every process): ``epoch``
``on_train_batch_end``  after each batch (every process): ``epoch``, ``batch_index``, ``batch``
                        (images as the model saw them, targets, paths), ``batches_per_epoch``
``on_train_epoch_end``  the batches of an epoch are done (every process): ``epoch``
``on_fit_epoch_end``    validation, fitness and ``results.csv`` are done: ``epoch``, ``metrics`` (upstream's
                        names, plus ``fitness``, ``best_fitness``), ``best_fitness``; may raise
                        :class:`StopTraining`
``on_model_save``       checkpoints were written: ``epoch``, ``saved`` (the paths written)
``on_train_end``        the run is over: ``results`` (a ``TrainResults``), ``status`` (``FINISHED``;
                        ``STOPPED`` or ``KILLED`` when a callback stopped it, ``KILLED`` for a pruned run;
                        ``FAILED`` when an error ends it, which is then raised)
======================  ====================================================================================

A plain function is an ``on_fit_epoch_end`` listener called as ``fn(epoch, metrics)``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

log = logging.getLogger("yolo")

EVENTS = (
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
)


class StopTraining(Exception):
    """Raised by an ``on_fit_epoch_end`` listener to end training cleanly after this epoch (a pruned trial)."""

    def __init__(self, reason: str = "stopped by callback", pruned: bool = False):
        super().__init__(reason)
        self.pruned = pruned


class Callback:
    """Optional base class: override the events you need (see the table above)."""

    def on_train_start(self, trainer: Any) -> None: ...
    def on_train_epoch_start(self, trainer: Any) -> None: ...
    def on_train_batch_end(self, trainer: Any) -> None: ...
    def on_train_epoch_end(self, trainer: Any) -> None: ...
    def on_fit_epoch_end(self, trainer: Any) -> None: ...
    def on_model_save(self, trainer: Any) -> None: ...
    def on_train_end(self, trainer: Any) -> None: ...


class _EpochFunction:
    """Adapts ``fn(epoch, metrics)`` to the ``on_fit_epoch_end`` event."""

    def __init__(self, fn):
        self.fn = fn

    def on_fit_epoch_end(self, trainer: Any) -> None:
        self.fn(trainer.epoch, trainer.metrics)


class CallbackList:
    """Dispatches each event to the callbacks that listen to it, in the order they were given."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = [cb if any(hasattr(cb, e) for e in EVENTS) or not callable(cb) else _EpochFunction(cb)
                          for cb in callbacks]

    def add(self, callback: Any) -> None:
        self.callbacks.extend(CallbackList([callback]).callbacks)

    def fire(self, event: str, trainer: Any) -> None:
        """Call ``event`` on every listener; exceptions (``StopTraining`` included) propagate to the trainer."""
        if event not in EVENTS:
            raise ValueError(f"unknown trainer event {event!r}; events: {', '.join(EVENTS)}")
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(trainer)


CALLBACKS_ENV = "YOLO_TRAIN_CALLBACKS"


def callbacks_from_env(cfg: Any) -> list[Any]:
    """The callbacks named in ``$YOLO_TRAIN_CALLBACKS`` (``package.module:factory``, comma-separated; each
    ``factory(cfg)`` returns a callback or None): how a launcher that starts trainings in other processes (a
    Hydra sweeper's jobs) attaches its integration to them. Read from the environment, never from a file."""
    import importlib

    out: list[Any] = []
    for spec in filter(None, (s.strip() for s in os.environ.get(CALLBACKS_ENV, "").split(","))):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ValueError(f"${CALLBACKS_ENV}: expected 'package.module:factory', got {spec!r}")
        callback = getattr(importlib.import_module(module), name)(cfg)
        if callback is not None:
            out.append(callback)
    return out
