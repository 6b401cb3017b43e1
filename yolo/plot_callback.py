"""Training plots as a trainer callback: ``labels.jpg`` at the start, the first batches of the first epoch
(``train_batch0-2.jpg``) and ``results.png`` at the end. Drawing happens in the background and never stops a run."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from yolo.data.plots import plot_images, plot_labels, run_in_background
from yolo.plots import plot_results

log = logging.getLogger("yolo")


class PlotsCallback:
    """Attached by :func:`yolo.train.train` unless ``noplots``; draws on rank 0 only."""

    def on_train_start(self, trainer: Any) -> None:
        if trainer.resumed or trainer.cfg.noplots:
            return
        try:
            present = [lb for lb in trainer.dataset.labels if len(lb)]
            labels = np.concatenate(present, 0) if present else np.zeros((0, 5))
            run_in_background(plot_labels, labels, trainer.names, trainer.save_dir / "labels.jpg")
        except Exception as e:
            log.warning(f"WARNING: labels plot failed: {e}")

    def on_train_batch_end(self, trainer: Any) -> None:
        ni = trainer.batch_index + trainer.batches_per_epoch * trainer.epoch
        if not trainer.main or trainer.cfg.noplots or trainer.epoch != trainer.start_epoch or ni >= 3:
            return
        imgs, targets, paths = trainer.batch
        try:
            run_in_background(plot_images, (imgs.detach().cpu() * 255).to(torch.uint8), targets.cpu(), list(paths),
                              trainer.save_dir / f"train_batch{ni}.jpg", trainer.names)
        except Exception as e:
            log.warning(f"WARNING: batch plot failed: {e}")

    def on_train_end(self, trainer: Any) -> None:
        if trainer.status != "FINISHED" or trainer.cfg.noplots:
            return
        try:
            plot_results(trainer.csv_path, trainer.save_dir / "results.png")
        except Exception as e:
            log.warning(f"WARNING: results plot failed: {e}")
