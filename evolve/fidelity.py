"""Multi-fidelity search (``evolve.fidelity=asha``): asynchronous successive halving with promotion.

Every new candidate trains only the first rung of the schedule (``evolve.min_epochs`` epochs of the ``epochs``
schedule: the learning rate follows the full schedule, the run pauses with a resumable ``last.pt``). Whenever a
worker needs work, a candidate in the top ``1/eta`` of its rung that has not been promoted yet is promoted first,
highest rung first: a new generation that resumes its checkpoint and trains on to the next rung
(``min_epochs * eta**k`` epochs in all, the last rung being ``epochs``), so epochs add up and nothing is trained
twice. Otherwise the strategy's sampler proposes a new candidate (ASHA, Li et al. 2018).

Each rung's training is one generation of the ledger (one row of evolve.csv, one MLflow child) that records the
epochs it reached (:data:`EPOCHS_ATTR`); promotions carry their rung and parent trial in system attributes, which
a retry keeps. The strategies learn from the first rung only (:class:`FirstRungView`), where every candidate has a
value at the same budget; the best hyps are chosen among the generations of the highest rung reached.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve.samplers import HYP_ATTR
from yolo.errors import ConfigError

FIDELITIES = ("full", "asha")
RUNG_ATTR = "asha:rung"  # system attr of a promotion: the rung it trains to (0: a new candidate)
PARENT_ATTR = "asha:parent"  # system attr of a promotion: the trial number whose checkpoint it continues
EPOCHS_ATTR = "epochs"  # user attr of every finished generation: epochs of the schedule trained by its end
EXTRA_COLUMNS = (EPOCHS_ATTR,)  # evolve.csv columns after upstream's under asha
SAVE_DIR_ATTR = "save_dir"  # user attr of a generation trained here: its run folder
RESUME_NAME = "promoted_from.pt"  # the parent's checkpoint, copied into the promotion's folder


class PromotionError(RuntimeError):
    """A promotion cannot start: its parent's checkpoint is gone."""


@dataclass(frozen=True)
class Rungs:
    """The epochs at the end of each rung: ``min_epochs * eta**k`` below ``epochs``, then ``epochs``."""

    budgets: tuple[int, ...]
    eta: int

    @classmethod
    def make(cls, epochs: int, min_epochs: int, eta: int) -> Rungs:
        if eta < 2:
            raise ConfigError(f"evolve.eta: must be >= 2, got {eta}")
        if not 1 <= min_epochs <= epochs:
            raise ConfigError(f"evolve.min_epochs: must be within 1..epochs ({epochs}), got {min_epochs}")
        budgets, b = [], int(min_epochs)
        while b < epochs:
            budgets.append(b)
            b *= eta
        return cls(tuple(budgets) + (int(epochs),), int(eta))

    @property
    def top(self) -> int:
        return len(self.budgets) - 1

    def stop_epoch(self, rung: int) -> int | None:
        """The trainer's ``stop_epoch`` for a generation of ``rung`` (None: train to the end of the schedule)."""
        return None if rung >= self.top else self.budgets[rung]


@dataclass(frozen=True)
class Candidate:
    """A finished generation as the promotion rule sees it."""

    number: int
    rung: int
    value: float
    promoted: bool  # a later generation continues (or continued, or tried to continue) it
    resumable: bool  # its checkpoint is still there


def choose_promotion(candidates: Iterable[Candidate], rungs: Rungs) -> Candidate | None:
    """ASHA's rule: from the highest rung below the top down, the first of the top ``n // eta`` of that rung
    (by value, then by trial number) that is not promoted yet and can be resumed; None: start a new candidate."""
    by_rung: dict[int, list[Candidate]] = {}
    for c in candidates:
        if 0 <= c.rung < rungs.top and math.isfinite(c.value):
            by_rung.setdefault(c.rung, []).append(c)
    for rung in sorted(by_rung, reverse=True):
        ranked = sorted(by_rung[rung], key=lambda c: (-c.value, c.number))
        for c in ranked[: len(ranked) // rungs.eta]:
            if not c.promoted and c.resumable:
                return c
    return None


def rung_of(t: FrozenTrial) -> int:
    r = t.system_attrs.get(RUNG_ATTR, 0)
    return int(r) if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


def parent_of(t: FrozenTrial) -> int | None:
    p = t.system_attrs.get(PARENT_ATTR)
    return int(p) if isinstance(p, int) and not isinstance(p, bool) else None


def folder_of(t: FrozenTrial) -> Path | None:
    """The run folder of a generation trained by this evolution (None for a warm start's row)."""
    d = t.user_attrs.get(SAVE_DIR_ATTR)
    return Path(d) if isinstance(d, str) and d else None


def checkpoint_of(t: FrozenTrial) -> Path | None:
    """The resumable last.pt a finished lower-rung generation left (None when gone)."""
    d = folder_of(t)
    p = d / "weights" / "last.pt" if d is not None else None
    return p if p is not None and p.is_file() else None


def candidates(trials: Sequence[FrozenTrial]) -> list[Candidate]:
    promoted = {p for t in trials if (p := parent_of(t)) is not None}
    return [Candidate(t.number, rung_of(t), float(t.value), t.number in promoted, checkpoint_of(t) is not None)
            for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and folder_of(t) is not None]  # trained here (not a warm start's row)


def enqueue_promotion(study: optuna.Study, parent: FrozenTrial) -> None:
    """Queue the next rung of ``parent``: its params fixed, its rung and parent recorded (kept by retries)."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, system_attrs={
            "fixed_params": dict(parent.params), RUNG_ATTR: rung_of(parent) + 1, PARENT_ATTR: parent.number,
            **{k: v for k, v in parent.system_attrs.items() if k == HYP_ATTR}}))


def maybe_promote(study: optuna.Study, rungs: Rungs) -> int | None:
    """Under the evolution's lock, before asking for a trial: queue a promotion if one is due (its parent)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return None  # queued work (a promotion, a retry, the base) goes first
    c = choose_promotion(candidates(trials), rungs)
    if c is None:
        return None
    parent = next(t for t in trials if t.number == c.number)
    enqueue_promotion(study, parent)
    return c.number


def prepare_resume(study: optuna.Study, trial: FrozenTrial, save_dir: Path) -> Path | None:
    """A promotion's starting checkpoint: the parent's last.pt copied into this generation's folder (so the
    trainer resumes it into this folder, not the parent's); None for a new candidate."""
    parent = parent_of(trial)
    if parent is None:
        return None
    src = next((checkpoint_of(t) for t in study.get_trials(deepcopy=False) if t.number == parent), None)
    if src is None:  # this generation fails (not the evolution: other candidates can go on)
        raise PromotionError(f"evolve: the checkpoint of trial {parent}, which trial {trial.number} continues, is "
                             f"gone (evolve.keep_weights=false removes the weights of finished evolutions)")
    save_dir.mkdir(parents=True, exist_ok=True)
    dst = save_dir / RESUME_NAME
    shutil.copyfile(src, dst)
    return dst


def release_parent(study: optuna.Study, trial: FrozenTrial) -> None:
    """Once a promotion is done its parent's checkpoint is needed no more."""
    parent = parent_of(trial)
    if parent is None:
        return
    for t in study.get_trials(deepcopy=False):
        if t.number == parent and folder_of(t) is not None:
            shutil.rmtree(folder_of(t) / "weights", ignore_errors=True)


def release_unpromoted(study: optuna.Study) -> None:
    """At the end of an evolution: the checkpoints left by lower rungs (a longer evolution can no longer
    promote those generations; they stay in the ledger)."""
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE and folder_of(t) is not None:
            shutil.rmtree(folder_of(t) / "weights", ignore_errors=True)


class FirstRungView:
    """The study as a strategy's sampler sees it under asha: promotions hidden, so every value it learns from
    was measured at the same budget (the first rung). Everything else is the study's own."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if parent_of(t) is None]

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if parent_of(t) is None]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class FirstRungSampler(optuna.samplers.BaseSampler):
    """Wraps a strategy's sampler for asha: promotions keep their parent's values (nothing is sampled), new
    candidates are sampled from the first rung's history (:class:`FirstRungView`)."""

    def __init__(self, inner: optuna.samplers.BaseSampler):
        self.inner = inner

    def infer_relative_search_space(self, study, trial):
        if parent_of(trial) is not None:
            return {}
        return self.inner.infer_relative_search_space(FirstRungView(study), trial)

    def sample_relative(self, study, trial, search_space):
        if parent_of(trial) is not None or not search_space:
            return {}
        return self.inner.sample_relative(FirstRungView(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(FirstRungView(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
