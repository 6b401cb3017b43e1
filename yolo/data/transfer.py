"""Image batches from loader workers to the main process through reused shared memory, without a copy.

A worker's batch reaches the main process through shared memory. torch's default collate stacks every batch into
a fresh shared block, so for every batch the kernel allocates, zeroes and maps new pages in the worker, and frees
them when the main process lets go: about 20 MB per batch of 16 images at 640.

Here each worker keeps a few blocks per batch shape and reuses them. The first byte of a block is a busy flag:
the worker sets it before stacking a batch into the block, and the main process clears it once nothing refers to
that batch any more. The batch tensor handed to the user is the block's memory itself, wrapped by a
:class:`_Lease` whose release clears the flag. Views of the tensor keep the lease alive, so a block is never
reused while any view of its batch exists. When all of a worker's blocks are busy (the user keeps batches),
the worker falls back to a fresh block, as the default collate does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

__all__ = ["HEADER", "SharedBatch", "stack_images"]

HEADER = 64  # bytes in front of the pixels: byte 0 is the busy flag; 64 keeps the pixels aligned
SLOTS = 4  # blocks per batch shape and worker
MAX_SHAPES = 2  # batch shapes a worker keeps blocks for (the full batch and, e.g., a short last one)

_blocks: dict[tuple[int, ...], list[torch.Tensor]] = {}  # worker process: batch shape -> its blocks
# main process: the blocks received last stay mapped, so a block's next batch arrives without a fresh mmap and its
# page faults (torch maps a shared block once while some reference to it is alive)
_mapped: OrderedDict[int, torch.Tensor] = OrderedDict()  # data_ptr -> block, most recently received last
MAPPED_MAX = 32  # e.g. 8 workers x 4 blocks; older ones (of workers long gone) are let go
_mapped_lock = threading.Lock()  # loaders' pin-memory threads may receive concurrently


class SharedBatch:
    """A batch stacked into a reused shared block; unpickles as a tensor over that block (:func:`receive`)."""

    __slots__ = ("block", "shape")

    def __init__(self, block: torch.Tensor, shape: tuple[int, ...]):
        self.block, self.shape = block, shape

    def __reduce__(self):
        return receive, (self.block, self.shape)


class _Lease:
    """Exposes a batch inside ``block`` to NumPy; when the last array/tensor over it is gone, frees the block."""

    def __init__(self, block: torch.Tensor, shape: tuple[int, ...]):
        self.block = block
        self.__array_interface__ = {"data": (block.data_ptr() + HEADER, False), "shape": tuple(shape),
                                    "typestr": "|u1", "version": 3}

    def __del__(self):
        try:
            self.block.numpy()[0] = 0
        except Exception:  # noqa: BLE001 - interpreter shutdown: nobody reuses the block any more
            pass


def receive(block: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Main process: the batch as a ``uint8`` tensor over ``block`` (no copy); the block goes back to its worker
    when that tensor and every view of it are gone."""
    with _mapped_lock:
        _mapped[block.data_ptr()] = block
        _mapped.move_to_end(block.data_ptr())
        while len(_mapped) > MAPPED_MAX:
            _mapped.popitem(last=False)
    return torch.from_numpy(np.asarray(_Lease(block, shape)))


def _free_block(shape: tuple[int, ...]) -> torch.Tensor | None:
    blocks = _blocks.get(shape)
    if blocks is None:
        if len(_blocks) >= MAX_SHAPES:
            return None
        blocks = _blocks[shape] = []
    for block in blocks:
        if block.numpy()[0] == 0:
            return block
    if len(blocks) >= SLOTS:
        return None
    block = torch.zeros(HEADER + int(np.prod(shape)), dtype=torch.uint8).share_memory_()
    blocks.append(block)
    return block


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor | SharedBatch:
    """Stack same-shape ``uint8`` images into a batch: in a loader worker into a reused shared block (arriving in
    the main process as a tensor, see :func:`receive`), elsewhere or for other dtypes as ``default_collate``."""
    if get_worker_info() is None or not images or images[0].dtype != torch.uint8:
        return default_collate(list(images))
    shape = (len(images), *images[0].shape)
    block = _free_block(shape)
    if block is None:
        return default_collate(list(images))
    block.numpy()[0] = 1
    torch.stack(list(images), 0, out=block[HEADER:].view(shape))
    return SharedBatch(block, shape)
