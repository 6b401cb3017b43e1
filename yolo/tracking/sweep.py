"""A Hydra multirun's training runs under one MLflow parent run, and the sweep's best job.

Each job of ``python run_train.py -m ...`` (possibly in different processes, e.g. with the joblib launcher) looks
up or creates the RUNNING parent tagged with the sweep folder (:func:`parent_run_for_sweep`); creation is serialised
by a file lock, so there is exactly one parent per sweep. :class:`MlflowSweepCallback` (a Hydra callback, registered
in ``conf/train.yaml``) ends the sweep: it reads the children back, gives the parent the best child's fitness
(metric ``best_fitness``) and its overrides, run id and job number (tags ``best_overrides``, ``best_run_id``,
``best_job``), prints ``Sweep best: job N (overrides) fitness F, run <id>`` and marks the parent finished.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from yolo.tracking.hydra_job import sweep_dir
from yolo.tracking.parents import ChildResult, best_child
from yolo.tracking.tracker import Tracker, mlflow_config
from yolo.tracking.uri import store_dir
from yolo.utils.redact import redact_text

log = logging.getLogger("yolo")


def parent_name(key: str) -> str:
    return f"sweep {Path(key).name}"


def parent_run_for_sweep(mlflow_cfg: Any, default_dir: str | os.PathLike[str]) -> str | None:
    """Id of this sweep's parent run (created on first use), or None outside a multirun."""
    key = sweep_dir()
    if key is None:
        return None
    tracker = Tracker(mlflow_cfg, default_dir=default_dir)
    return tracker.get_or_create_parent(None, name=parent_name(key), key_tag=key, tags={"hydra.sweep_dir": key})


def summary_line(best: ChildResult | None) -> str:
    """``Sweep best: job N (overrides) fitness F, run <id>`` (one line, for the terminal)."""
    if best is None:
        return "Sweep best: no finished job reported a fitness"
    job = f"job {best.job}" if best.job is not None else f"run {best.name or best.run_id}"
    overrides = f" ({best.overrides})" if best.overrides else ""
    return f"Sweep best: {job}{overrides} fitness {best.fitness:.5f}, run {best.run_id}"


def finish_sweep(tracker: Tracker, parent_id: str) -> ChildResult | None:
    """Record the best child on the parent run, print the summary line, and mark the parent finished."""
    best = best_child(tracker.child_runs(parent_id))
    if tracker.start(resume_run_id=parent_id) is not None and best is not None:
        tracker.log_metrics({"best_fitness": best.fitness}, step=0)
        tracker.set_tags({"best_fitness": f"{best.fitness:.6g}", "best_overrides": best.overrides,
                          "best_run_id": best.run_id, "best_job": "" if best.job is None else best.job})
    tracker.end("FINISHED")
    if tracker.enabled:
        log.info(redact_text(summary_line(best)))
    return best


class MlflowSweepCallback(Callback):
    """Ends a multirun's MLflow parent run with the best job's fitness and overrides (never fails the sweep)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            mcfg = mlflow_config(config.mlflow)
            if not mcfg.enabled:
                return
            key = str(Path(config.hydra.sweep.dir).resolve())
            tracker = Tracker(mcfg, default_dir=store_dir(config))
            parent_id = tracker.find_parent(key)
            if parent_id is not None:
                finish_sweep(tracker, parent_id)
        except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
            log.warning(redact_text(f"WARNING: could not finish the sweep's MLflow parent run: {e}"))
