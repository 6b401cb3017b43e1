"""What the command shows of an evolution: its MLflow parent run (best fitness by generation, the files as
artifacts) and a progress bar over generations."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf

from evolve.formats import Row
from evolve.rows import study_rows
from evolve.settings import PARENT_ATTR, Setup, redact
from evolve.workers import counts
from yolo.config import MlflowConfig
from yolo.tracking import Tracker, flatten_dict

log = logging.getLogger("yolo.evolve")


def data_name(setup: Setup) -> Any:
    data = setup.train_container.get("data")
    return (data.get("file") or data.get("path")) if isinstance(data, dict) else data


class ParentRun:
    """The evolution's MLflow parent run, owned by the calling process."""

    def __init__(self, setup: Setup, study: optuna.Study):
        self.tracker = None
        self.run_id: str | None = None
        self.logged = 0
        if not setup.cfg.mlflow.enabled:
            return
        m = setup.cfg.mlflow
        tcfg = MlflowConfig(enabled=True, tracking_uri=setup.tracking_uri, experiment=m.experiment,
                            run_name=m.run_name or f"evolve-{setup.cfg.name}", timeout_s=m.timeout_s)
        params = flatten_dict({
            "evolve": {k: v for k, v in OmegaConf.to_container(setup.settings, resolve=True).items()
                       if k not in ("space", "out_dir", "storage", "devices", "sampler_kwargs")},
            "space": {**{k: ",".join(f"{x:g}" for x in row) for k, row in setup.space.as_table().items()},
                      **{k: str(d) for k, d in setup.space.extra.items()}},
            "base": setup.base,
            "train": {**{k: setup.train_container.get(k) for k in ("weights", "epochs", "imgsz", "batch_size", "seed",
                                                                   "optimizer")}, "data": data_name(setup)},
        })
        tags = {"yolo.evolve.out_dir": str(setup.out_dir), "yolo.evolve.study": setup.study_name,
                "yolo.evolve.storage": f"{setup.storage_kind}:{redact(setup.storage_where)}",
                "yolo.evolve.generations": setup.generations, "yolo.evolve.strategy": setup.strategy}
        existing = study.user_attrs.get(PARENT_ATTR)
        tracker = Tracker(tcfg, default_dir=setup.mlflow_root)
        run_id = tracker.start(params=params, tags=tags, resume_run_id=existing)
        if run_id is None and existing:  # the old parent is gone: start a new one
            tracker = Tracker(tcfg, default_dir=setup.mlflow_root)
            run_id = tracker.start(params=params, tags=tags)
        if run_id is None:
            return
        self.tracker, self.run_id = tracker, run_id
        if run_id != existing:
            study.set_user_attr(PARENT_ATTR, run_id)
        else:
            self.logged = self._logged_steps()
        log.info(f"evolve: MLflow parent run {run_id} ({tracker.safe_uri})")

    def _logged_steps(self) -> int:
        try:
            hist = self.tracker.client.get_metric_history(self.run_id, "fitness")
            return max((h.step for h in hist), default=-1) + 1
        except Exception:
            return 0

    def log_rows(self, rows: list[Row]) -> None:
        if self.tracker is None or len(rows) <= self.logged:
            return
        best = max((r.fitness for r in rows[: self.logged]), default=-math.inf)
        for i in range(self.logged, len(rows)):
            best = max(best, rows[i].fitness)
            self.tracker.log_metrics({"fitness": rows[i].fitness, "best_fitness": best}, step=i)
        self.logged = len(rows)

    def log_final(self, check: Any) -> None:
        """The generalisation check's figures (:class:`evolve.final.FinalCheck`) on the parent run."""
        if self.tracker is None:
            return
        best, base = check.best, check.base
        metrics = {"final/best_fitness": best.fitness, "final/base_fitness": base.fitness, "final/gain": check.gain,
                   "final/best_mAP50-95": best.map, "final/base_mAP50-95": base.map, "final/seeds": len(check.seeds)}
        if check.gain_se is not None:
            metrics["final/gain_se"] = check.gain_se
        self.tracker.log_metrics(metrics, step=0)

    def finish(self, paths: Mapping[str, Path], status: str) -> None:
        if self.tracker is None:
            return
        for p in paths.values():
            self.tracker.log_artifact(p)
        self.tracker.end(status)


class Progress:
    """A tqdm bar over generations (best fitness so far) and the parent run's metrics."""

    def __init__(self, setup: Setup, parent: ParentRun, study: optuna.Study):
        from tqdm import tqdm

        self.setup, self.parent = setup, parent
        c = counts(study)
        self.bar = tqdm(total=setup.generations, initial=min(c.finished, setup.generations), desc="evolve",
                        unit="gen", dynamic_ncols=True)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        c = counts(study)
        rows = study_rows(study.get_trials(deepcopy=False), self.setup.base)
        self.bar.n = min(c.finished, self.setup.generations)
        if rows:
            self.bar.set_postfix(best=f"{max(r.fitness for r in rows):.5g}", failed=c.failed, pruned=c.pruned)
        self.bar.refresh()
        self.parent.log_rows(rows)

    def close(self) -> None:
        self.bar.close()
