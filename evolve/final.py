"""The generalisation check of an evolution (``evolve.final_train=true``): the best hyps found and the base hyps,
each trained once more for the full schedule (``evolve.final_epochs``, default ``epochs``) with the same settings
and seed, validated at the end; both results go to ``final_train.json``, the log and the MLflow parent, so a user
sees whether the evolution paid off beyond the budget it was evolved at (hyps evolved on short runs may not carry
over to long ones).

Each retrain is a normal training run in ``<out_dir>/final/{best,base}`` (with its weights, results.csv and
plots) and an MLflow child of the evolution's parent.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evolve import mutation
from evolve.settings import Setup
from evolve.space import HYP_KEYS
from evolve.trial import finite
from yolo.utils.files import atomic_write_text

log = logging.getLogger("yolo.evolve")

FINAL_NAME = "final_train.json"


@dataclass
class FinalRun:
    hyps: str  # best | base
    fitness: float
    precision: float
    recall: float
    map50: float
    map: float
    epochs: int
    seconds: float
    save_dir: str
    mlflow_run_id: str | None = None


@dataclass
class FinalCheck:
    best: FinalRun
    base: FinalRun

    @property
    def gain(self) -> float:
        return self.best.fitness - self.base.fitness

    def as_dict(self) -> dict[str, Any]:
        return {"best": asdict(self.best), "base": asdict(self.base), "gain": self.gain}


def _train_one(setup: Setup, label: str, hyp: Mapping[str, Any], epochs: int, train_fn: Callable,
               parent_run_id: str | None) -> FinalRun:
    cfg = setup.train_cfg({k: hyp.get(k) for k in HYP_KEYS}, 0, parent_run_id)
    cfg.epochs, cfg.nosave, cfg.noplots = int(epochs), False, False
    cfg.project, cfg.name = str(setup.out_dir / "final"), label
    cfg.mlflow.run_name = f"{setup.cfg.name}-final-{label}"
    save_dir = setup.out_dir / "final" / label
    t0 = time.time()
    log.info(f"evolve: final check: training the {label} hyps for {epochs} epochs in {save_dir}")
    res = train_fn(cfg, callbacks=[], save_dir=str(save_dir))
    metrics = [finite(getattr(res, a, 0.0)) for a in ("precision", "recall", "map50", "map")]
    p, r, m50, m = metrics
    return FinalRun(label, float(mutation.fitness(metrics)[0]), p, r, m50, m, int(epochs),
                    round(time.time() - t0, 1), str(save_dir), getattr(res, "mlflow_run_id", None))


def final_train(setup: Setup, best_hyp: Mapping[str, Any], train_fn: Callable,
                parent_run_id: str | None) -> FinalCheck:
    """Retrain the best and the base hyps for the full schedule; write and log the comparison."""
    epochs = int(setup.settings.final_epochs or setup.cfg.epochs)
    check = FinalCheck(best=_train_one(setup, "best", best_hyp, epochs, train_fn, parent_run_id),
                       base=_train_one(setup, "base", setup.base, epochs, train_fn, parent_run_id))
    atomic_write_text(Path(setup.out_dir) / FINAL_NAME, json.dumps(check.as_dict(), indent=2) + "\n")
    verdict = "the evolution paid off" if check.gain > 0 else "the evolved hyps do NOT beat the base hyps"
    log.info(f"evolve: final check ({epochs} epochs): best hyps fitness {check.best.fitness:.5g} "
             f"(mAP50 {check.best.map50:.4g}, mAP50-95 {check.best.map:.4g}), base hyps {check.base.fitness:.5g} "
             f"(mAP50 {check.base.map50:.4g}, mAP50-95 {check.base.map:.4g}): {check.gain:+.5g}, {verdict}")
    return check
