"""The guided strategy (upstream's mutation proposes, a Gaussian process picks) and its surrogate, tested directly."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from evolve import optuna_internals as oi
from evolve import samplers, surrogate
from evolve.space import build_space
from test_evolve_driver import SCRATCH_LOW

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = SCRATCH_LOW  # upstream's hyp-scratch-low, the base of every evolution here


def space():
    from fake_train import compose
    from omegaconf import OmegaConf

    table = OmegaConf.to_container(compose([]).evolve.space, resolve=True)
    return build_space(table, dict(BASE), weights="start.pt", noautoanchor=True)[0]


# ---- the surrogate -----------------------------------------------------------------------------------------------

def test_gradient_of_the_log_posterior_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.random((12, 3))
    z = rng.standard_normal(12)
    d2 = (x[:, None] - x[None]) ** 2
    theta = np.array([0.2, -0.4, 0.7, 0.1, -2.0])
    _, grad = surrogate._neg_log_posterior(theta, x, z, d2)
    h = 1e-6
    num = [(surrogate._neg_log_posterior(theta + e, x, z, d2)[0] - surrogate._neg_log_posterior(theta - e, x, z, d2)[0])
           / (2 * h) for e in np.eye(len(theta)) * h]
    np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-6)


def test_fit_finds_the_dimensions_that_matter_and_predicts_unseen_points():
    rng = np.random.default_rng(1)
    d = 20

    def f(x):
        return -3 * (x[:, 0] - 0.7) ** 2 - (x[:, 3] - 0.2) ** 2

    x = rng.random((40, d))
    gp = surrogate.fit(x, f(x) + 0.01 * rng.standard_normal(40))
    ls = np.exp(gp.log_ls)
    assert ls[0] < 1 and ls[3] < 2 and np.median(np.delete(ls, [0, 3])) > 5  # ARD: two short, the rest long
    xt = rng.random((300, d))
    mean, sd = gp.predict(xt)
    assert np.corrcoef(mean, f(xt))[0, 1] > 0.95 and np.all(sd > 0)


def test_standardise_raises_low_outliers_to_the_fence():
    y = np.array([0.10, 0.11, 0.12, 0.13, 0.12, 0.0])
    z, mean, scale = surrogate.standardise(y)
    q1, q3 = np.percentile(y, [25, 75])
    raised = z * scale + mean
    assert raised[-1] == pytest.approx(q1 - 1.5 * (q3 - q1)) and raised[:-1] == pytest.approx(y[:-1])
    z, mean, scale = surrogate.standardise(np.array([0.5, 0.5]))  # no spread: no division by zero
    assert scale == 1.0 and np.all(z == 0)


def test_condition_keeps_the_hyperparameters_and_the_old_points():
    rng = np.random.default_rng(2)
    x = rng.random((10, 4))
    gp = surrogate.fit(x, x.sum(1))
    new = rng.random((2, 4))
    gp2 = surrogate.condition(gp, new, [9.0, 9.0])
    assert gp2.x.shape == (12, 4) and np.array_equal(gp2.log_ls, gp.log_ls)
    np.testing.assert_allclose(surrogate._targets(gp2)[:10], surrogate._targets(gp), atol=1e-9)
    assert gp2.predict(new)[0].min() > gp.predict(new)[0].max()  # pulled towards the added values


def test_loo_skill_tells_a_model_that_predicts_from_too_few_points():
    rng = np.random.default_rng(3)
    x = rng.random((30, 5))
    assert surrogate.loo_skill(surrogate.fit(x, x[:, 0] - x[:, 1] ** 2)) > 0.8
    assert math.isnan(surrogate.loo_skill(surrogate.fit(x[:4], x[:4, 0])))  # too few points to judge


def test_rank_skill_of_predictions_against_outcomes():
    assert surrogate.rank_skill([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.5, 0.4, 0.9]) == pytest.approx(0.9429, abs=1e-4)
    assert surrogate.rank_skill([6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]) == -1.0
    assert math.isnan(surrogate.rank_skill([1, 2, 3], [1, 2, 3]))  # fewer than min_points
    assert math.isnan(surrogate.rank_skill([1] * 6, [1, 2, 3, 4, 5, 6]))  # a flat prediction ranks nothing


def test_the_gate_reads_the_predictions_recorded_before_each_outcome():
    """Predictions that ranked the outcomes backwards keep upstream's child; ones that ranked them well open
    the gate. Only the last ``window`` predicted generations count."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    sampler = samplers.GuidedSampler(space(), BASE, seed=0, min_points=6, window=8)

    def history(pairs):
        return [create_trial(value=v, params={"lr0": 0.01}, distributions={"lr0": FloatDistribution(1e-5, 0.1)},
                             system_attrs={samplers.GUIDED_ATTR: {"predicted": p}}) for p, v in pairs]

    good = [(i, i + 0.5 * (i % 2)) for i in range(8)]
    assert sampler.skill(history(good)) > 0.9
    assert sampler.skill(history([(p, -v) for p, v in good])) < -0.9
    assert math.isnan(sampler.skill(history(good[:5])))
    assert sampler.skill(history([(p, -v) for p, v in good] + good)) > 0.9  # the window: the recent 8


def test_fit_escapes_the_all_noise_optimum_on_a_search_history():
    """A mutation search's first 8 generations sit close together: started only at the priors' centres, the fit
    calls every difference noise (skill about 0.04); started also at short length scales it finds the model."""
    sp = space()
    study = run("mutation", 0, 8, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    tuned = [i for i, k in enumerate(sp.keys) if sp.bounds[k].gain > 0]
    values, fit = samplers.trial_history(study.trials, sp.keys, BASE)
    gp = surrogate.fit(sp.unit_scaler([sp.keys[i] for i in tuned])(values[:, tuned]), fit)
    assert surrogate.loo_skill(gp) > 0.5 and math.exp(gp.log_sn2) < 0.2


def test_expected_improvement_formula():
    ei = surrogate.expected_improvement(np.array([1.0, 0.0, 2.0]), np.array([1.0, 1.0, 1e-9]), 0.0)
    phi0, big_phi1 = 1 / math.sqrt(2 * math.pi), 0.8413447460685429
    assert ei[0] == pytest.approx(1 * big_phi1 + math.exp(-0.5) / math.sqrt(2 * math.pi))
    assert ei[1] == pytest.approx(phi0) and ei[2] == pytest.approx(2.0)


# ---- the sampler -------------------------------------------------------------------------------------------------

def objective_for(sp, peak: dict[str, float]):
    """A smooth fitness over three of the searched hyps (the others do not matter), computed from the hyps the
    sampler chose."""
    to_unit = sp.unit_scaler(list(peak))
    target = to_unit(np.array([list(peak.values())]))[0]

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_float(k, d.low, d.high, log=d.log) for k, d in sp.distributions().items()}
        chosen = oi.frozen(trial.study, trial).system_attrs.get(samplers.HYP_ATTR, {})
        hyp = {**BASE, **chosen, **params}
        x = to_unit(np.array([[hyp[k] for k in peak]]))[0]
        return float(1.0 - ((x - target) ** 2).sum())

    return objective


def run(strategy: str, seed: int, n: int, sp, peak):
    sampler = samplers.make_sampler(strategy, sp, BASE, seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    samplers.enqueue_base(study, sp, BASE)
    study.optimize(objective_for(sp, peak), n_trials=n)
    return study


def test_guided_records_why_and_keeps_upstreams_child_until_its_predictions_rank_well():
    sp = space()
    study = run("guided", 0, 16, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    trials = sorted(study.trials, key=lambda t: t.number)
    assert all(samplers.GUIDED_ATTR not in t.system_attrs for t in trials[:4])  # base + upstream's own draws
    infos = [t.system_attrs[samplers.GUIDED_ATTR] for t in trials[4:]]
    assert all(i["candidates"] == 256 and "predicted" in i for i in infos)
    assert all(not i["guided"] and i["skill"] is None for i in infos[:6])  # fewer than 6 predictions to judge
    assert any(i["guided"] for i in infos)
    for t, info in zip(trials[4:], infos):
        hyp = t.system_attrs[samplers.HYP_ATTR]
        for k, (lo, hi) in sp.limits().items():
            assert lo <= hyp[k] <= hi
        assert hyp["fl_gamma"] == 0.0  # gain 0 / value 0: a multiplicative mutation never moves it
        if info["guided"]:
            assert info["skill"] >= 0.3 and info["sd"] > 0 and info["ei"] >= 0
        else:  # exactly the child upstream's search trains for this trial
            upstream = samplers.MutationSampler(sp, BASE, seed=0)
            before = optuna.create_study(direction="maximize")
            before.add_trials([u for u in trials if u.number < t.number])
            assert {k: hyp[k] for k in sp.keys} == {k: upstream.propose(before, t.number)[k] for k in sp.keys}


def test_guided_proposal_is_the_argmax_of_expected_improvement(monkeypatch):
    """The child trained is the candidate with the highest EI, not upstream's first draw."""
    sp = space()
    study = run("mutation", 3, 6, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    guided = samplers.GuidedSampler(sp, BASE, seed=3, candidates=32)
    guided.skill = lambda done: 1.0  # the gate open (its own test is above)
    seen = {}
    real = surrogate.expected_improvement

    def spy(mean, sd, best):
        seen["ei"] = real(mean, sd, best)
        return seen["ei"]

    monkeypatch.setattr(surrogate, "expected_improvement", spy)
    hyp = guided.propose(study, 6)
    rng = samplers.trial_rng(3, 6)
    from evolve import mutation

    keys = sp.keys
    values, fit = samplers.trial_history(study.trials, keys, BASE)
    kids = [mutation.propose(keys, sp.gains, sp.limits(), BASE, values, fit, rng) for _ in range(32)]
    best = kids[int(np.argmax(seen["ei"]))]
    assert {k: hyp[k] for k in keys} == best


def test_guided_is_reproducible_for_a_trial_number():
    """A resumed or parallel evolution proposes what an uninterrupted one would have for that trial."""
    sp = space()
    study = run("mutation", 5, 6, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    a = samplers.GuidedSampler(sp, BASE, seed=5).propose(study, 6)
    b = samplers.GuidedSampler(sp, BASE, seed=5).propose(study, 6)
    assert a == b


def test_running_generations_steer_parallel_workers_apart():
    """With another worker's generation running at the child it would pick, the guided sampler picks another."""
    sp = space()
    study = run("mutation", 7, 8, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    def guided():
        g = samplers.GuidedSampler(sp, BASE, seed=7)
        g.skill = lambda done: 1.0  # the gate open
        return g

    first = guided().propose(study, 8)
    running = study.ask()  # another worker's generation, running at exactly that child
    oi.set_system_attr(study, running, samplers.HYP_ATTR, first)
    again = guided().propose(study, 8)
    assert again != first


def test_guided_beats_upstreams_mutation_on_a_smooth_fitness():
    """Same seeds, same budget: the model's pick finds more than upstream's blind draw (3 of 28 hyps matter)."""
    sp = space()
    peak = {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3}
    guided = [run("guided", s, 16, sp, peak).best_value for s in range(3)]
    upstream = [run("mutation", s, 16, sp, peak).best_value for s in range(3)]
    assert all(g > u + 0.1 for g, u in zip(guided, upstream)), (guided, upstream)  # a random pick does not


def test_bad_sampler_settings_fail_in_one_line():
    from yolo.errors import ConfigError

    for bad in ({"candidates": 0}, {"min_points": 2}, {"window": 4}, {"min_skill": 1.5}):
        with pytest.raises(ConfigError, match="guided needs"):
            samplers.GuidedSampler(space(), BASE, **bad)


def test_unit_scaler_maps_bounds_to_the_unit_cube():
    from evolve.space import Bound, SearchSpace

    sp = SearchSpace(bounds={"a": Bound(1.0, 0.0, 2.0), "b": Bound(1.0, 1e-4, 1e-1, log=True),
                             "c": Bound(0.0, 0.5, 0.5)})
    to_unit = sp.unit_scaler(["a", "b", "c"])
    np.testing.assert_allclose(to_unit([[1.0, 1e-4, 0.5], [2.0, 1e-1, 0.5], [5.0, 0.0, 0.5]]),
                               [[0.5, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert to_unit([[0.0, 10 ** -2.5, 0.5]])[0, 1] == pytest.approx(0.5)


def test_guided_evolution_with_asha_and_a_warm_start(tmp_path):
    """The whole evolution: guided with asha's first-rung view and an upstream evolve.csv in its history."""
    from fake_train import fake_train
    from test_evolve_fidelity import _upstream_csv, cfg_for, load

    from evolve.driver import evolve

    hyps = [{"lr0": 0.02, "momentum": 0.9, "mosaic": 0.8}, {"lr0": 0.005}, {"lr0": 0.015, "box": 0.08}]
    csv = _upstream_csv(tmp_path / "upstream.csv", hyps, [0.5, 0.1, 0.3])
    res = evolve(cfg_for(tmp_path / "ev", "evolve.strategy=guided", "evolve.fidelity=asha", "evolve.eta=2",
                         f"evolve.warm_start=[{csv}]", generations=10, epochs=2), train_fn=fake_train)
    assert res.completed == 10
    chosen = [t.system_attrs[samplers.GUIDED_ATTR] for t in load(tmp_path / "ev").get_trials()
              if samplers.GUIDED_ATTR in t.system_attrs]
    assert chosen and all(c["candidates"] == 256 for c in chosen)


def test_hostile_ledger_values_do_not_reach_the_model():
    """A journal is data: a non-number prediction, a NaN fitness, a running generation's hyps that are not
    numbers are left out; a history with no finite point gives upstream's child, not a crash."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    sp = space()
    sampler = samplers.GuidedSampler(sp, BASE, seed=0, min_points=6, window=20)
    dist = {"lr0": FloatDistribution(1e-5, 0.1)}
    good = [create_trial(value=float(i), params={"lr0": 0.01}, distributions=dist,
                         system_attrs={samplers.GUIDED_ATTR: {"predicted": float(i)}}) for i in range(6)]
    bad = [create_trial(value=1.0, params={"lr0": 0.01}, distributions=dist,
                        system_attrs={samplers.GUIDED_ATTR: {"predicted": p}}) for p in ("9", None, True, math.nan)]
    bad.append(create_trial(value=1.0, params={"lr0": 0.01}, distributions=dist,
                            system_attrs={samplers.GUIDED_ATTR: "not a dict"}))
    assert sampler.skill(good + bad) == 1.0

    study = run("mutation", 0, 6, sp, {"lr0": 0.03, "momentum": 0.8, "mosaic": 0.3})
    for junk in ({"lr0": "0.1"}, "hyps", {"lr0": math.inf}):
        t = study.ask()
        oi.set_system_attr(study, t, samplers.HYP_ATTR, junk)
    assert len(sampler._running_rows(study, sp.keys)) == 0
    assert sampler.propose(study, 9)["lr0"] > 0

    x = np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.5]])
    gp = surrogate.fit(x, np.array([1.0, 2.0, np.inf]))
    assert len(gp.x) == 1
    with pytest.raises(ValueError, match="finite"):
        surrogate.fit(x[1:2], np.array([1.0]))
