"""Assigning ground-truth boxes to prediction cells and anchors (YOLOv5 v7.0 rules).

For every detection level the targets are expressed in that level's grid units. A target is kept for an anchor
when the larger of ``w / anchor_w``, ``anchor_w / w``, ``h / anchor_h`` and ``anchor_h / h`` is below
``anchor_t``. Every kept (target, anchor) pair is assigned to the cell holding the target centre and, in addition,
to the two neighbouring cells (one horizontal, one vertical) nearest to the centre: the left neighbour when the
centre lies in the left half of its cell (fractional x below ``g``), otherwise the right one, and likewise up or
down. Neighbours are only added away from the grid border (the centre must be more than one cell from the edge
on that side). Because the prediction's centre is decoded as ``2 * sigmoid - 0.5`` (range -0.5 .. 1.5 cells), a
neighbour cell can still reach the true centre.

The result per level is the class, the regression target ``(x - cell_x, y - cell_y, w, h)`` in grid units, the
indices ``(image, anchor, cell_y, cell_x)`` and the matched anchor sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["build_targets", "NEIGHBOUR_OFFSETS"]

# Cell offsets in the order they are appended: the centre cell first, then left, up, right and down.
# An entry (dx, dy) is *subtracted* from the target's grid position (scaled by g) before truncation,
# so (1, 0) selects the cell to the left and (0, -1) the cell below.
NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def _grid_size(p) -> tuple[int, int]:
    """``(ny, nx)`` of one level, from a prediction tensor or its shape ``(bs, na, ny, nx, no)``."""
    shape = p.shape if isinstance(p, torch.Tensor) else tuple(p)
    return int(shape[2]), int(shape[3])


def build_targets(
    preds: Sequence,
    targets: torch.Tensor,
    anchors: torch.Tensor,
    anchor_t: float,
    g: float = 0.5,
):
    """Match ``targets`` to the cells and anchors of every detection level.

    Args:
        preds: per level, the prediction tensor ``(bs, na, ny, nx, no)`` or just its shape.
        targets: ``(n, 6)`` rows ``image_index, class, cx, cy, w, h`` normalised to the network input.
        anchors: ``(nl, na, 2)`` anchor sizes in grid units (pixels / stride) of each level.
        anchor_t: the wh-ratio threshold (``hyp['anchor_t']``, 4.0 by default upstream).
        g: the neighbour-cell bias (0.5: one horizontal and one vertical neighbour).

    Returns:
        ``(tcls, tbox, indices, anch)``, lists with one entry per level:
        ``tcls`` long ``(m,)``; ``tbox`` ``(m, 4)`` = xy offset from the assigned cell's corner (in -0.5 .. 1.5)
        and wh, in grid units; ``indices`` a tuple
        ``(b, a, gj, gi)`` of long ``(m,)`` tensors (cell indices clamped to the grid); ``anch`` ``(m, 2)`` the
        matched anchors in grid units.
    """
    device = anchors.device
    nl, na = anchors.shape[:2]
    targets = targets.to(device=device, dtype=anchors.dtype if anchors.is_floating_point() else torch.float32)
    nt = targets.shape[0]

    # (na, nt, 7): every target once per anchor, with the anchor index appended as a 7th column
    anchor_idx = torch.arange(na, device=device, dtype=targets.dtype).view(na, 1).expand(na, nt)
    tiled = torch.cat((targets.unsqueeze(0).expand(na, nt, 6), anchor_idx.unsqueeze(-1)), dim=2)
    offsets_all = torch.tensor(NEIGHBOUR_OFFSETS, device=device, dtype=targets.dtype) * g  # (5, 2)

    tcls, tbox, indices, anch = [], [], [], []
    for i in range(nl):
        ny, nx = _grid_size(preds[i])
        level_anchors = anchors[i]
        scale = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=targets.dtype)
        t = tiled * scale  # boxes in this level's grid units

        if nt:
            # anchor match: the worst of the four size ratios must stay below anchor_t
            ratio = t[..., 4:6] / level_anchors[:, None]  # (na, nt, 2)
            keep = torch.max(ratio, 1 / ratio).amax(dim=2) < anchor_t
            t = t[keep]  # (m, 7), anchor-major order

            gxy = t[:, 2:4]  # position from the top-left border
            gxy_inv = torch.tensor([nx, ny], device=device, dtype=t.dtype) - gxy  # from the bottom-right border
            left, up = ((gxy % 1 < g) & (gxy > 1)).T
            right, down = ((gxy_inv % 1 < g) & (gxy_inv > 1)).T
            select = torch.stack((torch.ones_like(left), left, up, right, down))  # (5, m)
            t = t.unsqueeze(0).expand(5, -1, -1)[select]
            offsets = offsets_all[:, None, :].expand(5, select.shape[1], 2)[select]
        else:
            t = tiled[0]  # empty (0, 7)
            offsets = torch.zeros((0, 2), device=device, dtype=targets.dtype)

        b, c = t[:, 0].long(), t[:, 1].long()
        gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
        gij = (gxy - offsets).long()  # truncation toward zero (positions are non-negative)
        gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
        cell = torch.stack((gi, gj), dim=1)  # the offsets are relative to the clamped cell, as upstream

        indices.append((b, a, gj, gi))
        tbox.append(torch.cat((gxy - cell, gwh), dim=1))
        anch.append(level_anchors[a])
        tcls.append(c)

    return tcls, tbox, indices, anch
