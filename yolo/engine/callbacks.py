"""Hooks that let a caller observe a training run (evolution's pruner, tests, custom loggers)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

log = logging.getLogger("yolo")


class StopTraining(Exception):
    """Raised by a callback to end training cleanly after the current epoch (e.g. a pruned trial)."""

    def __init__(self, reason: str = "stopped by callback", pruned: bool = False):
        super().__init__(reason)
        self.pruned = pruned


class Callback:
    """Base class: override what you need. Every hook is optional."""

    def on_train_start(self, info: Mapping[str, Any]) -> None:  # save_dir, epochs, start_epoch, nc, ...
        pass

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """``metrics`` uses upstream's names (train/box_loss, metrics/mAP_0.5, ..., fitness)."""

    def on_train_end(self, results: Any) -> None:
        pass


class CallbackList:
    """Dispatches to callbacks; a plain function is treated as an ``on_epoch_end`` hook."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is None and callable(cb) and hook == "on_epoch_end":
                fn = cb
            if fn is not None:
                fn(*args)

    def on_train_start(self, info) -> None:
        self._call("on_train_start", info)

    def on_epoch_end(self, epoch, metrics) -> None:
        self._call("on_epoch_end", epoch, metrics)  # StopTraining propagates to the trainer

    def on_train_end(self, results) -> None:
        self._call("on_train_end", results)
