"""DataLoader construction: epoch-aware seeded sampling, seeded workers that live across epochs.

The sampler runs in the main process and yields :class:`~yolo.data.dataset.Draw` keys ``(index, epoch, slot)``;
each sample's augmentation randomness derives from its key, so batches depend only on ``seed`` and the epoch,
not on the number of workers. The epoch is the dataset's ``epoch`` (``dataset.set_epoch(e)``, or
``loader.set_epoch(e)``); when nobody sets it, each new pass over the loader moves on to the next epoch.
"""

from __future__ import annotations

import logging
import os
import random

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from yolo.data.dataset import Draw, YoloDataset

log = logging.getLogger("yolo")
PIN_MEMORY = str(os.getenv("PIN_MEMORY", "true")).lower() == "true"
ORDER_STREAM = 0x5A3  # salt that keeps the epoch order's random stream apart from the per-sample streams


class EpochSampler(Sampler):
    """Sequential, shuffled or image-weighted order of one epoch, drawn from ``(seed, epoch)``."""

    def __init__(self, dataset: YoloDataset, shuffle: bool = False, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, epoch, ORDER_STREAM])
        weights = self.dataset.image_weights
        if weights is not None:
            return rng.choice(n, size=n, p=weights / weights.sum())
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        epoch = self.dataset.epoch
        self.dataset.epoch = epoch + 1  # the next pass is the next epoch unless someone sets it
        return iter([Draw(int(i), epoch, slot) for slot, i in enumerate(self.order(epoch))])


class YoloDataLoader(DataLoader):
    """A DataLoader with ``set_epoch`` (forwarded to the dataset)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def _init_worker(worker_id: int) -> None:
    """Seed the global generators from torch's per-worker seed; keep OpenCV single-threaded in workers."""
    cv2.setNumThreads(0)
    seed = get_worker_info().seed % 2**32
    np.random.seed(seed)
    random.seed(seed)


def create_dataloader(path, imgsz: int, batch_size: int, stride: int, hyp=None, augment: bool = False,
                      rect: bool = False, pad: float = 0.0, workers: int = 8, shuffle: bool = False, seed: int = 0,
                      cache: str | bool | None = None, image_weights: bool = False, single_cls: bool = False,
                      nc: int = 80, prefix: str = "") -> tuple[YoloDataLoader, YoloDataset]:
    """``(loader, dataset)`` for ``path`` (folder / .txt list / list of them); batches are
    ``(images uint8 (B, 3, H, W), targets (N, 6), paths, shapes)``."""
    if rect and shuffle:
        log.warning(f"{prefix}WARNING: rect=True is incompatible with shuffle, setting shuffle=False")
        shuffle = False
    dataset = YoloDataset(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, stride=int(stride), pad=pad,
                          single_cls=single_cls, cache=cache, image_weights=image_weights, nc=nc, seed=seed,
                          prefix=prefix, workers=workers)
    batch_size = min(batch_size, len(dataset))
    nw = min(os.cpu_count() or 1, batch_size if batch_size > 1 else 0, workers)
    generator = torch.Generator()
    generator.manual_seed(6148914691236517205 + seed)
    return YoloDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset, shuffle=shuffle, seed=seed),
        num_workers=nw,
        # image weights change between epochs in the main process: fresh workers pick them up
        persistent_workers=nw > 0 and not image_weights,
        pin_memory=PIN_MEMORY and torch.cuda.is_available(),
        collate_fn=YoloDataset.collate_fn,
        worker_init_fn=_init_worker,
        generator=generator,
    ), dataset
