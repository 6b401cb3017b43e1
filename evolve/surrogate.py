"""A small Gaussian-process surrogate of fitness over the unit cube, for the ``guided`` strategy.

Pure numpy (scipy for the hyperparameter fit), no state beyond the fitted arrays, so it is tested directly:

- kernel: squared exponential with one length scale per dimension (ARD), a signal variance and a noise variance
  (training runs are noisy: the same hyps give another fitness with another seed);
- hyperparameters: the maximum a posteriori of the log marginal likelihood, with a log-normal prior on every length
  scale whose centre grows with the dimension (``sqrt(2) + log(d) / 2``, sd ``sqrt(3)``: in many dimensions
  most of them matter little, so long length scales are the default guess) and weak priors on the variances,
  found from two starts (:func:`fit_starts`), of which the one that predicts left-out points best is kept;
- targets standardised after raising the low outliers to the lower Tukey fence (a diverged or failed run with
  fitness 0 should not set the scale of the good region);
- :func:`loo_skill`: the fit's leave-one-out error against knowing nothing, to choose between fits (optimistic:
  the hyperparameters saw the left-out point); :func:`rank_skill` judges predictions made before their outcomes;
- :func:`expected_improvement` over a best value; :func:`condition` adds points at fixed hyperparameters (the
  running generations of parallel workers, believed exactly at their predicted mean: the "kriging believer", so
  a second worker's expected improvement there is nil).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_POINTS = 300  # the most training points a fit uses (the best ones); O(n^3) per step
JITTER = 1e-8


@dataclass(frozen=True)
class GP:
    x: np.ndarray  # (n, d) training inputs in [0, 1]
    log_ls: np.ndarray  # (d,) log length scales
    log_sf2: float  # log signal variance (standardised units)
    log_sn2: float  # log noise variance (standardised units)
    y_mean: float
    y_scale: float
    chol: np.ndarray  # Cholesky factor of K + noise
    alpha: np.ndarray  # (K + noise)^-1 (y - mean) / scale
    noise: np.ndarray  # (n,) each point's noise variance (standardised units)

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the latent fitness at ``xs`` (m, d), in fitness units."""
        xs = np.atleast_2d(np.asarray(xs, dtype=float))
        ks = math.exp(self.log_sf2) * np.exp(-0.5 * _sqdist(xs, self.x, self.log_ls))
        mean = ks @ self.alpha
        from scipy.linalg import solve_triangular

        v = solve_triangular(self.chol, ks.T, lower=True)
        var = np.maximum(math.exp(self.log_sf2) - (v * v).sum(0), 1e-12)
        return self.y_mean + self.y_scale * mean, self.y_scale * np.sqrt(var)


def _sqdist(a: np.ndarray, b: np.ndarray, log_ls: np.ndarray) -> np.ndarray:
    s = np.exp(-log_ls)
    a, b = a * s, b * s
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def standardise(y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(standardised targets, mean, scale) with values below the lower Tukey fence raised to it."""
    y = np.asarray(y, dtype=float)
    if len(y) >= 4:
        q1, q3 = np.percentile(y, [25, 75])
        y = np.maximum(y, q1 - 1.5 * (q3 - q1))
    mean = float(y.mean())
    scale = float(y.std())
    if not np.isfinite(scale) or scale < 1e-12:
        scale = 1.0
    return (y - mean) / scale, mean, scale


def ls_prior(d: int) -> tuple[float, float]:
    """(mean, sd) of the normal prior on a log length scale in ``d`` dimensions."""
    return math.sqrt(2.0) + 0.5 * math.log(max(d, 1)), math.sqrt(3.0)


# weak priors on the log variances (standardised targets): signal near 1, noise near 0.1 of it
SF2_PRIOR = (0.0, 1.0)
SN2_PRIOR = (math.log(0.1), 1.5)
SN2_BOUNDS = (math.log(1e-6), math.log(2.0))


def fit_starts(mu: float) -> tuple[tuple[float, float], ...]:
    """Where the fit starts (log length scale of every dimension, log noise): at the priors' centres, and
    with short length scales and little noise."""
    return (mu, SN2_PRIOR[0]), (math.log(0.3), math.log(1e-2))


def _neg_log_posterior(theta: np.ndarray, x: np.ndarray, y: np.ndarray, d2: np.ndarray
                       ) -> tuple[float, np.ndarray]:
    """Negative log marginal likelihood plus priors, and its gradient in ``theta`` = (log_ls..., log_sf2,
    log_sn2). ``d2`` holds the squared differences per dimension, (n, n, d)."""
    n, d = x.shape
    log_ls, log_sf2, log_sn2 = theta[:d], theta[d], theta[d + 1]
    inv_ls2 = np.exp(-2.0 * log_ls)
    kf = math.exp(log_sf2) * np.exp(-0.5 * d2 @ inv_ls2)
    k = kf + (math.exp(log_sn2) + JITTER) * np.eye(n)
    try:
        chol = np.linalg.cholesky(k)
    except np.linalg.LinAlgError:
        return 1e10, np.zeros_like(theta)
    from scipy.linalg import cho_solve

    alpha = cho_solve((chol, True), y)
    nll = 0.5 * y @ alpha + np.log(np.diag(chol)).sum() + 0.5 * n * math.log(2 * math.pi)
    w = np.outer(alpha, alpha) - cho_solve((chol, True), np.eye(n))  # dLML/dK = W / 2
    grad = np.empty_like(theta)
    wk = w * kf
    grad[:d] = -0.5 * np.einsum("ij,ijk->k", wk, d2) * inv_ls2
    grad[d] = -0.5 * wk.sum()
    grad[d + 1] = -0.5 * math.exp(log_sn2) * np.trace(w)
    mu, sd = ls_prior(d)
    nll += 0.5 * (((log_ls - mu) / sd) ** 2).sum()
    grad[:d] += (log_ls - mu) / sd ** 2
    for i, (m, s) in ((d, SF2_PRIOR), (d + 1, SN2_PRIOR)):
        nll += 0.5 * ((theta[i] - m) / s) ** 2
        grad[i] += (theta[i] - m) / s ** 2
    return float(nll), grad


def fit(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> GP:
    """The GP of fitness ``y`` (n,) at inputs ``x`` (n, d) in [0, 1]; at most ``max_points`` (the best)."""
    from scipy.optimize import minimize

    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.asarray(y, dtype=float).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"fit needs as many targets as inputs, got {len(y)} and {len(x)}")
    finite = np.isfinite(x).all(1) & np.isfinite(y)  # a ledger is data: a NaN or inf row says nothing
    x, y = x[finite], y[finite]
    if len(y) == 0:
        raise ValueError("fit needs at least one point with finite inputs and target")
    if len(y) > max_points:
        keep = np.argsort(-y)[:max_points]
        x, y = x[keep], y[keep]
    z, mean, scale = standardise(y)
    n, d = x.shape
    d2 = (x[:, None, :] - x[None, :, :]) ** 2
    mu, _ = ls_prior(d)
    bounds = [(math.log(1e-2), math.log(1e3))] * d + [(-5.0, 5.0), SN2_BOUNDS]
    fits = []
    for log_ls, log_sn2 in fit_starts(mu):  # the flat all-noise fit is a local optimum: start on both sides of it
        theta0 = np.concatenate([np.full(d, log_ls), [SF2_PRIOR[0], log_sn2]])
        res = minimize(_neg_log_posterior, theta0, args=(x, z, d2), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 200})
        if np.all(np.isfinite(res.x)) and res.fun < 1e10:
            fits.append(condition_raw(x, z, mean, scale, res.x[:d], float(res.x[d]), float(res.x[d + 1])))
    if not fits:
        return condition_raw(x, z, mean, scale, np.full(d, mu), SF2_PRIOR[0], SN2_PRIOR[0])
    # the fit that predicts left-out points best: the posterior's modes include "all noise" twice over (a flat
    # mean with large noise, or length scales so short the kernel is white noise), which predict nothing
    return max(fits, key=lambda gp: np.nan_to_num(loo_skill(gp), nan=-np.inf))


def condition_raw(x: np.ndarray, z: np.ndarray, mean: float, scale: float, log_ls: np.ndarray, log_sf2: float,
                  log_sn2: float, noise: np.ndarray | None = None) -> GP:
    """The GP with these hyperparameters through standardised targets ``z`` at ``x``; ``noise``: each point's
    noise variance (default the fitted one)."""
    from scipy.linalg import cho_solve

    n = len(x)
    noise = np.full(n, math.exp(log_sn2)) if noise is None else np.asarray(noise, dtype=float)
    k = math.exp(log_sf2) * np.exp(-0.5 * _sqdist(x, x, log_ls)) + np.diag(noise + JITTER)
    chol = np.linalg.cholesky(k)
    return GP(x=x, log_ls=np.asarray(log_ls, dtype=float), log_sf2=log_sf2, log_sn2=log_sn2, y_mean=mean,
              y_scale=scale, chol=chol, alpha=cho_solve((chol, True), z), noise=noise)


def condition(gp: GP, x_new: np.ndarray, y_new: np.ndarray, exact: bool = False) -> GP:
    """``gp`` with the points (``x_new``, ``y_new`` in fitness units) added, its hyperparameters kept; ``exact``:
    the values are the latent fitness itself (no noise), as for a running generation believed at its mean."""
    x_new = np.atleast_2d(np.asarray(x_new, dtype=float))
    if len(x_new) == 0:
        return gp
    z = np.concatenate([_targets(gp), (np.asarray(y_new, dtype=float) - gp.y_mean) / gp.y_scale])
    noise = np.concatenate([gp.noise, np.full(len(x_new), 1e-6 if exact else math.exp(gp.log_sn2))])
    return condition_raw(np.vstack([gp.x, x_new]), z, gp.y_mean, gp.y_scale, gp.log_ls, gp.log_sf2, gp.log_sn2,
                         noise)


def _targets(gp: GP) -> np.ndarray:
    """The standardised training targets: K alpha."""
    return gp.chol @ (gp.chol.T @ gp.alpha)


def loo_skill(gp: GP) -> float:
    """``1 - SSE_gp / SSE_mean`` over the training points, with each point's leave-one-out mean (closed form:
    ``z_i - alpha_i / (K^-1)_ii``) against the mean of the other points (a model that knows nothing); nan below 5
    points or without spread. Optimistic (the hyperparameters were fitted with the left-out point): good to
    choose between fits, not to trust one. (A rank correlation would not do: the other points' mean is perfectly
    anti-correlated with the point.)"""
    from scipy.linalg import cho_solve

    n = len(gp.x)
    z = _targets(gp)
    if n < 5 or np.ptp(z) == 0:
        return float("nan")
    loo = z - gp.alpha / np.diag(cho_solve((gp.chol, True), np.eye(n)))
    others = (z.sum() - z) / (n - 1)
    return float(1.0 - ((z - loo) ** 2).sum() / ((z - others) ** 2).sum())


def rank_skill(predicted, observed, min_points: int = 6) -> float:
    """Spearman's rank correlation of predictions with what was then observed; nan with fewer than
    ``min_points`` pairs or no spread on either side."""
    from scipy.stats import spearmanr

    p, o = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    if len(p) < max(min_points, 3) or np.ptp(p) == 0 or np.ptp(o) == 0:
        return float("nan")
    return float(spearmanr(p, o).statistic)


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float) -> np.ndarray:
    """EI of maximising, per point: E[max(f - best, 0)] under N(mean, std^2)."""
    from scipy.stats import norm

    mean, std = np.asarray(mean, dtype=float), np.maximum(np.asarray(std, dtype=float), 1e-12)
    u = (mean - best) / std
    return std * (u * norm.cdf(u) + norm.pdf(u))
