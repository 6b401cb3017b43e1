"""Batches handed from loader workers through reused shared blocks: same values as without workers, blocks reused
only once nothing refers to their batch, a fresh block when all are busy."""

from __future__ import annotations

import gc
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # registers the shared-memory reductions that ForkingPickler uses
from torch.utils.data import DataLoader, Dataset

from yolo.data import transfer


class Images(Dataset):
    """Deterministic uint8 'images' (3, 8, 8): item i is filled with values derived from i."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.arange(3 * 8 * 8, dtype=torch.int64).add(i * 7).remainder(256).to(torch.uint8).view(3, 8, 8)


def _loader(workers: int) -> DataLoader:
    return DataLoader(Images(), batch_size=4, num_workers=workers, collate_fn=transfer.stack_images,
                      persistent_workers=workers > 0)


def test_batches_equal_the_in_process_ones_even_when_kept():
    expected = [b.clone() for b in _loader(0)]
    kept = list(_loader(2))  # every batch kept: the workers run out of free blocks and fall back to fresh ones
    assert len(kept) == len(expected) == 10
    for got, want in zip(kept, expected):
        assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_streaming_reuses_blocks_without_corrupting_kept_views():
    expected = [b.clone() for b in _loader(0)]
    loader = _loader(2)
    for epoch in range(3):
        views = []
        for i, batch in enumerate(loader):
            assert torch.equal(batch, expected[i])
            if i % 3 == 0:
                views.append((i, batch[1:3]))  # a view keeps its batch's block busy
            del batch
        gc.collect()
        for i, view in views:
            assert torch.equal(view, expected[i][1:3]), f"epoch {epoch}: batch {i} was overwritten while viewed"


def test_lease_frees_the_block_when_the_last_view_goes():
    shape = (2, 3, 4, 4)
    block = torch.zeros(transfer.HEADER + int(np.prod(shape)), dtype=torch.uint8).share_memory_()
    block.numpy()[0] = 1
    block[transfer.HEADER:] = 7
    # pickled as a worker sends it, unpickled as the main process receives it
    batch = ForkingPickler.loads(bytes(ForkingPickler.dumps(transfer.SharedBatch(block, shape))))
    assert batch.shape == shape and int(batch.sum()) == 7 * batch.numel()
    assert batch.data_ptr() == block.data_ptr() + transfer.HEADER  # the block's memory itself, no copy
    view = batch[0]
    del batch
    gc.collect()
    assert block.numpy()[0] == 1  # the view still uses the block
    del view
    gc.collect()
    assert block.numpy()[0] == 0


def test_outside_workers_and_for_other_dtypes_it_is_the_default_collate():
    x = [torch.ones(3, 2, 2, dtype=torch.uint8)] * 2
    assert isinstance(transfer.stack_images(x), torch.Tensor)
    f = [torch.ones(3, 2, 2)] * 2
    assert transfer.stack_images(f).dtype == torch.float32

