"""``YoloDataset``: images + labels → network-ready samples, with upstream YOLOv5's semantics.

* validation (``augment=False``, usually ``rect=True, pad=0.5``): each image resized so its long side is
  ``img_size`` (INTER_AREA when shrinking), letterboxed to its batch's shape; images sorted by aspect ratio
  so a batch shares one rectangle (upstream's exact ``batch_shapes`` rule);
* training (``augment=True``): 4-mosaic with probability ``hyp['mosaic']`` (+ MixUp of a second mosaic with
  ``hyp['mixup']``), otherwise letterbox + random perspective; then HSV gains and up-down / left-right flips.

Randomness: every sample draws from its own ``numpy.random.Generator`` seeded with ``(seed, epoch, slot,
index)``, where ``slot`` is the sample's position in the epoch's order. The loader's sampler hands these keys
to the workers (see :class:`Draw`), so a fixed seed gives the same batches whatever the number of workers and
however long workers live. Indexing with a plain integer uses ``(seed, self.epoch, index, index)``.
"""

from __future__ import annotations

import logging
import math
import os
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from yolo.boxes import xywhn2xyxy, xyxy2xywhn
from yolo.data.augment import (
    finish_rgb_chw,
    flip_labels,
    hsv_gains,
    letterbox,
    mixup,
    mosaic_perspective,
    random_perspective,
)
from yolo.data.config import DatasetError
from yolo.data.labels import img2label_paths, label_cache_path, list_image_files, scan_dataset, writable_cache_path
from yolo.data.transfer import stack_images
from yolo.utils.files import atomic_write, remove_stale_temps

log = logging.getLogger("yolo")

# augmentation hyperparameters used when ``hyp`` leaves one out (upstream's hyp.scratch-low values)
AUGMENT_DEFAULTS = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.5, shear=0.0,
                        perspective=0.0, flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.0)
RAM_SAFETY = 0.1  # keep this fraction of the available memory free when caching images in RAM
# cache="auto" keeps the resized images in RAM when they take at most this share of the available memory and at
# most this many bytes: decoding JPEGs in the loader workers otherwise competes with training for the CPU cores
AUTO_CACHE_SHARE = 0.25
AUTO_CACHE_MAX_BYTES = 4 * 2**30


class Draw(NamedTuple):
    """What the sampler hands the dataset: which image, and the epoch and slot its randomness derives from."""

    index: int
    epoch: int
    slot: int


def rect_batch_shapes(shapes_wh: np.ndarray, batch_size: int, img_size: int, stride: int, pad: float):
    """Upstream's rectangular batches: ``(order, batch_shapes)``.

    ``order`` sorts the images by aspect ratio ``h / w``; ``batch_shapes[b]`` = ``(h, w)`` of batch ``b`` of the
    sorted images: ``ceil(shape * img_size / stride + pad) * stride`` where ``shape`` is ``[max_ar, 1]`` when
    every image of the batch is wide, ``[1, 1 / min_ar]`` when every one is tall, else ``[1, 1]``.
    """
    ar = shapes_wh[:, 1] / shapes_wh[:, 0]
    order = ar.argsort()
    ar = ar[order]
    bi = np.floor(np.arange(len(ar)) / batch_size).astype(int)
    shapes = [[1, 1]] * (bi[-1] + 1)
    for b in range(len(shapes)):
        lo, hi = ar[bi == b].min(), ar[bi == b].max()
        if hi < 1:
            shapes[b] = [hi, 1]
        elif lo > 1:
            shapes[b] = [1, 1 / lo]
    return order, np.ceil(np.array(shapes) * img_size / stride + pad).astype(int) * stride


def image_weights_from_labels(labels: list[np.ndarray], class_weights) -> np.ndarray:
    """Upstream's ``labels_to_image_weights``: per image, sum over its objects of their class weight."""
    cw = np.asarray(class_weights, dtype=np.float64).reshape(-1)
    nc = len(cw)
    counts = np.array([np.bincount(lb[:, 0].astype(int), minlength=nc)[:nc] for lb in labels]).reshape(-1, nc)
    return (counts * cw[None]).sum(1)


class TileShapeMismatch(Exception):
    """A :class:`LazyImage` decoded to another shape than the one it announced."""


class LazyImage:
    """Stand-in for a BGR uint8 image: ``shape``/``ndim``/``dtype`` up front, decoded on first indexing.

    ``mosaic_perspective`` reads every tile's metadata for the layout but indexes only the tiles that
    reach the sampled part of the canvas; the others (about 1 in 11 at 640 with scale 0.5) are never decoded,
    which leaves the output unchanged.
    """

    __slots__ = ("shape", "_load", "_img")
    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, int, int], load):
        self.shape, self._load, self._img = shape, load, None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        if self._img is None:
            img = self._load()
            if img.shape != self.shape:
                raise TileShapeMismatch(f"expected {self.shape}, decoded {img.shape}")
            self._img = img
        return self._img[key]


class YoloDataset(Dataset):
    """Images from ``img_path`` (folder, ``.txt`` list, or a list of them) with their YOLO labels.

    Items are ``(image uint8 (3, H, W) RGB, targets (n, 6) [0, cls, cx, cy, w, h], path, shapes)``, ``shapes``
    being ``((h0, w0), ((h / h0, w / w0), (dw, dh)))`` for a letterboxed image and ``None`` for a mosaic.
    Attributes the trainer uses: ``labels`` (per image ``(n, 5)`` ``cls cx cy w h`` normalised), ``shapes``
    (``(n, 2)`` width, height), ``im_files``, ``batch_shapes`` (rect mode), ``n``.
    ``cache``: ``'ram'`` (or True) keeps resized images in memory, ``'disk'`` keeps decoded ones as ``.npy``,
    ``'auto'`` is ``'ram'`` when they fit :data:`AUTO_CACHE_SHARE` of the available memory and
    :data:`AUTO_CACHE_MAX_BYTES`, else no cache. A cached image is the same array the loader would have decoded.
    """

    def __init__(self, img_path, img_size: int = 640, batch_size: int = 16, augment: bool = False,
                 hyp: Mapping[str, Any] | None = None, rect: bool = False, stride: int = 32, pad: float = 0.0,
                 single_cls: bool = False, cache: str | bool | None = None, image_weights: bool = False,
                 nc: int = 80, seed: int = 0, prefix: str = "", workers: int = 8):
        self.img_size, self.batch_size, self.stride, self.pad = img_size, batch_size, stride, pad
        self.augment, self.seed, self.prefix = augment, seed, prefix
        given = {k: float(v) for k, v in (hyp or {}).items() if k in AUGMENT_DEFAULTS and v is not None}
        self.hyp = {**AUGMENT_DEFAULTS, **given}
        self.rect = rect and not image_weights  # upstream: image weights reorder freely, so no rectangles
        self.mosaic = augment and not self.rect
        self.epoch = 0
        self.image_weights: np.ndarray | None = None  # set by update_image_weights()

        files = list_image_files(img_path)
        cache_path = writable_cache_path(label_cache_path(img2label_paths(files), img_path))
        scan = scan_dataset(files, nc, cache_path, prefix=prefix, workers=workers, single_cls=single_cls)
        if augment and scan.instances == 0:
            raise DatasetError(f"{prefix}no labels in {scan.source}: cannot train on backgrounds only")
        self.im_files: list[str] = scan.im_files
        self.labels: list[np.ndarray] = [lb.copy() for lb in scan.labels]
        self.shapes: np.ndarray = scan.shapes  # (n, 2) width, height as scanned (EXIF-corrected)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.batch = np.arange(self.n) // batch_size  # batch index of each image
        self.batch_shapes = None
        if self.rect:
            self._sort_into_rect_batches()
        self.label_files = img2label_paths(self.im_files)
        self.ims: list[np.ndarray | None] = [None] * self.n
        self.im_hw0: list[tuple[int, int] | None] = [None] * self.n
        self.im_hw: list[tuple[int, int] | None] = [None] * self.n
        self.npy_files: list[Path | None] = [None] * self.n
        self.cache_bytes = 0
        if isinstance(cache, str):
            cache = None if cache.lower() in ("none", "false") else cache.lower()
        if cache == "auto":
            cache = "ram" if self._auto_cache_fits() else None
        if cache:
            self.cache_images("ram" if cache is True else cache, workers)

    def _sort_into_rect_batches(self) -> None:
        order, self.batch_shapes = rect_batch_shapes(self.shapes, self.batch_size, self.img_size, self.stride,
                                                     self.pad)
        self.im_files = [self.im_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Epoch the next pass draws its randomness (and shuffle order) from."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ images
    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """``(BGR image with long side img_size, (h0, w0) original, (h, w) resized)``."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        npy = self.npy_files[i]
        im = np.load(npy, allow_pickle=False) if npy is not None and npy.exists() else cv2.imread(self.im_files[i])
        if im is None:
            raise DatasetError(f"image not found or unreadable: {self.im_files[i]}")
        return self._resize(im)

    def _resize(self, im: np.ndarray):
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def cache_images(self, kind: str, workers: int = 8) -> None:
        """``'ram'``: keep resized images in memory; ``'disk'``: decoded originals as ``.npy`` files."""
        if kind not in ("ram", "disk"):
            raise ValueError(f"cache must be None, 'ram' or 'disk', got {kind!r}")
        if kind == "ram" and not self._ram_cache_fits():
            return
        fn = self._cache_to_disk if kind == "disk" else self.load_image
        if kind == "disk":  # once per folder, not per image: what killed writers of .npy files left behind
            for folder in {writable_cache_path(Path(f).with_suffix(".npy")).parent for f in self.im_files}:
                remove_stale_temps(folder)
        with ThreadPool(max(1, min(workers, os.cpu_count() or 1))) as pool:
            bar = tqdm(pool.imap(fn, range(self.n)), total=self.n, desc=f"{self.prefix}Caching images")
            for i, x in enumerate(bar):
                if kind == "ram":
                    self.ims[i], self.im_hw0[i], self.im_hw[i] = x
                    self.cache_bytes += x[0].nbytes
                else:
                    self.npy_files[i] = x
                    self.cache_bytes += x.stat().st_size
                bar.set_description(f"{self.prefix}Caching images ({self.cache_bytes / 2**30:.2f}GB {kind})",
                                    refresh=False)
        log.info(f"{self.prefix}Cached {self.n} images: {self.cache_bytes / 2**20:.1f} MB ({kind})")

    def _cache_to_disk(self, i: int) -> Path:
        """The decoded image as ``.npy`` beside it (upstream's name and content), written atomically. An existing
        file is reused only when it is a plain ``uint8`` array of this image's size, newer than the image."""
        image = self.im_files[i]
        npy = writable_cache_path(Path(image).with_suffix(".npy"))
        if not _npy_matches(npy, self.shapes[i], os.stat(image).st_mtime_ns):
            im = cv2.imread(image)
            if im is None:
                raise DatasetError(f"image not found or unreadable: {image}")
            atomic_write(npy, lambda f: np.save(f, im, allow_pickle=False))
        return npy

    def _ram_cache_bytes(self) -> float:
        """The resized images' size in bytes, estimated from up to 30 of them."""
        sample = np.linspace(0, self.n - 1, min(self.n, 30)).astype(int)
        w, h = self.shapes[sample].T
        return float(((self.img_size / np.maximum(w, h)) ** 2 * w * h * 3).mean() * self.n)

    def _auto_cache_fits(self) -> bool:
        """``cache=auto``: RAM when the images take little memory (one line saying which, and why)."""
        need, avail = self._ram_cache_bytes(), _available_memory()
        limit = min(AUTO_CACHE_MAX_BYTES, AUTO_CACHE_SHARE * avail) if avail is not None else AUTO_CACHE_MAX_BYTES
        fits = need <= limit
        log.info(f"{self.prefix}cache=auto: {'ram' if fits else 'none'} ({need / 2**20:.0f} MB of images, "
                 f"{'within' if fits else 'over'} the {limit / 2**20:.0f} MB limit)")
        return fits

    def _ram_cache_fits(self) -> bool:
        """Compare the resized images' estimated size with the available memory."""
        need = self._ram_cache_bytes()
        avail = _available_memory()
        if avail is not None and need * (1 + RAM_SAFETY) > avail:
            log.warning(f"{self.prefix}WARNING: {need / 2**30:.1f}GB RAM needed to cache images, "
                        f"{avail / 2**30:.1f}GB available: not caching")
            return False
        return True

    # ------------------------------------------------------------------ samples
    def _rng(self, item) -> tuple[int, np.random.Generator | None]:
        draw = item if isinstance(item, Draw) else Draw(int(item), self.epoch, int(item))
        rng = np.random.default_rng([self.seed, draw.epoch, draw.slot, draw.index]) if self.augment else None
        return draw.index, rng

    def __getitem__(self, item):
        index, rng = self._rng(item)
        hyp = self.hyp
        if self.mosaic and rng.random() < hyp["mosaic"]:
            # without mixup the mosaic may stay in its 4-channel warp buffer: finish_rgb_chw reads it at once
            img, labels = self.load_mosaic(index, rng, keep_bgra=not hyp["mixup"])
            shapes = None
            if rng.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(int(rng.integers(self.n)), rng), rng)
        else:
            img, labels, shapes = self.load_letterboxed(index)
            if self.augment:
                img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                                 scale=hyp["scale"], shear=hyp["shear"],
                                                 perspective=hyp["perspective"], rng=rng)
        if len(labels):
            labels = labels.astype(np.float32, copy=True)
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        else:
            labels = np.zeros((0, 5), np.float32)
        gains, flipud, fliplr = None, False, False
        if self.augment:  # colour, then flips: upstream's order of random draws
            gains = hsv_gains(hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"], rng)
            flipud, fliplr = rng.random() < hyp["flipud"], rng.random() < hyp["fliplr"]
            labels = flip_labels(labels, flipud, fliplr)
        labels_out = torch.zeros((len(labels), 6))
        labels_out[:, 1:] = torch.from_numpy(labels)
        img = finish_rgb_chw(img, gains, flipud, fliplr)
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    def load_letterboxed(self, index: int):
        """Image letterboxed to its batch shape (rect) or ``img_size``; labels ``cls x1 y1 x2 y2`` pixels."""
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        labels = self.labels[index].copy()
        if len(labels):
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        return img, labels, ((h0, w0), ((h / h0, w / w0), pad))

    def load_mosaic(self, index: int, rng: np.random.Generator, keep_bgra: bool = False):
        """``index`` and 3 partners tiled around a random centre, then warped: ``(s, s)`` image, xyxy labels.

        Tiles are handed over as :class:`LazyImage`: one that the warp never samples is never decoded.
        """
        indices = [index, *self._partners(rng, 3)]
        rng.shuffle(indices)
        labels = [self.labels[i] for i in indices]
        state = rng.bit_generator.state
        try:
            return mosaic_perspective([self._tile(i) for i in indices], labels, self.img_size, self.hyp, rng,
                                      keep_bgra=keep_bgra)
        except TileShapeMismatch:  # the scanned size did not predict the decoded one: redo with decoded tiles
            rng.bit_generator.state = state
            images = [self.load_image(i)[0] for i in indices]
            return mosaic_perspective(images, labels, self.img_size, self.hyp, rng, keep_bgra=keep_bgra)

    def _tile(self, i: int):
        if self.ims[i] is not None:
            return self.ims[i]
        w0, h0 = (int(x) for x in self.shapes[i])
        r = self.img_size / max(h0, w0)
        h, w = (h0, w0) if r == 1 else (math.ceil(h0 * r), math.ceil(w0 * r))  # as load_image resizes
        return LazyImage((h, w, 3), lambda: self.load_image(i)[0])

    def _partners(self, rng: np.random.Generator, k: int) -> list[int]:
        p = self.image_weights
        if p is None:
            return [int(x) for x in rng.integers(self.n, size=k)]
        return [int(x) for x in rng.choice(self.n, size=k, p=p / p.sum())]

    # ------------------------------------------------------------------ image weights
    def update_image_weights(self, class_weights) -> np.ndarray:
        """Per-image sampling weights from per-class weights (upstream's ``labels_to_image_weights``).

        The sampler draws the next epoch's images with these weights (with replacement); mosaic partners are
        drawn with them too. All-zero weights (no labelled image) fall back to uniform sampling.
        """
        w = image_weights_from_labels(self.labels, class_weights)
        self.image_weights = w if w.sum() > 0 else None
        return w

    # ------------------------------------------------------------------ batching
    @staticmethod
    def collate_fn(batch, reuse_blocks: bool = True):
        """Stack images, concatenate the targets with the image index first. In a worker the images go into reused
        shared memory (:mod:`yolo.data.transfer`) unless ``reuse_blocks`` is false (rect batches, whose shapes
        vary, gain nothing from it)."""
        imgs, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        images = stack_images(imgs) if reuse_blocks else default_collate(list(imgs))
        return images, torch.cat(labels, 0), paths, shapes


def _npy_matches(npy: Path, size_wh, image_mtime_ns: int) -> bool:
    """Whether ``npy`` holds a decoded image of ``size_wh`` (width, height; either orientation), written after the
    image was last modified. Only the header is read."""
    try:
        if npy.stat().st_mtime_ns < image_mtime_ns:
            return False
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                return False
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            nbytes = f.tell() + int(np.prod(shape)) * dtype.itemsize
        w, h = (int(x) for x in size_wh)
        return (dtype == np.uint8 and len(shape) == 3 and shape[2] == 3 and sorted(shape[:2]) == sorted((h, w))
                and npy.stat().st_size == nbytes)
    except (OSError, ValueError):
        return False


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where that is not available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
