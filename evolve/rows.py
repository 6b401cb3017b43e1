"""A study's finished generations as rows of evolve.csv, and a study seeded from an evolve.csv."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.fidelity import EPOCHS_ATTR
from evolve.formats import CSV_NAME, EvolveCsvError, Row, read_evolve_csv
from evolve.samplers import FULL_HYP_ATTR, HYP_ATTR, METRICS_ATTR
from evolve.space import SearchSpace
from yolo.utils.redact import redact_url

log = logging.getLogger("yolo.evolve")

SOURCE_ATTR = "source"  # user attr of rows seeded from an evolve.csv
WARM_ATTR = "evolve:warm"  # system attr of a warm start's rows: history, not generations of this evolution


def trial_row(t: FrozenTrial, base: Mapping[str, Any]) -> Row:
    hyp = {**base, **t.system_attrs.get(HYP_ATTR, {}), **t.params, **t.user_attrs.get(FULL_HYP_ATTR, {})}
    metrics = t.user_attrs.get(METRICS_ATTR)
    if metrics is None:  # not written by the driver: keep the objective value as mAP50-95 alone
        metrics = [0.0, 0.0, 0.0, float(t.value or 0.0) / 0.9, 0.0, 0.0, 0.0]
    extra = {EPOCHS_ATTR: int(t.user_attrs[EPOCHS_ATTR])} if isinstance(t.user_attrs.get(EPOCHS_ATTR), int) else {}
    return Row(tuple(float(m) for m in metrics), hyp, t.number, extra)


def is_warm(t: FrozenTrial) -> bool:
    return bool(t.system_attrs.get(WARM_ATTR))


def study_rows(trials: Iterable[FrozenTrial], base: Mapping[str, Any]) -> list[Row]:
    """The finished generations of a study (COMPLETE trials, in trial-number order; a warm start's rows are
    history, not generations)."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE and not is_warm(t)), key=lambda t: t.number)
    return [trial_row(t, base) for t in done]


def source_rows(source: str, out_dir: str | os.PathLike) -> list[Row]:
    """The finished generations of a warm start's source: an evolve.csv (upstream's or ours), an evolution's
    folder (its evolve.csv), or a storage (a journal file or a database URL, study ``evolve``)."""
    p = Path(source).expanduser()
    if p.is_dir():
        p = p / CSV_NAME
    if p.suffix.lower() == ".csv" or (p.is_file() and p.name == CSV_NAME):
        return read_evolve_csv(p)[1]
    if not p.exists() and "://" not in source:
        raise EvolveCsvError(f"evolve.warm_start: {source}: no such evolve.csv, evolution folder or storage")
    from evolve.storages import open_storage  # deferred: a database driver only when one is named

    try:
        study = optuna.load_study(study_name="evolve", storage=open_storage(source, out_dir))
    except Exception as e:
        raise EvolveCsvError(f"evolve.warm_start: {redact_url(source) if '://' in source else source}: cannot "
                             f"read an evolution from it: {type(e).__name__}: {e}") from None
    return study_rows(study.get_trials(deepcopy=False), {})


def warm_start(study: optuna.Study, sources: Iterable[str], space: SearchSpace, base: Mapping[str, Any],
               out_dir: str | os.PathLike) -> int:
    """Add the generations of earlier evolutions to a new study's history (COMPLETE, fitness as value, marked
    :data:`WARM_ATTR`): the mutation search picks parents among them and the samplers learn from them, but they
    are not generations of this evolution (not counted in ``generations``, not rows of its evolve.csv)."""
    n = 0
    for source in sources:
        rows = source_rows(str(source), out_dir)
        _add_rows(study, rows, space, base, source=str(source), warm=True)
        log.info(f"evolve: warm start: {len(rows)} generations of {source} in the history")
        n += len(rows)
    return n


def _add_rows(study: optuna.Study, rows: Iterable[Row], space: SearchSpace, base: Mapping[str, Any], *,
              source: str, warm: bool) -> None:
    dists = space.distributions()
    for r in rows:
        hyp = {**base, **{k: v for k, v in r.hyp.items() if k in space.bounds or base.get(k) is not None}}
        if "anchors" not in space.bounds:
            hyp["anchors"] = base.get("anchors")
        params = {k: min(max(float(hyp[k]), d.low), d.high) for k, d in dists.items()}
        user = {METRICS_ATTR: list(r.metrics), FULL_HYP_ATTR: hyp, SOURCE_ATTR: source}
        if EPOCHS_ATTR in r.extra:
            user[EPOCHS_ATTR] = int(r.extra[EPOCHS_ATTR])
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=r.fitness, params=params, distributions=dists, user_attrs=user,
            system_attrs={HYP_ATTR: hyp, **({WARM_ATTR: True} if warm else {})}))


def seed_study_from_csv(study: optuna.Study, path: str | os.PathLike, space: SearchSpace,
                        base: Mapping[str, Any]) -> int:
    """Add every row of an evolve.csv to the study as a finished generation (COMPLETE, fitness as value).

    Hyps missing from the file take the base values; ``anchors`` from the file is ignored when it is not searched.
    Values outside the current limits are kept for the mutation and clipped for Optuna's samplers.
    """
    columns, rows = read_evolve_csv(path)
    _add_rows(study, rows, space, base, source=str(path), warm=False)
    ignored = [c for c in columns if c not in space.bounds and c != "anchors"]
    log.info(f"evolve: seeded {len(rows)} generations from {path}"
             + (" (anchors column ignored: not searched)" if "anchors" in columns and "anchors" not in space.bounds
                else "") + (f"; not searched, kept from the file: {ignored}" if ignored else ""))
    return len(rows)
