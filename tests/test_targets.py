"""Target assignment (yolo.targets.build_targets) on hand-worked examples."""

import pytest
import torch

from yolo.targets import build_targets

# Two levels for a 64 x 64 input: an 8 x 8 grid (stride 8) and a 4 x 4 grid (stride 16). Anchors in grid units.
SHAPES = [(1, 3, 8, 8, 6), (1, 3, 4, 4, 6)]
ANCHORS = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [8.0, 1.0]], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])


def _target(cx, cy, w, h, img=0, cls=2):
    return torch.tensor([[img, cls, cx, cy, w, h]], dtype=torch.float32)


def test_one_target_two_levels_by_hand():
    # Level 0 (8 x 8): centre (3.3, 4.7), size (1.5, 1.0) grid units.
    # Ratios: anchor (1, 1) -> worst 1.5, (2, 2) -> worst 2.0 (h 1.0 vs 2), (8, 1) -> worst 8 / 1.5 = 5.33 > 4.
    # Fractional position (0.3, 0.7): x in the left half -> left neighbour (2, 4); y in the lower half -> the
    # cell below (3, 5). Both are away from the border.
    # Level 1 (4 x 4): centre (1.65, 2.35), size (0.75, 0.5). Anchor (1, 1) -> worst 2; (2, 2) -> worst exactly 4,
    # which fails the strict "< anchor_t"; (3, 3) -> 6. Fraction (0.65, 0.35): right neighbour (2, 2) and the
    # cell above (1, 1).
    t = _target(3.3 / 8, 4.7 / 8, 1.5 / 8, 1.0 / 8)
    tcls, tbox, indices, anch = build_targets(SHAPES, t, ANCHORS, anchor_t=4.0)

    b, a, gj, gi = indices[0]
    # order: centre cells for every matched anchor, then left neighbours, then cells below
    assert a.tolist() == [0, 1, 0, 1, 0, 1]
    assert gi.tolist() == [3, 3, 2, 2, 3, 3]
    assert gj.tolist() == [4, 4, 4, 4, 5, 5]
    assert b.tolist() == [0] * 6 and tcls[0].tolist() == [2] * 6
    expected = torch.tensor([[0.3, 0.7], [0.3, 0.7], [1.3, 0.7], [1.3, 0.7], [0.3, -0.3], [0.3, -0.3]])
    torch.testing.assert_close(tbox[0][:, :2], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tbox[0][:, 2:], torch.tensor([[1.5, 1.0]]).expand(6, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(anch[0], ANCHORS[0][[0, 1, 0, 1, 0, 1]])

    b, a, gj, gi = indices[1]
    assert a.tolist() == [0, 0, 0]
    assert gi.tolist() == [1, 1, 2]  # centre, above, right
    assert gj.tolist() == [2, 1, 2]
    expected = torch.tensor([[0.65, 0.35], [0.65, 1.35], [-0.35, 0.35]])
    torch.testing.assert_close(tbox[1][:, :2], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tbox[1][:, 2:], torch.tensor([[0.75, 0.5]]).expand(3, 2), atol=1e-5, rtol=0)


def test_no_neighbours_at_the_border_and_clamping():
    shapes = [(2, 3, 8, 8, 6)]
    anchors = torch.tensor([[[1.0, 1.0], [20.0, 20.0], [30.0, 30.0]]])  # only the first anchor matches
    # (0.4, 7.6): the left/lower halves point outside the grid (x <= 1, distance to the bottom <= 1): no neighbours.
    # (8.0, 0.2): a centre exactly on the right border -> cell index 8 clamped to 7, offset 1.0 from that cell.
    # Its x fraction is 0 (< 0.5, x > 1), so the left neighbour 8 - 0.5 -> 7 is added as well: the same cell
    # again (upstream does the same).
    t = torch.tensor([[0, 0, 0.4 / 8, 7.6 / 8, 1 / 8, 1 / 8], [1, 0, 1.0, 0.2 / 8, 1 / 8, 1 / 8]])
    tcls, tbox, indices, anch = build_targets(shapes, t, anchors, anchor_t=4.0)
    b, a, gj, gi = indices[0]
    assert b.tolist() == [0, 1, 1] and a.tolist() == [0, 0, 0]
    assert gi.tolist() == [0, 7, 7] and gj.tolist() == [7, 0, 0]
    expected = torch.tensor([[0.4, 0.6], [1.0, 0.2], [1.0, 0.2]])
    torch.testing.assert_close(tbox[0][:, :2], expected, atol=1e-5, rtol=0)


def test_shapes_or_tensors_and_empty_targets():
    preds = [torch.zeros(s) for s in SHAPES]
    t = _target(0.5, 0.5, 0.1, 0.1)
    from_shapes = build_targets(SHAPES, t, ANCHORS, 4.0)
    from_preds = build_targets(preds, t, ANCHORS, 4.0)
    for x, y in zip(from_shapes[1], from_preds[1]):
        assert torch.equal(x, y)

    tcls, tbox, indices, anch = build_targets(SHAPES, torch.zeros((0, 6)), ANCHORS, 4.0)
    assert len(tcls) == 2
    for i in range(2):
        assert tcls[i].numel() == 0 and tbox[i].shape == (0, 4) and anch[i].shape == (0, 2)
        assert all(ix.numel() == 0 and ix.dtype == torch.long for ix in indices[i])


@pytest.mark.parametrize("anchor_t,expected", [(1.8, [0]), (4.0, [0, 1]), (6.0, [0, 1, 2])])
def test_anchor_ratio_threshold(anchor_t, expected):
    # size (1.5, 1.0) on the 8 x 8 level: worst ratios 1.5, 2.0 and 5.33 against the three anchors
    t = _target(0.55, 0.55, 1.5 / 8, 1.0 / 8)  # fraction (0.4, 0.4): left + up neighbours
    _, _, indices, _ = build_targets(SHAPES[:1], t, ANCHORS[:1], anchor_t=anchor_t)
    assert indices[0][1].tolist() == expected * 3


def test_rectangular_grid_scales_x_and_y_separately():
    # 4 rows x 8 columns: x is scaled by 8, y by 4
    t = _target(0.5625, 0.5625, 0.25, 0.25)  # grid centre (4.5, 2.25): fraction (0.5, 0.25)
    tcls, tbox, indices, _ = build_targets([(1, 1, 4, 8, 6)], t, torch.tensor([[[2.0, 1.0]]]), 4.0)
    b, a, gj, gi = indices[0]
    # x fraction 0.5 is not < 0.5 on the left; from the right border 3.5 -> fraction 0.5, not < 0.5 either.
    # y fraction 0.25 -> the cell above.
    assert gi.tolist() == [4, 4] and gj.tolist() == [2, 1]
    torch.testing.assert_close(tbox[0], torch.tensor([[0.5, 0.25, 2.0, 1.0], [0.5, 1.25, 2.0, 1.0]]))
