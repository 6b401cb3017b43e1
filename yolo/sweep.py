"""Group a Hydra multirun's training runs under one MLflow parent run.

Each job of ``python run_train.py -m ...`` (possibly in different processes, e.g. with the joblib launcher)
looks up or creates the RUNNING parent tagged with the sweep folder; creation is serialised by a file lock, so
there is exactly one parent per sweep.  :class:`MlflowSweepCallback` (a Hydra callback, registered in
``conf/train.yaml``) marks the parent finished when the sweep ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("yolo")


def sweep_dir() -> str | None:
    """The multirun's sweep folder (absolute), or None when this is not a multirun job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return str(Path(hc.sweep.dir).resolve())
    except Exception:
        return None


def _tracker(mlflow_cfg: Any, default_dir: Path):
    from omegaconf import OmegaConf

    from yolo.tracking import Tracker, TrackingConfig

    fields = OmegaConf.to_container(mlflow_cfg, resolve=True) if not isinstance(mlflow_cfg, dict) else dict(mlflow_cfg)
    return Tracker(TrackingConfig(**fields), default_dir=default_dir)


def parent_run_for_sweep(mlflow_cfg: Any, default_dir: Path) -> str | None:
    """Id of this sweep's parent run (created on first use), or None outside a multirun."""
    key = sweep_dir()
    if key is None:
        return None
    tracker = _tracker(mlflow_cfg, default_dir)
    return tracker.get_or_create_parent(None, name=f"sweep {Path(key).name}", key_tag=key,
                                        tags={"hydra.sweep_dir": key})


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except Exception:  # pragma: no cover - hydra always provides it in supported versions
    _HydraCallback = object


class MlflowSweepCallback(_HydraCallback):
    """Finishes the sweep's MLflow parent run when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            if not config.mlflow.enabled:
                return
            from yolo.engine.trainer import project_root

            key = str(Path(config.hydra.sweep.dir).resolve())
            tracker = _tracker(config.mlflow, project_root(config))
            run_id = tracker.get_or_create_parent(None, name=f"sweep {Path(key).name}", key_tag=key)
            if run_id:
                tracker.finish_parent(run_id)
        except Exception as e:  # tracking never fails a sweep
            log.warning(f"WARNING: could not finish the sweep's MLflow parent run: {e}")
