"""A training run's MLflow run: what the trainer's MLflow callback opens at the start of training.

:func:`start_training_run` puts together what a training run needs from tracking: the settings (``cfg.mlflow``),
the store beside the runs folder, the sweep's parent run for a multirun job, a name that says what the run is
(:mod:`yolo.tracking.names`), the source tags, and the whole config as params (passwords masked). A resumed
training continues its own MLflow run (same id, same name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from yolo.tracking.hydra_job import HydraJob, current_job, swept_overrides
from yolo.tracking.names import run_name_for_training
from yolo.tracking.parents import SWEEP_JOB_TAG, SWEEP_OVERRIDES_TAG
from yolo.tracking.sanitize import flatten_dict
from yolo.tracking.source import command_line, git_commit
from yolo.tracking.sweep import parent_run_for_sweep
from yolo.tracking.tracker import Tracker, mlflow_config
from yolo.tracking.uri import store_dir


def plain_config(cfg: Any) -> dict[str, Any]:
    """A training config (DictConfig, dataclass or mapping) as plain nested dicts, interpolations resolved."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def training_tags(save_dir: str | os.PathLike[str], job: HydraJob | None) -> dict[str, Any]:
    """Tags of a training run: where it writes, the commit, its Hydra overrides and, in a sweep, its job number
    and the overrides that make it differ from its siblings."""
    tags: dict[str, Any] = {"command": command_line(), "git_commit": git_commit() or "unknown",
                            "save_dir": os.fspath(save_dir),
                            "hydra_overrides": " ".join(job.overrides) if job is not None else ""}
    if job is not None and job.sweep_dir is not None:
        tags[SWEEP_OVERRIDES_TAG] = ",".join(sorted(swept_overrides(job.overrides, job.sweep_overrides)))
        if job.job_num is not None:
            tags[SWEEP_JOB_TAG] = job.job_num
    return tags


def start_training_run(cfg: Any, save_dir: str | os.PathLike[str], resume_run_id: str | None = None) -> Tracker:
    """Open the MLflow run of a training with config ``cfg`` writing into ``save_dir`` (continue ``resume_run_id``
    when resuming). Returns its :class:`Tracker`, disabled when ``mlflow.enabled`` is false or MLflow failed (one
    warning); never raises for MLflow's sake."""
    mcfg = mlflow_config(cfg.mlflow)
    root = store_dir(cfg)
    job = current_job()
    if mcfg.enabled and mcfg.parent_run_id is None and resume_run_id is None:
        mcfg.parent_run_id = parent_run_for_sweep(mcfg, root)
    tracker = Tracker(mcfg, default_dir=root)
    tracker.start(params=flatten_dict(plain_config(cfg)), tags=training_tags(save_dir, job),
                  resume_run_id=resume_run_id, run_name=run_name_for_training(cfg, save_dir, job))
    return tracker
