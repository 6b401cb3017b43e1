"""YOLOv5's mutation search (v6.x-v7.0 ``train.py --evolve``), as pure functions of a ``numpy.random.Generator``.

One generation:

1. take the ``top`` (5) best rows of the history by fitness (``0.1 * mAP50 + 0.9 * mAP50-95``);
2. weight them ``w = fitness - min(fitness) + 1e-6`` and pick a parent: ``single`` draws one row with probability
   proportional to ``w``, ``weighted`` takes the ``w``-weighted mean of the rows;
3. draw factors ``v = (g * (U < mp) * N * u * s + 1).clip(0.3, 3.0)`` with the gain vector ``g``, a uniform vector
   ``U``, a normal vector ``N`` and ONE uniform scalar ``u`` (mp = 0.8, s = 0.2), drawing again while every factor
   is exactly 1;
4. child = parent * v, then each key clipped to its limits and rounded to 5 decimals.

Upstream reads its parents back from ``evolve.csv``, whose fields carry 5 significant digits; :func:`csv_value`
applies the same rounding so a search resumed from our storage or from a CSV picks the same parents.
The one change from upstream: the random numbers come from a seeded Generator instead of ``time.time()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from yolo.metrics import fitness as metrics_fitness

MUTATION_PROB = 0.8
SIGMA = 0.2
FACTOR_CLIP = (0.3, 3.0)
TOP_N = 5
DECIMALS = 5
PARENT_METHODS = ("single", "weighted")


def fitness(metrics) -> np.ndarray:
    """Fitness of rows whose first four columns are P, R, mAP50, mAP50-95."""
    return np.asarray(metrics_fitness(np.atleast_2d(np.asarray(metrics, dtype=float))))


def csv_value(x: float) -> float:
    """A number as it reads back from evolve.csv (5 significant digits)."""
    return float(f"{float(x):.5g}")


def parent_weights(fit: Sequence[float]) -> np.ndarray:
    """Selection weights of candidate parents: fitness above the worst, plus 1e-6 so they sum above 0."""
    f = np.asarray(fit, dtype=float)
    return f - f.min() + 1e-6


def top_rows(values, fit, top: int = TOP_N) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(top, n)`` best rows by fitness, best first (upstream's ``argsort(-fitness)``)."""
    values = np.asarray(values, dtype=float).reshape(len(fit), -1)
    fit = np.asarray(fit, dtype=float)
    order = np.argsort(-fit)[: min(top, len(fit))]
    return values[order], fit[order]


def select_parent(values, fit, rng: np.random.Generator, method: str = "single", top: int = TOP_N) -> np.ndarray:
    """Pick the parent vector from history rows ``values`` (n, k) with fitness ``fit`` (n,)."""
    if method not in PARENT_METHODS:
        raise ValueError(f"parent selection must be one of {PARENT_METHODS}, got {method!r}")
    if len(fit) == 0:
        raise ValueError("no history to select a parent from")
    x, f = top_rows(values, fit, top)
    w = parent_weights(f)
    if method == "single" or len(x) == 1:
        return x[int(rng.choice(len(x), p=w / w.sum()))].copy()
    return (x * w.reshape(-1, 1)).sum(0) / w.sum()


def mutation_factors(gains, rng: np.random.Generator, mutation_prob: float = MUTATION_PROB, sigma: float = SIGMA,
                     clip: tuple[float, float] = FACTOR_CLIP, max_draws: int = 10_000) -> np.ndarray:
    """Multiplicative factors, one per key, drawn until at least one differs from 1.

    With every gain 0 nothing can change: returns ones (upstream would loop forever).
    """
    g = np.asarray(gains, dtype=float)
    n = len(g)
    v = np.ones(n)
    if n == 0 or not np.any(g != 0):
        return v
    for _ in range(max_draws):
        if not np.all(v == 1):
            break
        hit = rng.random(n) < mutation_prob
        normal = rng.standard_normal(n)
        scale = rng.random()
        v = (g * hit * normal * scale * sigma + 1).clip(*clip)
    return v


def constrain(hyp: Mapping[str, float], limits: Mapping[str, tuple[float, float]],
              decimals: int = DECIMALS) -> dict[str, float]:
    """Clip each limited key to [lower, upper] and round it to ``decimals``; other keys pass unchanged."""
    out = dict(hyp)
    for k, (lower, upper) in limits.items():
        if k in out and out[k] is not None:
            out[k] = round(min(max(float(out[k]), lower), upper), decimals)
    return out


def mutate(parent, gains, rng: np.random.Generator, **kwargs) -> np.ndarray:
    """``parent * v`` (before limits)."""
    return np.asarray(parent, dtype=float) * mutation_factors(gains, rng, **kwargs)


def propose(
    keys: Sequence[str],
    gains,
    limits: Mapping[str, tuple[float, float]],
    base: Mapping[str, float],
    history_values,
    history_fitness,
    rng: np.random.Generator,
    method: str = "single",
    top: int = TOP_N,
    mutation_prob: float = MUTATION_PROB,
    sigma: float = SIGMA,
) -> dict[str, float]:
    """The next generation's values of ``keys``: the base hyps without history, else a mutated parent.

    ``history_values`` is (n, len(keys)) in ``keys`` order, ``history_fitness`` (n,); both as read from evolve.csv.
    """
    if history_fitness is None or len(history_fitness) == 0:
        child = {k: float(base[k]) for k in keys}
    else:
        parent = select_parent(history_values, history_fitness, rng, method=method, top=top)
        values = mutate(parent, gains, rng, mutation_prob=mutation_prob, sigma=sigma)
        child = {k: float(x) for k, x in zip(keys, values)}
    return constrain(child, limits)
