"""The generalisation check of an evolution (``evolve.final_train=true``): the best hyps found and the base hyps,
each trained once more for the full schedule (``evolve.final_epochs``, default ``epochs``) with the same settings,
validated at the end; the results go to ``final_train.json``, the log and the MLflow parent, so a user sees whether
the evolution paid off beyond the budget it was evolved at (hyps evolved on short runs may not carry over to long
ones).

A short fine-tune's fitness is noisy: the same hyps trained with another seed can move it by as much as an
evolution gains. ``evolve.final_seeds=N`` trains each side with the training seeds ``seed .. seed+N-1`` (best and
base paired per seed) and reports the means, their spread and the paired gain's standard error; the verdict then
says when the gain is within that noise. With one seed (the default) the check is a single pair, as upstream users
would run it by hand.

Each retrain is a normal training run in ``<out_dir>/final/{best,base}`` (``{best,base}-seed<k>`` for the seeds after
the first), with its weights, results.csv and plots, and an MLflow child of the evolution's parent. A finished
retrain leaves ``final_run.json`` in its folder, keyed by a hash of its whole training config: an evolution run
again (after a kill during the check, or to read the check once more) reuses the retrains already done with the
same config and trains only the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evolve import mutation
from evolve.settings import Setup
from evolve.space import HYP_KEYS
from evolve.trial import finite
from yolo.utils.files import atomic_write_text

log = logging.getLogger("yolo.evolve")

FINAL_NAME = "final_train.json"
RECORD_NAME = "final_run.json"  # in each retrain's folder: its result, reused by a rerun with the same config
MAX_RECORD_BYTES = 64 * 1024
METRICS = ("precision", "recall", "map50", "map")


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
    seed: int = 0


def mean_run(runs: list[FinalRun]) -> FinalRun:
    """One side's runs as one: the metrics averaged, the seconds added up, the first run's folder and MLflow id."""
    first = runs[0]
    means = {a: statistics.fmean(getattr(r, a) for r in runs) for a in ("fitness", *METRICS)}
    return FinalRun(first.hyps, **means, epochs=first.epochs, seconds=round(sum(r.seconds for r in runs), 1),
                    save_dir=first.save_dir, mlflow_run_id=first.mlflow_run_id, seed=first.seed)


def paired_gain(best: list[float], base: list[float]) -> tuple[float, float | None]:
    """The mean of the per-seed differences and its standard error (None with one pair)."""
    diffs = [b - a for b, a in zip(best, base)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class FinalCheck:
    best_runs: list[FinalRun]
    base_runs: list[FinalRun]

    @property
    def best(self) -> FinalRun:
        return mean_run(self.best_runs)

    @property
    def base(self) -> FinalRun:
        return mean_run(self.base_runs)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.best_runs]

    @property
    def gain(self) -> float:
        return self.paired()[0]

    @property
    def gain_se(self) -> float | None:
        return self.paired()[1]

    def paired(self) -> tuple[float, float | None]:
        return paired_gain([r.fitness for r in self.best_runs], [r.fitness for r in self.base_runs])

    def verdict(self) -> str:
        se = self.gain_se
        if se is not None and se > 0 and abs(self.gain) <= 2 * se:
            return (f"within the seed-to-seed noise (gain {self.gain:+.4g} ± {se:.2g} standard error over "
                    f"{len(self.seeds)} seeds): not shown to pay off")
        if self.gain > 0:
            return "the evolution paid off"
        return "the evolved hyps do NOT beat the base hyps"

    def as_dict(self) -> dict[str, Any]:
        """``best``/``base``: the runs' means (one run: that run); per-seed runs, spreads and the verdict beside."""
        return {"best": asdict(self.best), "base": asdict(self.base), "gain": self.gain, "gain_se": self.gain_se,
                "seeds": self.seeds, "best_fitness_sd": spread([r.fitness for r in self.best_runs]),
                "base_fitness_sd": spread([r.fitness for r in self.base_runs]), "verdict": self.verdict(),
                "best_runs": [asdict(r) for r in self.best_runs], "base_runs": [asdict(r) for r in self.base_runs]}


def config_key(cfg: DictConfig) -> str:
    """A hash of a retrain's training config, its MLflow settings aside (a rerun has another parent run)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("mlflow", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()


def reuse_record(save_dir: Path, key: str, label: str, epochs: int, seed: int) -> FinalRun | None:
    """The retrain recorded in ``save_dir`` with the config ``key``, or None: a record that is missing, too big, torn,
    of another config, or whose figures are not finite numbers is not used (the retrain runs again). Only its
    figures are read from it: the folder, schedule and seed are the caller's."""
    path = save_dir / RECORD_NAME
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        run = data["run"]
        if data.get("config") != key or run.get("hyps") != label:
            return None
        numbers = {a: float(run[a]) for a in ("fitness", *METRICS, "seconds")}
        if not all(math.isfinite(v) for v in numbers.values()):
            return None
        run_id = run.get("mlflow_run_id")
        return FinalRun(label, **numbers, epochs=int(epochs), save_dir=str(save_dir),
                        mlflow_run_id=run_id if isinstance(run_id, str) else None, seed=int(seed))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _train_one(setup: Setup, label: str, hyp: Mapping[str, Any], epochs: int, seed: int, train_fn: Callable,
               parent_run_id: str | None) -> FinalRun:
    name = label if seed == int(setup.cfg.seed) else f"{label}-seed{seed}"
    cfg = setup.train_cfg({k: hyp.get(k) for k in HYP_KEYS}, 0, parent_run_id)
    cfg.epochs, cfg.seed, cfg.nosave, cfg.noplots = int(epochs), int(seed), False, False
    cfg.project, cfg.name = str(setup.out_dir / "final"), name
    cfg.mlflow.run_name = f"{setup.cfg.name}-final-{name}"
    save_dir = setup.out_dir / "final" / name
    key = config_key(cfg)
    done = reuse_record(save_dir, key, label, epochs, seed)
    if done is not None:
        log.info(f"evolve: final check: the {label} hyps (seed {seed}) were trained before with this config: "
                 f"{save_dir}, fitness {done.fitness:.5g}")
        return done
    t0 = time.time()
    log.info(f"evolve: final check: training the {label} hyps for {epochs} epochs (seed {seed}) in {save_dir}")
    res = train_fn(cfg, callbacks=[], save_dir=str(save_dir))
    metrics = [finite(getattr(res, a, 0.0)) for a in METRICS]
    p, r, m50, m = metrics
    run = FinalRun(label, float(mutation.fitness(metrics)[0]), p, r, m50, m, int(epochs), round(time.time() - t0, 1),
                   str(save_dir), getattr(res, "mlflow_run_id", None), int(seed))
    save_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(save_dir / RECORD_NAME, json.dumps({"config": key, "run": asdict(run)}, indent=1) + "\n")
    return run


def final_train(setup: Setup, best_hyp: Mapping[str, Any], train_fn: Callable,
                parent_run_id: str | None) -> FinalCheck:
    """Retrain the best and the base hyps for the full schedule, paired per training seed; write and log the
    comparison."""
    epochs = int(setup.settings.final_epochs or setup.cfg.epochs)
    check = FinalCheck([], [])
    for k in range(int(setup.settings.final_seeds)):
        seed = int(setup.cfg.seed) + k
        check.best_runs.append(_train_one(setup, "best", best_hyp, epochs, seed, train_fn, parent_run_id))
        check.base_runs.append(_train_one(setup, "base", setup.base, epochs, seed, train_fn, parent_run_id))
    atomic_write_text(Path(setup.out_dir) / FINAL_NAME, json.dumps(check.as_dict(), indent=2) + "\n")
    best, base = check.best, check.base
    over = f", mean of {len(check.seeds)} seeds" if len(check.seeds) > 1 else ""
    log.info(f"evolve: final check ({epochs} epochs{over}): best hyps fitness {best.fitness:.5g} "
             f"(mAP50 {best.map50:.4g}, mAP50-95 {best.map:.4g}), base hyps {base.fitness:.5g} "
             f"(mAP50 {base.map50:.4g}, mAP50-95 {base.map:.4g}): {check.gain:+.5g}, {check.verdict()}")
    return check
