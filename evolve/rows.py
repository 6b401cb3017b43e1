"""A study's finished generations as rows of evolve.csv, and a study seeded from an evolve.csv."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.formats import Row, read_evolve_csv
from evolve.samplers import FULL_HYP_ATTR, HYP_ATTR, METRICS_ATTR
from evolve.space import SearchSpace

log = logging.getLogger("yolo.evolve")

SOURCE_ATTR = "source"  # user attr of rows seeded from an evolve.csv


def trial_row(t: FrozenTrial, base: Mapping[str, Any]) -> Row:
    hyp = {**base, **t.system_attrs.get(HYP_ATTR, {}), **t.params, **t.user_attrs.get(FULL_HYP_ATTR, {})}
    metrics = t.user_attrs.get(METRICS_ATTR)
    if metrics is None:  # not written by the driver: keep the objective value as mAP50-95 alone
        metrics = [0.0, 0.0, 0.0, float(t.value or 0.0) / 0.9, 0.0, 0.0, 0.0]
    return Row(tuple(float(m) for m in metrics), hyp, t.number)


def study_rows(trials: Iterable[FrozenTrial], base: Mapping[str, Any]) -> list[Row]:
    """The finished generations of a study (COMPLETE trials, in trial-number order)."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    return [trial_row(t, base) for t in done]


def seed_study_from_csv(study: optuna.Study, path: str | os.PathLike, space: SearchSpace,
                        base: Mapping[str, Any]) -> int:
    """Add every row of an evolve.csv to the study as a finished generation (COMPLETE, fitness as value).

    Hyps missing from the file take the base values; ``anchors`` from the file is ignored when it is not searched.
    Values outside the current limits are kept for the mutation and clipped for Optuna's samplers.
    """
    columns, rows = read_evolve_csv(path)
    dists = space.distributions()
    for r in rows:
        hyp = {**base, **{k: v for k, v in r.hyp.items() if k in space.bounds or base.get(k) is not None}}
        if "anchors" not in space.bounds:
            hyp["anchors"] = base.get("anchors")
        params = {k: min(max(float(hyp[k]), d.low), d.high) for k, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=r.fitness, params=params, distributions=dists,
            user_attrs={METRICS_ATTR: list(r.metrics), FULL_HYP_ATTR: hyp, SOURCE_ATTR: str(path)},
            system_attrs={HYP_ATTR: hyp}))
    ignored = [c for c in columns if c not in space.bounds and c != "anchors"]
    log.info(f"evolve: seeded {len(rows)} generations from {path}"
             + (" (anchors column ignored: not searched)" if "anchors" in columns and "anchors" not in space.bounds
                else "") + (f"; not searched, kept from the file: {ignored}" if ignored else ""))
    return len(rows)
