"""YOLOv5's mutation search with fixed seeds: parent selection, the mutation formula, its clip, redraws, limits."""

from __future__ import annotations

import numpy as np
import pytest

from evolve import mutation
from evolve.samplers import trial_rng
from evolve.space import HYP_KEYS, build_space

UPSTREAM_META = {  # v7.0 train.py, as data
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0, 0.001),
    "warmup_epochs": (1, 0, 5), "warmup_momentum": (1, 0, 0.95), "warmup_bias_lr": (1, 0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "anchors": (2, 2.0, 10.0),
    "fl_gamma": (0, 0, 2.0), "hsv_h": (1, 0, 0.1), "hsv_s": (1, 0, 0.9), "hsv_v": (1, 0, 0.9), "degrees": (1, 0, 45),
    "translate": (1, 0, 0.9), "scale": (1, 0, 0.9), "shear": (1, 0, 10), "perspective": (0, 0, 0.001),
    "flipud": (1, 0, 1), "fliplr": (0, 0, 1), "mosaic": (1, 0, 1), "mixup": (1, 0, 1), "copy_paste": (1, 0, 1)}


class ScriptedRng:
    """Returns scripted draws, recording every call, to pin the formula down exactly."""

    def __init__(self, uniforms_vec, normals, scalars):
        self.uv, self.n, self.s = list(uniforms_vec), list(normals), list(scalars)
        self.calls = []

    def random(self, size=None):
        self.calls.append(("random", size))
        return np.asarray(self.uv.pop(0), float) if size is not None else self.s.pop(0)

    def standard_normal(self, size):
        self.calls.append(("standard_normal", size))
        return np.asarray(self.n.pop(0), float)


def test_fitness_is_point1_map50_plus_point9_map():
    x = np.array([[0.43278, 0.37799, 0.3552, 0.1925, 0.05, 0.03, 0.02]])
    assert mutation.fitness(x)[0] == pytest.approx(0.1 * 0.3552 + 0.9 * 0.1925)
    assert mutation.fitness(x)[0] == pytest.approx(0.20877, abs=1e-5)  # the generation-1 figure


def test_parent_weights():
    w = mutation.parent_weights([0.3, 0.1, 0.2])
    assert np.allclose(w, [0.2 + 1e-6, 1e-6, 0.1 + 1e-6])


def test_single_parent_drawn_with_probability_proportional_to_weight_among_top5():
    fit = np.array([0.10, 0.50, 0.20, 0.05, 0.40, 0.30, 0.01])  # 7 rows, top 5 = idx 1, 4, 5, 2, 0
    values = np.arange(7, dtype=float).reshape(7, 1)  # row i holds value i
    rng = np.random.default_rng(0)
    n = 20_000
    picks = np.array([mutation.select_parent(values, fit, rng, "single")[0] for _ in range(n)]).astype(int)
    top = [1, 4, 5, 2, 0]
    w = fit[top] - fit[top].min() + 1e-6
    expected = w / w.sum()
    freq = np.array([(picks == i).mean() for i in top])
    assert np.allclose(freq, expected, atol=0.012)
    assert set(np.unique(picks)) <= set(top)  # rows 3 and 6 are outside the top 5
    assert (picks == 0).mean() < 0.001  # the 5th best has weight 1e-6


def test_weighted_parent_is_weighted_mean_of_top_rows():
    fit = np.array([0.2, 0.4, 0.3])
    values = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    w = fit - fit.min() + 1e-6
    expected = (values * w[:, None]).sum(0) / w.sum()
    got = mutation.select_parent(values, fit, np.random.default_rng(1), "weighted")
    assert np.allclose(got, expected)


@pytest.mark.parametrize("method", ["single", "weighted"])
def test_single_row_history_is_the_parent(method):
    got = mutation.select_parent(np.array([[0.5, 2.0]]), np.array([0.3]), np.random.default_rng(0), method)
    assert np.array_equal(got, [0.5, 2.0])


def test_unknown_parent_method():
    with pytest.raises(ValueError, match="single"):
        mutation.select_parent(np.ones((2, 1)), np.ones(2), np.random.default_rng(0), "best")


def test_mutation_formula_matches_upstream_expression():
    gains = np.array([g for g, _, _ in UPSTREAM_META.values()], float)
    for seed in range(5):
        v = mutation.mutation_factors(gains, np.random.default_rng(seed))
        r = np.random.default_rng(seed)  # the same draws, in upstream's order: U vector, N vector, one scalar
        n = len(gains)
        expected = np.ones(n)
        while np.all(expected == 1):
            expected = (gains * (r.random(n) < 0.8) * r.standard_normal(n) * r.random() * 0.2 + 1).clip(0.3, 3.0)
        assert np.array_equal(v, expected)
        assert np.all(v[gains == 0] == 1)  # gain 0: never mutated


def test_mutation_factor_clip():
    rng = ScriptedRng([[0.0, 0.0, 0.0]], [[100.0, -100.0, 0.5]], [1.0])
    v = mutation.mutation_factors([1.0, 1.0, 1.0], rng)
    assert v[0] == 3.0 and v[1] == 0.3  # clipped to [0.3, 3.0]
    assert v[2] == pytest.approx(1 + 0.5 * 0.2)
    assert rng.calls == [("random", 3), ("standard_normal", 3), ("random", None)]


def test_mutation_redraws_while_nothing_changes():
    # first draw: no key passes U < mp, so every factor is 1 -> drawn again
    rng = ScriptedRng([[0.9, 0.95], [0.1, 0.9]], [[1.0, 1.0], [0.5, 2.0]], [0.5, 0.5])
    v = mutation.mutation_factors([1.0, 1.0], rng)
    assert len(rng.calls) == 6  # two full draws
    assert v[0] == pytest.approx(1 + 0.5 * 0.5 * 0.2) and v[1] == 1.0


def test_all_zero_gains_cannot_change_and_do_not_loop():
    assert np.array_equal(mutation.mutation_factors([0.0, 0.0], np.random.default_rng(0)), [1.0, 1.0])


def test_constrain_clips_to_limits_and_rounds_to_5_decimals():
    limits = {k: (lo, hi) for k, (_, lo, hi) in UPSTREAM_META.items()}
    got = mutation.constrain({"lr0": 0.5, "momentum": 0.1, "box": 0.0512345678, "mixup": -0.2, "other": 0.123456789},
                             limits)
    assert got == {"lr0": 0.1, "momentum": 0.6, "box": 0.05123, "mixup": 0.0, "other": 0.123456789}


def test_csv_value_is_5_significant_digits():
    assert mutation.csv_value(3.14159) == 3.1416
    assert mutation.csv_value(0.000123456) == 0.00012346


def test_propose_without_history_is_the_base():
    keys = ["lr0", "momentum"]
    base = {"lr0": 0.01, "momentum": 0.937}
    got = mutation.propose(keys, [1, 0.3], {"lr0": (1e-5, 0.1), "momentum": (0.6, 0.98)}, base, np.zeros((0, 2)),
                           np.zeros(0), np.random.default_rng(0))
    assert got == base


def test_propose_is_reproducible_for_a_seed_and_differs_between_seeds():
    space, base = build_space(UPSTREAM_META, {k: 0.5 for k in HYP_KEYS if k != "anchors"})
    keys = space.keys
    hist = np.array([[base[k] for k in keys]] * 3) * np.array([[1.0], [1.1], [0.9]])
    fit = np.array([0.2, 0.3, 0.1])

    def run(seed, number):
        return mutation.propose(keys, space.gains, space.limits(), base, hist, fit, trial_rng(seed, number))

    assert run(0, 5) == run(0, 5)
    assert run(0, 5) != run(1, 5)
    assert run(0, 5) != run(0, 6)
    child = run(0, 5)
    for k, (lo, hi) in space.limits().items():
        assert lo <= child[k] <= hi and round(child[k], 5) == child[k]


# ---- the space ------------------------------------------------------------------------------------------------


def _base():
    from yolo.config import HypConfig
    from dataclasses import asdict

    return asdict(HypConfig())


def test_space_keeps_hyp_order_and_anchor_default_from_model():
    space, base = build_space(UPSTREAM_META, _base(), model_cfg={"anchors": [[10, 13, 16, 30, 33, 23]] * 3})
    assert space.keys == list(HYP_KEYS)  # anchors last, like upstream's evolve.csv
    assert base["anchors"] == 3.0
    assert set(space.tuned_keys) == {k for k, (g, _, _) in UPSTREAM_META.items() if g > 0}


def test_anchors_not_searched_from_pretrained_weights_unless_asked(caplog):
    caplog.set_level("INFO", logger="yolo.evolve")
    space, base = build_space(UPSTREAM_META, _base(), weights="yolov5n.pt")
    assert "anchors" not in space.keys and base["anchors"] is None
    assert "pretrained weights" in space.excluded["anchors"]
    assert "'anchors' is not searched" in caplog.text
    space, base = build_space(UPSTREAM_META, _base(), weights="yolov5n.pt", search_anchors=True)
    assert "anchors" in space.keys and base["anchors"] == 3.0
    assert "WARNING" in caplog.text
    space, _ = build_space(UPSTREAM_META, _base(), noautoanchor=True)
    assert "anchors" not in space.keys  # as upstream with --noautoanchor
    space, _ = build_space(UPSTREAM_META, _base(), search_anchors=False)
    assert "anchors" not in space.keys


def test_space_table_errors_name_the_key():
    with pytest.raises(ValueError, match="lr00"):
        build_space({"lr00": [1, 0, 1]}, _base())
    with pytest.raises(ValueError, match="box"):
        build_space({"box": [1, 0.5, 0.1]}, _base())
    with pytest.raises(ValueError, match="cls"):
        build_space({"cls": [1, 0.5]}, _base())


def test_cmaes_starts_at_the_base_hyps_not_the_middle_of_the_ranges():
    """Optuna's CMA-ES would start at the middle of every range (mosaic 0.5, lr0 0.05); ours starts at the base,
    clipped into the limits, like the mutation search."""
    import warnings

    from evolve.samplers import make_sampler

    base_hyp = {k: 0.5 for k in HYP_KEYS if k != "anchors"}
    base_hyp.update(lr0=0.01, mosaic=1.0, anchor_t=4.0, degrees=0.0, weight_decay=0.0005, hsv_h=0.015)
    space, base = build_space(UPSTREAM_META, base_hyp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = make_sampler("cmaes", space, base, seed=0)
    x0 = getattr(sampler, "_x0", None)
    if x0 is None:
        pytest.skip("this Optuna keeps CMA-ES's start elsewhere")
    assert set(x0) == set(space.tuned_keys)
    for k in space.tuned_keys:
        lo, hi = space.bounds[k].lower, space.bounds[k].upper
        assert x0[k] == pytest.approx(min(max(base[k], lo), hi)), k
    assert x0["lr0"] == pytest.approx(0.01) and x0["mosaic"] == pytest.approx(1.0)
