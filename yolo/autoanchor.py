"""AutoAnchor: check how well the anchors fit a dataset's boxes and re-fit them when they do not.

The fit of anchors to a box is the worst of its width and height ratios, ``min(r, 1 / r)`` over w and h; a box
is *recallable* when its best anchor's fit exceeds ``1 / thr`` (``thr`` = ``hyp['anchor_t']``), the same rule the
target assignment uses. The best possible recall (BPR) is the recallable fraction of boxes. When the model's
anchors reach a BPR of 0.98 or less, new anchors are found by k-means on the (whitened) box sizes followed by a
mutation-only genetic search maximising the mean best fit over recallable boxes, as YOLOv5 v7.0 does. The new
anchors replace the old ones only when they raise the BPR.

Box sizes are in pixels at the training size: a label's normalised ``w, h`` times its image's ``(width, height)``
scaled so that the longer side equals ``imgsz``. All randomness comes from a ``numpy.random.Generator``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from yolo.models.yolo import check_anchor_order

__all__ = [
    "PREFIX",
    "anchor_metrics",
    "anchor_fitness",
    "label_wh",
    "kmeans",
    "kmean_anchors",
    "check_anchors",
]

log = logging.getLogger("yolo")
PREFIX = "AutoAnchor: "
BPR_THRESHOLD = 0.98


def _ratio_fit(anchors: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """``(n, k)`` fit of every box to every anchor: the smaller of its w and h ratios folded into (0, 1]."""
    r = wh[:, None, :] / anchors[None, :, :]
    return np.minimum(r, 1 / r).min(axis=2)


def anchor_metrics(anchors_px, wh, thr: float = 4.0) -> dict:
    """How well anchors ``(k, 2)`` fit boxes ``wh (n, 2)`` (both in pixels) under the ratio threshold ``thr``.

    Returns a dict of floats: ``bpr`` (fraction of boxes whose best anchor fits better than ``1 / thr``),
    ``aat`` (anchors above threshold per box, averaged), ``fitness`` (mean of the best fit, counting boxes at or
    below the threshold as 0), ``best_mean`` and ``mean`` (mean best fit and mean fit over all pairs).
    """
    k = np.asarray(anchors_px.detach().cpu() if isinstance(anchors_px, torch.Tensor) else anchors_px, np.float64)
    w = np.asarray(wh.detach().cpu() if isinstance(wh, torch.Tensor) else wh, np.float64)
    k, w = k.reshape(-1, 2), w.reshape(-1, 2)
    if len(w) == 0:
        return {"bpr": 0.0, "aat": 0.0, "fitness": 0.0, "best_mean": 0.0, "mean": 0.0}
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.nan_to_num(_ratio_fit(k, w), nan=0.0)
    best = x.max(axis=1)
    above = best > 1 / thr
    return {
        "bpr": float(above.mean()),
        "aat": float((x > 1 / thr).sum(axis=1).mean()),
        "fitness": float((best * above).mean()),
        "best_mean": float(best.mean()),
        "mean": float(x.mean()),
    }


def anchor_fitness(anchors_px: np.ndarray, wh: np.ndarray, thr: float = 4.0) -> float:
    """The quantity the genetic search maximises: mean best fit with unrecallable boxes counted as 0."""
    best = _ratio_fit(np.asarray(anchors_px, np.float64), np.asarray(wh, np.float64)).max(axis=1)
    return float((best * (best > 1 / thr)).mean())


def _log_fitness(log_anchors: np.ndarray, log_w: np.ndarray, log_h: np.ndarray, log_thr: float) -> float:
    """:func:`anchor_fitness` from logarithms: a box's fit to an anchor is ``exp(-max |log size - log anchor|)``.

    ``log_w`` and ``log_h`` are contiguous ``(n, 1)`` columns. Same value up to rounding, several times faster
    inside the genetic search.
    """
    dist = np.maximum(np.abs(log_w - log_anchors[:, 0]), np.abs(log_h - log_anchors[:, 1])).min(axis=1)
    return float(np.where(dist < log_thr, np.exp(-dist), 0.0).mean())


def label_wh(labels: Sequence, shapes, imgsz: int = 640, scale=None) -> np.ndarray:
    """Box sizes ``(n, 2)`` in pixels at training size ``imgsz``.

    Args:
        labels: per image, an ``(m, 5)`` array ``class, cx, cy, w, h`` (normalised).
        shapes: ``(num_images, 2)`` image sizes as ``(width, height)`` (upstream's ``dataset.shapes`` order).
        imgsz: training image size (longest side).
        scale: optional ``(num_images,)`` or ``(num_images, 1)`` factor per image (scale augmentation).
    """
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    sized = imgsz * shapes / shapes.max(axis=1, keepdims=True)
    if scale is not None:
        sized = sized * np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    parts = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(sized, labels)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, 2))


def kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 30, max_iter: int = 300, tol: float = 1e-5
) -> tuple[np.ndarray, float]:
    """Plain Lloyd k-means with ``n_init`` random restarts (initial centres drawn from the points).

    Returns the centres of the restart with the lowest distortion (mean distance of a point to its nearest
    centre) and that distortion. Clusters that end up empty are dropped, so fewer than ``k`` centres may come
    back when the points have fewer than ``k`` distinct values.
    """
    points = np.asarray(points, dtype=np.float64)
    best_c, best_d = None, np.inf
    for _ in range(n_init):
        c = points[rng.choice(len(points), size=k, replace=False)]
        prev = np.inf
        for _ in range(max_iter):
            d2 = ((points[:, None, :] - c[None]) ** 2).sum(-1)
            assign = d2.argmin(axis=1)
            dist = np.sqrt(d2[np.arange(len(points)), assign]).mean()
            counts = np.bincount(assign, minlength=len(c))
            sums = np.zeros_like(c)
            np.add.at(sums, assign, points)
            nonempty = counts > 0
            c = sums[nonempty] / counts[nonempty, None]
            if prev - dist <= tol:
                break
            prev = dist
        d2 = ((points[:, None, :] - c[None]) ** 2).sum(-1)
        dist = float(np.sqrt(d2.min(axis=1)).mean())
        if dist < best_d:
            best_c, best_d = c, dist
    return best_c, best_d


def _describe(k: np.ndarray, wh0: np.ndarray, thr: float, img_size: int) -> str:
    m = anchor_metrics(k, wh0, thr)
    sizes = ", ".join(f"{round(a)},{round(b)}" for a, b in k)
    return (
        f"{PREFIX}thr={1 / thr:.2f}: {m['bpr']:.4f} best possible recall, {m['aat']:.2f} anchors past thr; "
        f"n={len(k)}, img_size={img_size}, metric_all={m['mean']:.3f}/{m['best_mean']:.3f}-mean/best: {sizes}"
    )


def kmean_anchors(
    wh,
    n: int = 9,
    img_size: int = 640,
    thr: float = 4.0,
    gen: int = 1000,
    rng: np.random.Generator | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Fit ``n`` anchors (pixels, ``(n, 2)`` float32, sorted by area) to box sizes ``wh (m, 2)`` in pixels.

    Boxes with both sides under 2 px are left out of the fit. Start: k-means on the box sizes divided by their
    standard deviation (random sizes when there are fewer than ``n`` usable boxes or k-means finds fewer than
    ``n`` clusters). Then ``gen`` generations of mutation: each anchor coordinate is multiplied, with probability
    0.9, by ``1 + N(0, 1) * 0.1 * u`` (u ~ U(0, 1) drawn once per generation), clipped to 0.3 .. 3.0, anchors kept
    >= 2 px; a mutant replaces the parent when its :func:`anchor_fitness` is higher.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    wh0 = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    n_tiny = int((wh0 < 3.0).any(axis=1).sum())
    if n_tiny:
        log.warning(f"{PREFIX}WARNING: extremely small objects found: {n_tiny} of {len(wh0)} labels are < 3 pixels")
    wh_fit = wh0[(wh0 >= 2.0).any(axis=1)]

    k = None
    if n <= len(wh_fit):
        log.info(f"{PREFIX}Running kmeans for {n} anchors on {len(wh_fit)} points...")
        sigma = wh_fit.std(axis=0)
        sigma[sigma == 0] = 1.0
        centres, _ = kmeans(wh_fit / sigma, n, rng)
        if len(centres) == n:
            k = centres * sigma
    if k is None:
        log.warning(f"{PREFIX}WARNING: switching from kmeans to random anchor initialisation")
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * img_size
    k = k[np.argsort(k.prod(axis=1))]
    if verbose:
        log.info(_describe(k, wh0, thr, img_size))

    fit_wh = wh_fit if len(wh_fit) else wh0
    with np.errstate(divide="ignore"):  # a zero side gives -inf: that box never fits, as with ratios
        log_w, log_h = (np.ascontiguousarray(np.log(fit_wh[:, i : i + 1])) for i in (0, 1))
    log_thr = float(np.log(thr))
    f = _log_fitness(np.log(k), log_w, log_h, log_thr)
    mp, sigma_m = 0.9, 0.1
    gens = range(gen)
    if progress:
        from tqdm import tqdm

        gens = tqdm(gens, desc=f"{PREFIX}Evolving anchors with Genetic Algorithm")
    for _ in gens:
        v = np.ones(k.shape)
        while (v == 1).all():  # insist on a change
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * sigma_m + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = _log_fitness(np.log(kg), log_w, log_h, log_thr)
        if fg > f:
            f, k = fg, kg
            if progress:
                gens.set_description(f"{PREFIX}Evolving anchors with Genetic Algorithm: fitness = {f:.4f}")
    k = k[np.argsort(k.prod(axis=1))]
    log.info(_describe(k, wh0, thr, img_size))
    return k.astype(np.float32)


def _detect_of(model):
    model = model.module if hasattr(model, "module") else model
    return model.detect if hasattr(model, "detect") else model


def _sizes(data, imgsz: int, rng: np.random.Generator):
    """``(augmented wh, plain wh)`` from a dataset-like object, a ``(labels, shapes)`` pair or an ``(n, 2)`` array."""
    if hasattr(data, "labels") and hasattr(data, "shapes"):
        labels, shapes = data.labels, data.shapes
    elif isinstance(data, tuple) and len(data) == 2:
        labels, shapes = data
    else:  # box sizes in pixels already; the scale augmentation is drawn per box
        wh = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data, dtype=np.float64)
        wh = wh.reshape(-1, 2)
        return wh * rng.uniform(0.9, 1.1, size=(len(wh), 1)), wh
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    scale = rng.uniform(0.9, 1.1, size=(len(shapes), 1))
    return label_wh(labels, shapes, imgsz, scale), label_wh(labels, shapes, imgsz)


def check_anchors(
    data, model, thr: float = 4.0, imgsz: int = 640, rng: np.random.Generator | None = None, gen: int = 1000
) -> tuple[float, float | None]:
    """Check the model's anchors against a dataset and re-fit them when the BPR is 0.98 or less.

    Args:
        data: an object with ``labels`` (per image ``(m, 5)`` normalised) and ``shapes`` (``(num_images, 2)`` as
            ``(width, height)``), or the tuple ``(labels, shapes)``, or an array/tensor of box sizes ``(n, 2)`` in
            pixels at ``imgsz`` (then the scale augmentation is drawn per box instead of per image).
        model: a model with ``.detect`` (or the Detect layer itself): ``anchors (nl, na, 2)`` in grid units and
            ``stride (nl,)``.
        thr: the anchor ratio threshold (``hyp['anchor_t']``).
        imgsz: training image size.
        rng: random generator for the U(0.9, 1.1) scale augmentation and the re-fit (default: seeded with 0).
        gen: generations of the genetic search.

    Returns:
        ``(bpr, new_bpr)``: the current anchors' BPR and, when a re-fit was attempted, the re-fitted anchors' BPR
        (else ``None``). The model's anchors are replaced (in grid units, in stride order) only if
        ``new_bpr > bpr``.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    m = _detect_of(model)
    wh_aug, wh = _sizes(data, imgsz, rng)
    stride = torch.as_tensor(m.stride, device=m.anchors.device).to(m.anchors.dtype).view(-1, 1, 1)
    current = (m.anchors.detach() * stride).cpu().view(-1, 2).numpy()
    metrics = anchor_metrics(current, wh_aug, thr)
    bpr = metrics["bpr"]
    msg = f"{PREFIX}{metrics['aat']:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > BPR_THRESHOLD:
        log.info(msg + "Current anchors are a good fit to dataset")
        return bpr, None

    log.info(msg + "Anchors are a poor fit to dataset, attempting to improve...")
    na = m.anchors.numel() // 2
    new = kmean_anchors(wh, n=na, img_size=imgsz, thr=thr, gen=gen, rng=rng)
    new_bpr = anchor_metrics(new, wh_aug, thr)["bpr"]
    if new_bpr > bpr:
        with torch.no_grad():
            m.anchors[:] = torch.as_tensor(new, device=m.anchors.device).type_as(m.anchors).view_as(m.anchors)
            check_anchor_order(m)  # in pixels, before going back to grid units
            m.anchors /= stride
        log.info(f"{PREFIX}Done (optional: update the model yaml to use these anchors in the future)")
    else:
        log.info(f"{PREFIX}Done (original anchors better than new anchors, proceeding with original anchors)")
    return bpr, new_bpr
