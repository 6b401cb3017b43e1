"""The search space: upstream's ``meta`` table (``key: [gain, lower, upper]``) as data, and which keys are searched.

The table lives in config (``conf/evolve_space/default.yaml`` → ``cfg.evolve.space``) so a user can change gains
and limits. A key's *gain* scales its mutation (0: never mutated, but still clipped to its limits); the limits
bound every strategy. Keys of the training hyps that the table does not name are not searched: they keep the
base value in every generation.

``anchors`` is special (see :func:`build_space`): searching it changes the number of anchors per output level,
so the detection head is rebuilt and pretrained head weights no longer transfer. When evolution starts from
pretrained ``weights`` it stays out of the search unless the user asks (``evolve.search_anchors=true``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evolve.mutation import constrain
from yolo.config import HYP_KEYS as SCHEMA_HYP_KEYS
from yolo.errors import ConfigError

log = logging.getLogger("yolo.evolve")

# The order of the training hyps: evolve.csv columns and mutation vectors follow the hyp schema (one home).
HYP_KEYS: tuple[str, ...] = SCHEMA_HYP_KEYS

DEFAULT_ANCHORS = 3.0  # anchors per level that upstream assumes when the hyps do not say


@dataclass(frozen=True)
class Bound:
    """One row of the table: mutation gain and the [lower, upper] limits (``log``: sampled on a log scale, as
    Hydra's ``tag(log, interval(...))`` asks; the mutation search is multiplicative either way)."""

    gain: float
    lower: float
    upper: float
    log: bool = False


@dataclass
class SearchSpace:
    """The searched keys (in hyp order) with their bounds, and why any other key is not searched."""

    bounds: dict[str, Bound]
    excluded: dict[str, str] = field(default_factory=dict)
    # other searched settings (Hydra sweeps: a config group, an integer, a choice), by parameter name, as
    # Optuna distributions; they are no evolve.csv column and upstream's mutation has no gene for them
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """Every searched key, gain 0 included (the mutation draws one factor per key, as upstream)."""
        return list(self.bounds)

    @property
    def tuned_keys(self) -> list[str]:
        """Keys a strategy may change (gain > 0); Optuna's samplers suggest only these."""
        return [k for k, b in self.bounds.items() if b.gain > 0]

    @property
    def gains(self):
        return np.array([b.gain for b in self.bounds.values()], dtype=float)

    def limits(self) -> dict[str, tuple[float, float]]:
        return {k: (b.lower, b.upper) for k, b in self.bounds.items()}

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of the tuned keys (uniform on [lower, upper], or its log), then the others."""
        from optuna.distributions import FloatDistribution

        tuned = {k: FloatDistribution(self.bounds[k].lower, self.bounds[k].upper, log=self.bounds[k].log)
                 for k in self.tuned_keys}
        return {**tuned, **self.extra}

    def unit_scaler(self, keys: Sequence[str]):
        """A function mapping rows of ``keys``' values (m, len(keys)) into [0, 1] by their bounds (on the log
        scale for a log bound), for models of the space."""
        b = [self.bounds[k] for k in keys]
        log = np.array([x.log for x in b])
        lo = np.array([np.log(x.lower) if x.log else x.lower for x in b], dtype=float)
        hi = np.array([np.log(x.upper) if x.log else x.upper for x in b], dtype=float)
        span = np.where(hi - lo > 0, hi - lo, 1.0)

        def to_unit(rows):
            v = np.array(rows, dtype=float).reshape(-1, len(keys))
            v[:, log] = np.log(np.maximum(v[:, log], np.exp(lo[log])))
            return np.clip((v - lo) / span, 0.0, 1.0)

        return to_unit

    def as_table(self) -> dict[str, list[float]]:
        return {k: [b.gain, b.lower, b.upper] for k, b in self.bounds.items()}

    def describe(self) -> dict[str, Any]:
        """The space as JSON-able data (a study remembers what it was created with)."""
        from optuna.distributions import distribution_to_json

        rows: dict[str, Any] = {k: [b.gain, b.lower, b.upper, *(["log"] if b.log else [])]
                                for k, b in self.bounds.items()}
        return {**rows, **{k: distribution_to_json(d) for k, d in self.extra.items()}}


def parse_table(table: Mapping[str, Any], known: Sequence[str] = HYP_KEYS) -> dict[str, Bound]:
    """Validate a ``key: [gain, lower, upper]`` table; an unknown key or a bad row fails naming the key."""
    out: dict[str, Bound] = {}
    for key, row in dict(table).items():
        if key not in known:
            raise ConfigError(f"evolve.space: unknown hyperparameter {key!r} (known: {', '.join(known)})")
        try:
            gain, lower, upper = (float(x) for x in row)
        except (TypeError, ValueError):
            raise ConfigError(f"evolve.space.{key}: expected [gain, lower, upper], got {row!r}") from None
        if not all(math.isfinite(x) for x in (gain, lower, upper)):
            raise ConfigError(f"evolve.space.{key}: values must be finite, got {row!r}")
        if gain < 0:
            raise ConfigError(f"evolve.space.{key}: gain must be >= 0, got {gain}")
        if lower > upper:
            raise ConfigError(f"evolve.space.{key}: lower limit {lower} is above upper limit {upper}")
        out[key] = Bound(gain, lower, upper)
    return out


def anchors_per_level(model_cfg: Mapping[str, Any] | None) -> float:
    """Anchors per output level of a model config (``anchors: 3`` or a list of per-level pixel pairs)."""
    anchors = (model_cfg or {}).get("anchors") if isinstance(model_cfg, Mapping) else None
    if isinstance(anchors, (int, float)) and anchors > 0:
        return float(anchors)
    if isinstance(anchors, Sequence) and anchors and isinstance(anchors[0], Sequence) and len(anchors[0]) >= 2:
        return float(len(anchors[0]) // 2)
    return DEFAULT_ANCHORS


def build_space(
    table: Mapping[str, Any],
    base_hyp: Mapping[str, Any],
    *,
    weights: str | None = None,
    noautoanchor: bool = False,
    search_anchors: bool | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> tuple[SearchSpace, dict[str, float | None]]:
    """The search space and the base hyps of generation 1.

    ``anchors`` is searched when ``search_anchors`` is true, never when it is false, and by default (None) unless
    the run starts from pretrained ``weights`` or autoanchor is off (upstream drops it with ``--noautoanchor``).
    When it is searched and the base hyps leave it unset, the base value is the model's own anchors per level.
    Returns ``(space, base)``: ``base`` holds every hyp key in :data:`HYP_KEYS` order (``anchors`` None when it is
    neither searched nor set), clipped to the limits and rounded like every later generation.
    """
    bounds = parse_table(table)
    base: dict[str, float | None] = {}
    for k in HYP_KEYS:
        v = base_hyp.get(k) if isinstance(base_hyp, Mapping) else None
        base[k] = None if v is None else float(v)
    excluded: dict[str, str] = {}

    if "anchors" in bounds:
        reason = None
        if search_anchors is False:
            reason = "evolve.search_anchors=false"
        elif search_anchors is None and weights:
            reason = (f"starting from pretrained weights ({weights}): a mutated anchor count rebuilds the Detect head "
                      f"and discards its pretrained weights; set evolve.search_anchors=true to search it anyway")
        elif search_anchors is None and noautoanchor:
            reason = "noautoanchor=true (as upstream, anchors are not evolved without autoanchor)"
        if reason:
            excluded["anchors"] = reason
            del bounds["anchors"]
            log.info(f"evolve: 'anchors' is not searched: {reason}")
        else:
            if search_anchors and weights:
                log.warning(f"WARNING: evolve: searching 'anchors' although starting from {weights}: generations "
                            f"whose anchor count changes will not reuse the pretrained Detect head")
            if base["anchors"] is None:
                base["anchors"] = anchors_per_level(model_cfg)

    for k in HYP_KEYS:
        if k not in bounds and k not in excluded:
            excluded[k] = "not in evolve.space"
        if base[k] is None and k in bounds:
            raise ConfigError(f"hyp.{k}: has no value but evolve.space searches it")
    ordered = {k: bounds[k] for k in HYP_KEYS if k in bounds}
    space = SearchSpace(ordered, excluded)
    base.update(constrain({k: base[k] for k in ordered}, space.limits()))
    return space, base


def csv_columns(base: Mapping[str, Any]) -> list[str]:
    """The hyp columns of evolve.csv: every hyp key with a value (``anchors`` only when it has one)."""
    return [k for k in HYP_KEYS if base.get(k) is not None]
