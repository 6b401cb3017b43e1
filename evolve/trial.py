"""One generation: train it with the hyps of its trial, record its metrics and tell the study COMPLETE
(value = fitness), PRUNED or FAIL; a pruner stops a hopeless one between epochs."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evolve import fidelity, mutation, recovery, samplers
from evolve import optuna_internals as oi
from evolve.beats import Heartbeat
from evolve.settings import Setup
from evolve.space import HYP_KEYS, SearchSpace
from yolo.engine.callbacks import StopTraining

log = logging.getLogger("yolo.evolve")


class PruningCallback:
    """Reports each epoch's fitness to the trial and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_fit_epoch_end(self, trainer: Any) -> None:
        epoch, metrics = trainer.epoch, trainer.metrics
        value = metrics.get("fitness")
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), step=int(epoch))
        if self.trial.should_prune():
            raise StopTraining(f"pruned after epoch {epoch} (fitness {float(value):.5g})", pruned=True)


def finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def is_user_error(e: BaseException) -> bool:
    """A bad path, checkpoint or dataset (``yolo.cli.user_error_types``): every generation would fail alike.
    Looked up in the modules already loaded, since whatever raised such an error has imported its module."""
    import sys

    types: list[type[BaseException]] = [FileNotFoundError]
    for module, name in (("yolo.checkpoint", "CheckpointError"), ("yolo.data.config", "DatasetError")):
        t = getattr(sys.modules.get(module), name, None)
        if isinstance(t, type):
            types.append(t)
    return isinstance(e, tuple(types))


def fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    try:
        oi.set_user_attr(study, trial, recovery.FAIL_ATTR, reason[:2000])
        study.tell(trial, state=TrialState.FAIL)
    except Exception as e:  # someone else finished it (e.g. it was declared stale)
        log.warning(f"WARNING: evolve: could not mark trial {trial.number} failed: {e}")


def suggest(trial: optuna.Trial, space: SearchSpace) -> None:
    """Ask the trial for every searched value (a queued or sampled trial has them already)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, d in space.distributions().items():
        if isinstance(d, FloatDistribution):
            trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        else:
            raise TypeError(f"evolve: no way to suggest {name!r} from {d!r}")


def run_trial(setup: Setup, study: optuna.Study, trial: optuna.Trial, train_fn: Callable,
              parent_run_id: str | None) -> str:
    """Train one generation and record it; returns 'complete', 'pruned' or 'failed'."""
    suggest(trial, setup.space)
    frozen = oi.frozen(study, trial)
    hyp = {k: v for k, v in samplers.trial_hyp(frozen, setup.base).items() if k in HYP_KEYS}
    cfg = setup.train_cfg(hyp, trial.number, parent_run_id)
    save_dir = setup.out_dir / "generations" / f"trial{trial.number:04d}"
    callbacks = [PruningCallback(trial)] if setup.pruning else []
    oi.set_user_attr(study, trial, samplers.FULL_HYP_ATTR, hyp)
    oi.set_user_attr(study, trial, fidelity.SAVE_DIR_ATTR, str(save_dir))
    rung, keep_last = 0, False
    t0 = time.time()
    res, pruned = None, False
    try:
        if setup.rungs is not None:
            stored = oi.frozen(study, trial)
            rung = fidelity.rung_of(stored)
            cfg.stop_epoch = setup.rungs.stop_epoch(rung)
            keep_last = cfg.stop_epoch is not None  # a lower rung's checkpoint waits for its promotion
            start = fidelity.prepare_resume(study, stored, save_dir)
            if start is not None:
                cfg.resume = str(start)
        with Heartbeat(study, trial, setup.beats):
            try:
                res = train_fn(cfg, callbacks=callbacks, save_dir=str(save_dir))
                pruned = bool(getattr(res, "pruned", False))
            except StopTraining as e:  # a train_fn that lets it escape
                pruned = e.pruned
                if not pruned:
                    raise
    except KeyboardInterrupt:
        fail(study, trial, "interrupted")
        recovery.retry_trial(study, oi.frozen(study, trial), setup.settings.max_retries, reason="interrupted")
        raise
    except Exception as e:
        if is_user_error(e):
            fail(study, trial, f"{type(e).__name__}: {e}")
            raise
        log.exception(f"evolve: generation (trial {trial.number}) failed: {type(e).__name__}: {e}")
        fail(study, trial, f"{type(e).__name__}: {e}")
        return "failed"
    finally:
        (save_dir / fidelity.RESUME_NAME).unlink(missing_ok=True)
        tidy_weights(save_dir, keep_last=keep_last and res is not None and not pruned,
                     keep_all=bool(setup.settings.keep_weights))
    return record(setup, study, trial, res, pruned, rung, t0)


def tidy_weights(save_dir: Path, keep_last: bool, keep_all: bool) -> None:
    """After a generation: ``last.pt`` alone stays when a promotion may continue it, every checkpoint with
    ``evolve.keep_weights``, none otherwise."""
    if keep_last:
        (save_dir / "weights" / "best.pt").unlink(missing_ok=True)
    elif not keep_all:
        shutil.rmtree(save_dir / "weights", ignore_errors=True)


def record(setup: Setup, study: optuna.Study, trial: optuna.Trial, res: Any, pruned: bool, rung: int,
           t0: float, value: float | None = None) -> str:
    """Record a trained generation's metrics (``res``: a ``TrainResults``-like object, None when it gave none)
    and tell the study its fitness (``value`` when given: a Hydra job's return value); returns 'complete',
    'pruned' or 'failed'."""
    if res is not None:
        losses = list(getattr(res, "val_losses", (0.0, 0.0, 0.0)) or (0.0, 0.0, 0.0))[:3]
        metrics = [finite(getattr(res, a, 0.0)) for a in ("precision", "recall", "map50", "map")]
        metrics += [finite(x) for x in losses] + [0.0] * (3 - len(losses))
    else:
        metrics = [0.0] * 7
    fit = float(mutation.fitness(metrics[:4])[0])
    attrs = {samplers.METRICS_ATTR: metrics, "fitness": fit,
             "train_s": round(time.time() - t0, 3), "worker": setup.worker}
    if res is not None:
        attrs["epochs_completed"] = int(getattr(res, "epochs_completed", 0) or 0)
        attrs[fidelity.EPOCHS_ATTR] = attrs["epochs_completed"]
        if setup.rungs is not None:
            attrs["rung"] = rung
        if getattr(res, "mlflow_run_id", None):
            attrs["mlflow_run_id"] = res.mlflow_run_id
    try:
        for k, v in attrs.items():
            oi.set_user_attr(study, trial, k, v)
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"evolve: trial {trial.number} pruned (fitness so far {fit:.5g})")
            return "pruned"
        fit = fit if value is None else float(value)
        study.tell(trial, fit)
        if setup.rungs is not None and not setup.settings.keep_weights:
            fidelity.release_parent(study, oi.frozen(study, trial))
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(f"WARNING: evolve: trial {trial.number} was marked failed by another worker meanwhile; "
                    f"its result is dropped")
        return "failed"
    p, r, m50, m = metrics[:4]
    budget = f" after {attrs.get(fidelity.EPOCHS_ATTR)} epochs (rung {rung})" if setup.rungs is not None else ""
    log.info(f"evolve: trial {trial.number} finished{budget}: fitness {fit:.5g} (P {p:.4g}, R {r:.4g}, mAP50 {m50:.4g}, "
             f"mAP50-95 {m:.4g}) in {time.time() - t0:.1f}s")
    return "complete"
