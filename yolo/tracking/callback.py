"""MLflow as a trainer callback: one MLflow run per training, params at the start, metrics every epoch,
artifacts, the model (``best.pt`` as a pyfunc model, :mod:`yolo.tracking.pyfunc`, optionally registered) and the
final status at the end, then the command that opens the MLflow UI on the store used. Tracking never stops a run:
any MLflow failure is one warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from yolo.tracking.training import start_training_run
from yolo.utils.redact import redact_text

log = logging.getLogger("yolo")

ARTIFACTS = ("config.yaml", "hyp.yaml", "results.csv", "results.png", "labels.jpg", "confusion_matrix.png",
             "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png")
# the run's log file (Hydra's <job>.log, as far as it is written by then) and the batch mosaics
ARTIFACT_GLOBS = ("*.log", "train_batch*.jpg", "val_batch*_labels.jpg", "val_batch*_pred.jpg")
END_STATUS = {"FINISHED": "FINISHED", "STOPPED": "FINISHED", "KILLED": "KILLED", "FAILED": "FAILED"}


class MlflowCallback:
    """Attached by :func:`yolo.train.train` when ``mlflow.enabled``; fired on rank 0 only."""

    def __init__(self) -> None:
        self.tracker = None

    def _call(self, what: str, *args, **kwargs) -> Any:
        if self.tracker is None:
            return None
        try:
            return getattr(self.tracker, what)(*args, **kwargs)
        except Exception as e:  # tracking must never kill a run
            log.warning(redact_text(f"WARNING: MLflow {what} failed: {e}"))
            return None

    def on_train_start(self, trainer: Any) -> None:
        plan = trainer.resume_plan
        try:
            self.tracker = start_training_run(trainer.cfg, trainer.save_dir, plan.mlflow_run_id if plan else None)
        except Exception as e:
            log.warning(redact_text(f"WARNING: MLflow tracking disabled: {e}"))
            self.tracker = None
        run_id = getattr(self.tracker, "run_id", None) if self.tracker is not None else None
        trainer.results.mlflow_run_id = run_id
        trainer.ckpt_extra["mlflow_run_id"] = run_id  # a resume continues this run
        if plan is not None:
            self._backfill(trainer)
        p = trainer.precision
        # the epochs this run trains of its schedule (a resumed or paused leg, e.g. an asha rung: what budget it got)
        self._call("log_params", {"amp_chosen": p.mode, "amp_reason": p.reason, "epochs_from": trainer.start_epoch,
                                  "epochs_to": trainer.end_epoch_index})

    def _backfill(self, trainer: Any) -> None:
        """A resumed run: the epochs in results.csv that never reached MLflow (killed between the checkpoint and
        the epoch's metrics) are logged now, at their own steps."""
        run_id = getattr(self.tracker, "run_id", None)
        if run_id is None:
            return
        logged = self._call("metric_steps", "metrics/mAP_0.5") or set()
        for row in trainer.recorded_epochs():
            epoch = int(row.get("epoch", -1))
            if 0 <= epoch < trainer.start_epoch and epoch not in logged:
                self._call("log_metrics", {k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        self._call("log_metrics", trainer.metrics, step=trainer.epoch)

    def on_train_end(self, trainer: Any) -> None:
        if self.tracker is None:
            return
        if trainer.status == "FINISHED":
            self._log_artifacts(Path(trainer.save_dir), trainer.best if trainer.cfg.mlflow.log_weights else None)
            self._log_model(trainer)
        self._call("end", status=END_STATUS.get(trainer.status, "FAILED"))
        trainer.results.mlflow_run_id = getattr(self.tracker, "run_id", None)
        if trainer.results.mlflow_run_id:
            log.info(ui_hint(self.tracker.safe_uri))

    def _log_model(self, trainer: Any) -> None:
        mcfg = trainer.cfg.mlflow
        if not (mcfg.log_model or mcfg.register_model) or not Path(trainer.best).exists():
            return
        version = self._call("log_model", trainer.best, trainer.imgsz, mcfg.register_model or None)
        if mcfg.register_model and version is not None and hasattr(version, "version"):
            log.info(f"MLflow: registered model {version.name} version {version.version}")

    def _log_artifacts(self, save_dir: Path, best: Path | None) -> None:
        for name in ARTIFACTS:
            if (save_dir / name).exists():
                self._call("log_artifact", save_dir / name)
        for pattern in ARTIFACT_GLOBS:
            for path in sorted(save_dir.glob(pattern)):
                self._call("log_artifact", path)
        if (save_dir / ".hydra").is_dir():
            self._call("log_artifacts", save_dir / ".hydra", artifact_path="hydra")
        if best is not None and Path(best).exists():
            self._call("log_artifact", best, artifact_path="weights")


def ui_hint(uri: str) -> str:
    """The line that says how to look at the run: the ``mlflow ui`` command for a local store, the server's
    address for a remote one."""
    if uri.startswith(("http://", "https://", "databricks")):
        return f"MLflow: open {uri} to view the run"
    return f"MLflow: view the runs with  mlflow ui --backend-store-uri {uri}"
