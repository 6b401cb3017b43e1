"""DataLoader construction: epoch-aware seeded sampling, seeded workers that live across epochs.

The sampler runs in the main process and yields :class:`~yolo.data.dataset.Draw` keys ``(index, epoch, slot)``;
each sample's augmentation randomness derives from its key, so batches depend only on ``seed`` and the epoch,
not on the number of workers. The epoch is the dataset's ``epoch`` (``dataset.set_epoch(e)``, or
``loader.set_epoch(e)``); when nobody sets it, each new pass over the loader moves on to the next epoch.
Under DDP each process's sampler keeps a disjoint share of every epoch's order (``rank``, ``world_size``).
"""

from __future__ import annotations

import functools
import logging
import math
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
    """Sequential, shuffled or image-weighted order of one epoch, drawn from ``(seed, epoch)``.

    With ``world_size > 1`` (DDP) every process computes the same epoch order, pads it to a multiple of
    ``world_size`` by repeating its last entry, and keeps the positions ``rank, rank + world_size, ...``: the
    processes' shares are disjoint and together cover the epoch.  A draw's ``slot`` is its position in the whole
    (padded) order, so each sample gets the same augmentation however many processes share the epoch.
    Repeating the last entry keeps padding inside the last rectangular batch of a sequential (``rect``) order.
    """

    def __init__(self, dataset: YoloDataset, shuffle: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not a process of world_size={world_size}")
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        """The whole epoch's order of image indices (the same in every process)."""
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, epoch, ORDER_STREAM])
        weights = self.dataset.image_weights
        if weights is not None:
            return rng.choice(n, size=n, p=weights / weights.sum())
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def draws(self, epoch: int) -> list[Draw]:
        """This process's share of epoch ``epoch``."""
        order = self.order(epoch)
        padding = -len(order) % self.world_size
        if padding and len(order):
            order = np.concatenate([order, np.full(padding, order[-1])])
        slots = range(self.rank, len(order), self.world_size)
        return [Draw(int(order[slot]), epoch, slot) for slot in slots]

    def __iter__(self):
        epoch = self.dataset.epoch
        self.dataset.epoch = epoch + 1  # the next pass is the next epoch unless someone sets it
        return iter(self.draws(epoch))


class YoloDataLoader(DataLoader):
    """A DataLoader with ``set_epoch`` (forwarded to the dataset)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to serve large blocks from the heap and keep freed ones (Linux, glibc only).

    A worker allocates and frees the same few megabyte-sized arrays for every sample (decoded tiles, outputs).
    By default glibc serves each with a fresh ``mmap`` and unmaps it on free, so every sample pays page faults
    and zeroing for all of them again: measured 0.6 ms per decoded 640x480 JPEG on top of its 2.5 ms decode.
    Raising the mmap and trim thresholds lets the blocks be reused; the worker's footprint stays at its peak.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest value glibc accepts on 64-bit
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # not glibc: leave the allocator as it is
        pass


def _init_worker(worker_id: int) -> None:
    """Seed the global generators from torch's per-worker seed; keep OpenCV single-threaded in workers; let
    the worker reuse its freed memory (:func:`_keep_freed_memory`)."""
    cv2.setNumThreads(0)
    _keep_freed_memory()
    seed = get_worker_info().seed % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _cpus_per_process() -> int:
    """This machine's CPUs shared among the training processes torchrun started on it (``LOCAL_WORLD_SIZE``)."""
    local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max((os.cpu_count() or 1) // local_processes, 1)


def create_dataloader(path, imgsz: int, batch_size: int, stride: int, hyp=None, augment: bool = False,
                      rect: bool = False, pad: float = 0.0, workers: int = 8, shuffle: bool = False, seed: int = 0,
                      cache: str | bool | None = None, image_weights: bool = False, single_cls: bool = False,
                      nc: int = 80, prefix: str = "", rank: int = 0,
                      world_size: int = 1) -> tuple[YoloDataLoader, YoloDataset]:
    """``(loader, dataset)`` for ``path`` (folder / .txt list / list of them); batches are
    ``(images uint8 (B, 3, H, W), targets (N, 6), paths, shapes)``.

    Under DDP (``world_size`` processes) ``batch_size`` is the global batch: this process's loader yields
    ``batch_size / world_size`` images of its share of each epoch (see :class:`EpochSampler`), and rectangular
    batches are shaped for the global batch, so that every process's batch falls inside one of them.
    """
    if world_size > 1 and batch_size % world_size:
        raise ValueError(f"{prefix}batch_size={batch_size} is not a multiple of world_size={world_size}")
    if rect and shuffle:
        log.warning(f"{prefix}WARNING: rect=True is incompatible with shuffle, setting shuffle=False")
        shuffle = False
    dataset = YoloDataset(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, stride=int(stride), pad=pad,
                          single_cls=single_cls, cache=cache, image_weights=image_weights, nc=nc, seed=seed,
                          prefix=prefix, workers=workers)
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    batch_size = min(batch_size // world_size, len(sampler))
    nw = min(_cpus_per_process(), batch_size if batch_size > 1 else 0, workers)
    generator = torch.Generator()
    generator.manual_seed(6148914691236517205 + seed)
    return YoloDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=nw,
        # image weights change between epochs in the main process: fresh workers pick them up
        persistent_workers=nw > 0 and not image_weights,
        pin_memory=PIN_MEMORY and torch.cuda.is_available(),
        collate_fn=functools.partial(YoloDataset.collate_fn, reuse_blocks=not rect),
        worker_init_fn=_init_worker,
        generator=generator,
    ), dataset
