"""Every strategy as an Optuna sampler over the same space, so storage, resume, workers and pruning are shared.

``mutation`` (the default) is YOLOv5's search (:mod:`evolve.mutation`) wrapped in :class:`MutationSampler`;
``guided`` (:class:`GuidedSampler`) lets a Gaussian process (:mod:`evolve.surrogate`) pick among its children;
``tpe`` (multivariate), ``cmaes``, ``gp``, ``random`` and ``qmc`` are Optuna's own samplers; ``auto``
(:class:`AutoSampler`) is the GP first, then CMA-ES from the GP's best, or TPE where the space has categorical
choices. Whatever the strategy, the study's
first trial is the base hyps, enqueued by :func:`enqueue_base` when the study is created.

Each trial's complete hyps (searched keys, and the gain-0 keys a strategy may not change) are kept in the trial:
the mutation sampler writes them to the system attribute :data:`HYP_ATTR` when it samples, and the driver stores
them as the user attribute ``hyp`` once the generation is done.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from evolve import mutation
from evolve import optuna_internals as oi
from evolve import surrogate
from evolve.space import SearchSpace
from yolo.errors import ConfigError

log = logging.getLogger("yolo.evolve")

STRATEGIES = ("mutation", "guided", "tpe", "cmaes", "gp", "auto", "random", "qmc")
ALIASES = {"upstream": "mutation", "ga": "mutation", "genetic": "mutation", "cma": "cmaes", "cma-es": "cmaes",
           "sobol": "qmc", "mutation-gp": "guided"}
HYP_ATTR = "evolve:hyp"  # system attr: the complete hyps a sampler chose for a trial
AUTO_ATTR = "evolve:auto"  # system attr: the sampler the auto strategy used for a trial
GUIDED_ATTR = "evolve:guided"  # system attr: how the guided strategy chose a trial (candidates, GP mean/sd, EI)
BASE_ATTR = "evolve:base"  # user attr of the enqueued first trial
METRICS_ATTR = "metrics"  # user attr: the 7 evolve.csv metrics of a finished generation
FULL_HYP_ATTR = "hyp"  # user attr: the complete hyps a generation trained with


def canonical_strategy(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise ConfigError(f"evolve.strategy: must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return key


def trial_history(trials: Sequence[FrozenTrial], keys: Sequence[str], base: Mapping[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Finished generations as upstream reads them from evolve.csv: (values (n, k), fitness (n,)).

    COMPLETE trials only, in trial-number order; numbers rounded to 5 significant digits like the CSV.
    """
    rows, fits = [], []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE:
            continue
        hyp = {**base, **t.system_attrs.get(HYP_ATTR, {}), **t.params, **t.user_attrs.get(FULL_HYP_ATTR, {})}
        rows.append([mutation.csv_value(hyp[k]) for k in keys])
        fits.append(trial_fitness(t))
    return np.asarray(rows, dtype=float).reshape(len(rows), len(keys)), np.asarray(fits, dtype=float)


def trial_fitness(t: FrozenTrial) -> float:
    """A finished generation's fitness as upstream computes it from its evolve.csv row (else its value)."""
    metrics = t.user_attrs.get(METRICS_ATTR)
    if metrics is not None and len(metrics) >= 4:
        return float(mutation.fitness([mutation.csv_value(m) for m in metrics[:4]])[0])
    return float(t.value if t.value is not None else 0.0)


def finite_number(v: Any) -> bool:
    """Whether a value read from the ledger is a finite real number (a string, bool, None or NaN is not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_rng(seed: int | None, number: int) -> np.random.Generator:
    """The random stream of one generation: a function of the evolution seed and the trial number only, so a
    resumed or parallel search draws what an uninterrupted one would have drawn for that trial."""
    return np.random.default_rng(None if seed is None else [int(seed) & 0xFFFFFFFF, int(number)])


class MutationSampler(BaseSampler):
    """YOLOv5's parent selection + mutation as an Optuna sampler (single objective, maximised)."""

    def __init__(self, space: SearchSpace, base: Mapping[str, Any], *, seed: int | None = None,
                 parent: str = "single", top: int = mutation.TOP_N, mutation_prob: float = mutation.MUTATION_PROB,
                 sigma: float = mutation.SIGMA) -> None:
        if parent not in mutation.PARENT_METHODS:
            raise ConfigError(f"evolve.parent: must be one of {mutation.PARENT_METHODS}, got {parent!r}")
        self.space = space
        self.base = {k: v for k, v in base.items() if v is not None}
        self.seed = seed
        self.parent = parent
        self.top = top
        self.mutation_prob = mutation_prob
        self.sigma = sigma
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def propose(self, study: optuna.Study, number: int) -> dict[str, float]:
        """The complete hyps of trial ``number`` given the study's finished generations."""
        keys = self.space.keys
        values, fit = trial_history(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), keys, self.base)
        if len(fit) == 0:  # parallel workers while generation 1 (the base, queued first) still runs: mutate it
            values, fit = np.array([[float(self.base[k]) for k in keys]]), np.zeros(1)
        rng = trial_rng(self.seed, number)
        child = mutation.propose(keys, self.space.gains, self.space.limits(), self.base, values, fit, rng,
                                 method=self.parent, top=self.top, mutation_prob=self.mutation_prob, sigma=self.sigma)
        return {**self.base, **child, **self._propose_extra(study, rng)}

    def _propose_extra(self, study: optuna.Study, rng: np.random.Generator) -> dict[str, Any]:
        """The settings upstream's mutation has no gene for (a choice, an integer; Hydra sweeps): the best
        finished generation's value (the base's before any), each drawn anew with upstream's mutation
        probability. Drawn after the hyps, so a space without them keeps upstream's random stream."""
        if not self.space.extra:
            return {}
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = max(done, key=lambda t: (t.value if t.value is not None else -np.inf, -t.number), default=None)
        out: dict[str, Any] = {}
        for name, dist in self.space.extra.items():
            value = best.params.get(name) if best is not None else self.base.get(name)
            if not holds(dist, value) or rng.random() < self.mutation_prob:
                value = draw(dist, rng)
            out[name] = value
        return out

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if trial.params or "fixed_params" in trial.system_attrs:
            return {}  # enqueued (the base hyps) or a retry: its values are fixed already
        hyp = trial.system_attrs.get(HYP_ATTR)
        if hyp is None:
            hyp = self.propose(study, trial.number)
            oi.set_system_attr(study, trial, HYP_ATTR, hyp)
        return {k: hyp[k] for k in search_space if k in hyp}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name in self.base and param_distribution._contains(
                param_distribution.to_internal_repr(self.base[param_name])):
            return self.base[param_name]
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        pass  # the random stream is derived from (seed, trial number), not held


class GuidedSampler(MutationSampler):
    """``evolve.strategy=guided``: upstream's mutation proposes, a Gaussian process picks.

    Each generation draws ``candidates`` children with upstream's parent selection and mutation (the trial's own
    random stream; the first is exactly the child upstream's search would train), fits :mod:`evolve.surrogate`
    to the finished generations (the searched hyps scaled to their bounds) and records its prediction for the
    child it trains, before training it. Once those predictions have ranked the generations' real fitness well
    (Spearman correlation at least ``min_skill`` over the last ``window`` predicted generations, ``min_points``
    of them at least: an honest test, each prediction made before its outcome), it trains the child with the
    highest expected improvement over the best predicted fitness so far; until then upstream's child. The search
    stays where upstream's would go (near the best parents, within mutation's steps). The first ``startup``
    generations (the base hyps included) are upstream's own draws; running generations of other workers count at
    their predicted mean, so parallel workers pick different children. How each generation was chosen is kept in
    the trial (:data:`GUIDED_ATTR`).
    """

    def __init__(self, space: SearchSpace, base: Mapping[str, Any], *, seed: int | None = None,
                 parent: str = "single", candidates: int = 256, startup: int = 4, min_skill: float = 0.3,
                 min_points: int = 6, window: int = 20, **kw: Any) -> None:
        super().__init__(space, base, seed=seed, parent=parent, **kw)
        if min(int(candidates), int(startup)) < 1 or int(min_points) < 3 or int(window) < int(min_points) \
                or not float(min_skill) <= 1.0:
            raise ConfigError(f"evolve.sampler_kwargs: guided needs candidates, startup >= 1, min_points >= 3, "
                              f"window >= min_points, min_skill <= 1; got {candidates}, {startup}, {min_points}, "
                              f"{window}, {min_skill}")
        self.candidates, self.startup, self.min_skill = int(candidates), int(startup), float(min_skill)
        self.min_points, self.window = int(min_points), int(window)
        self._choices: dict[int, dict[str, Any]] = {}  # trial number -> how it was chosen, until recorded

    def propose(self, study: optuna.Study, number: int) -> dict[str, Any]:
        keys = self.space.keys
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        values, fit = trial_history(done, keys, self.base)
        if len(fit) < self.startup:
            return super().propose(study, number)
        rng = trial_rng(self.seed, number)
        gains, limits = self.space.gains, self.space.limits()

        def child() -> dict[str, float]:
            return mutation.propose(keys, gains, limits, self.base, values, fit, rng, method=self.parent,
                                    top=self.top, mutation_prob=self.mutation_prob, sigma=self.sigma)

        first = child()
        extra = self._propose_extra(study, rng)  # upstream's stream up to here: its child and extras
        kids = [first] + [child() for _ in range(self.candidates - 1)]
        pick, self._choices[number] = self._pick(study, kids, values, fit, self.skill(done))
        return {**self.base, **kids[pick], **extra}

    def skill(self, done: Sequence[FrozenTrial]) -> float:
        """How well this evolution's recorded predictions ranked the outcomes (nan: too few yet)."""
        pairs = []
        for t in sorted(done, key=lambda t: t.number):
            info = t.system_attrs.get(GUIDED_ATTR)
            p = info.get("predicted") if isinstance(info, dict) else None
            if finite_number(p) and math.isfinite(f := trial_fitness(t)):
                pairs.append((float(p), f))
        pairs = pairs[-self.window:]
        return surrogate.rank_skill([p for p, _ in pairs], [f for _, f in pairs], min_points=self.min_points)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        out = super().sample_relative(study, trial, search_space)
        info = self._choices.pop(trial.number, None)
        if info is not None:
            oi.set_system_attr(study, trial, GUIDED_ATTR, info)
        return out

    def _pick(self, study: optuna.Study, kids: list[dict[str, float]], values: np.ndarray, fit: np.ndarray,
              skill: float) -> tuple[int, dict[str, Any]]:
        """(index of the child to train, how it was chosen)."""
        tuned = self.space.tuned_keys
        to_unit = self.space.unit_scaler(tuned)
        columns = [self.space.keys.index(k) for k in tuned]
        info: dict[str, Any] = {"candidates": len(kids), "skill": None if math.isnan(skill) else round(skill, 4)}
        try:
            gp = surrogate.fit(to_unit(values[:, columns]), fit)
        except (ValueError, np.linalg.LinAlgError) as e:  # no finite history, or a singular kernel
            log.warning(f"evolve: guided: no model this generation ({e}); upstream's child")
            return 0, {**info, "guided": False}
        if not skill >= self.min_skill:  # nan included: no evidence yet that the model ranks outcomes
            upstream_child = to_unit([[kids[0][k] for k in tuned]])
            return 0, {**info, "guided": False, "predicted": float(gp.predict(upstream_child)[0][0])}
        # the running generations at their predicted mean (kriging believer): the mean is unchanged, so this is
        # only needed for a pick, where it lowers the sd (and EI) near children other workers are training
        xr = self._running_rows(study, tuned)
        if len(xr):
            xr = to_unit(xr)
            try:
                gp = surrogate.condition(gp, xr, gp.predict(xr)[0], exact=True)
            except np.linalg.LinAlgError:
                log.warning("evolve: guided: the running generations could not be added to the model")
        mean, sd = gp.predict(to_unit(np.array([[kid[k] for k in tuned] for kid in kids])))
        best = float(gp.predict(gp.x)[0].max())
        ei = surrogate.expected_improvement(mean, sd, best)
        pick = int(np.argmax(ei))
        return pick, {**info, "guided": True, "predicted": float(mean[pick]), "sd": float(sd[pick]),
                      "ei": float(ei[pick]), "best_mean": best}

    def _running_rows(self, study: optuna.Study, keys: Sequence[str]) -> np.ndarray:
        """The hyps (``keys``) of other workers' running generations, (m, len(keys)); rows that are not all
        finite numbers are left out."""
        rows = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            hyp = t.system_attrs.get(HYP_ATTR)
            if not isinstance(hyp, dict):
                continue
            row = [{**self.base, **hyp}.get(k) for k in keys]
            if all(finite_number(v) for v in row):
                rows.append([float(v) for v in row])
        return np.asarray(rows, dtype=float).reshape(len(rows), len(keys))


def make_sampler(strategy: str, space: SearchSpace, base: Mapping[str, Any], *, seed: int | None = None,
                 parent: str = "single", worker: int = 0, kwargs: Mapping[str, Any] | None = None) -> BaseSampler:
    """The sampler of a strategy. ``worker`` > 0 offsets Optuna samplers' seeds so parallel workers differ
    (the mutation sampler needs no offset: its stream depends on the trial number)."""
    strategy = canonical_strategy(strategy)
    kw = dict(kwargs or {})
    if strategy == "mutation":
        return MutationSampler(space, base, seed=seed, parent=parent, **kw)
    if strategy == "guided":
        return GuidedSampler(space, base, seed=seed, parent=parent, **kw)
    s = None if seed is None else int(seed) + int(worker)
    samplers = optuna.samplers
    if strategy == "auto":
        return AutoSampler(space, base, seed=s, **kw)
    if strategy == "tpe":
        kw.setdefault("multivariate", True)  # the hyps interact (lr0 with momentum, the loss gains together)
        kw.setdefault("constant_liar", True)  # parallel workers do not all sample the same point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return samplers.TPESampler(seed=s, **kw)
    if strategy == "random":
        return samplers.RandomSampler(seed=s, **kw)
    if strategy == "qmc":
        kw.setdefault("scramble", True)
        kw.setdefault("warn_asynchronous_seeding", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return samplers.QMCSampler(seed=None if seed is None else int(seed), **kw)
    if strategy == "gp":
        return gp_sampler(s, **kw)
    if strategy == "cmaes":
        return cmaes_sampler(space, base, s, **kw)
    raise AssertionError(strategy)


def gp_sampler(seed: int | None, **kw: Any) -> BaseSampler:
    """Optuna's GP sampler for training runs: a noisy objective (``deterministic_objective`` false), and few
    random trials before the model (the base hyps are the first, the search space is a box around them)."""
    kw.setdefault("n_startup_trials", 5)
    kw.setdefault("deterministic_objective", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.GPSampler(seed=seed, **kw)


def cmaes_sampler(space: SearchSpace, center: Mapping[str, Any], seed: int | None, **kw: Any) -> BaseSampler:
    """CMA-ES whose mean starts at ``center`` (the base hyps, like the mutation search; Optuna's default is the
    middle of every range: e.g. mosaic 0.5 and lr0 0.05 whatever the base); its step size stays Optuna's."""
    import importlib.util

    if importlib.util.find_spec("cmaes") is None:
        raise ImportError("evolve.strategy=cmaes needs the 'cmaes' package: pip install cmaes")
    kw.setdefault("x0", {k: min(max(float(center[k]), space.bounds[k].lower), space.bounds[k].upper)
                         for k in space.tuned_keys})
    if space.extra:  # CMA-ES draws a choice at random (said once when the evolution starts, not per trial)
        kw.setdefault("warn_independent_sampling", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # x0 is deprecated in Optuna 4.9, removed in 6.0
        return optuna.samplers.CmaEsSampler(seed=seed, **kw)


class AutoSampler(BaseSampler):
    """``evolve.strategy=auto``: the GP while data are few (it needs the fewest trials to model a smooth
    response), then CMA-ES (cheap per trial, scales to many trials) with its mean at the best of the GP's
    ``switch`` first finished generations; TPE throughout when the space has categorical choices (neither GP nor
    CMA-ES models them well). Which sampler a trial used is kept in the trial (:data:`AUTO_ATTR`).

    The switch depends only on the ledger (the finished generations, in trial order), so every worker and a
    resumed evolution switch at the same point and start CMA-ES from the same mean.
    """

    def __init__(self, space: SearchSpace, base: Mapping[str, Any], *, seed: int | None = None,
                 switch: int = 20) -> None:
        self.space, self.base, self.seed, self.switch = space, dict(base), seed, int(switch)
        self._gp = gp_sampler(seed)
        self._tpe: BaseSampler | None = None
        self._cma: BaseSampler | None = None
        self._cma_x0: dict[str, float] | None = None

    def phase(self, study: optuna.Study) -> str:
        """``gp``, ``cmaes`` or ``tpe``: the sampler for the next trial of ``study``."""
        if any(isinstance(d, optuna.distributions.CategoricalDistribution)
               for d in self.space.distributions().values()):
            return "tpe"
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return "gp" if len(done) < self.switch else "cmaes"

    def _sampler(self, study: optuna.Study, trial: FrozenTrial) -> BaseSampler:
        name = trial.system_attrs.get(AUTO_ATTR)
        if name not in ("gp", "cmaes", "tpe"):
            name = self.phase(study)
            oi.set_system_attr(study, trial, AUTO_ATTR, name)
        if name == "gp":
            return self._gp
        if name == "tpe":
            self._tpe = self._tpe or make_sampler("tpe", self.space, self.base, seed=self.seed)
            return self._tpe
        if self._cma is None:
            done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
            first = done[: self.switch]
            best = max(first, key=lambda t: (t.value if t.value is not None else -np.inf, -t.number))
            self._cma_x0 = {**self.base, **trial_hyp(best, self.base), **best.params}
            self._cma = cmaes_sampler(self.space, self._cma_x0, self.seed)
        return self._cma

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        trial = oi.frozen(study, trial)  # with the phase just recorded
        return self._sampler(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        trial = oi.frozen(study, trial)
        return self._sampler(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        name = trial.system_attrs.get(AUTO_ATTR)
        inner = {"gp": self._gp, "tpe": self._tpe, "cmaes": self._cma}.get(name)
        if inner is not None:
            inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._gp.reseed_rng()


def holds(dist: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one of ``dist``'s (None never is)."""
    if value is None:
        return False
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def draw(dist: BaseDistribution, rng: np.random.Generator) -> Any:
    """A value of ``dist`` drawn uniformly (on the log scale where it says so) with ``rng``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(rng.integers(len(dist.choices)))]
    if isinstance(dist, IntDistribution):
        if dist.log:
            return int(min(dist.high, max(dist.low, round(float(np.exp(rng.uniform(np.log(dist.low),
                                                                                np.log(dist.high))))))))
        return int(dist.low + dist.step * int(rng.integers((dist.high - dist.low) // dist.step + 1)))
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step))
            return float(dist.low + dist.step * int(rng.integers(n + 1)))
        if dist.log:
            return float(np.exp(rng.uniform(np.log(dist.low), np.log(dist.high))))
        return float(rng.uniform(dist.low, dist.high))
    raise TypeError(f"no draw for {dist!r}")


def enqueue_base(study: optuna.Study, space: SearchSpace, base: Mapping[str, Any]) -> None:
    """Queue the base hyps as the study's first trial (generation 1 trains them unchanged); a setting outside
    the hyps (``space.extra``) takes its base value when ``base`` has one its distribution holds."""
    params: dict[str, Any] = {k: float(base[k]) for k in space.tuned_keys}
    for name, dist in space.extra.items():
        if holds(dist, base.get(name)):
            params[name] = base[name]
    study.enqueue_trial(params, user_attrs={BASE_ATTR: True}, skip_if_exists=True)


def trial_hyp(trial: FrozenTrial, base: Mapping[str, Any]) -> dict[str, Any]:
    """The complete hyps of a trial: the base, what the sampler chose, then the suggested params."""
    return {**base, **trial.system_attrs.get(HYP_ATTR, {}), **trial.params}
