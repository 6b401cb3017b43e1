"""A stand-in for ``yolo.train.train`` that costs nothing (tests only: ``evolve.train_fn=fake_train:fake_train``).

``fake_train(cfg, callbacks=(), save_dir=None)`` scores the hyps with a smooth deterministic function (a peak at
:data:`TARGET`), calls ``on_epoch_end`` every epoch like the trainer (fitness growing with the epoch; with
``noval`` only the final epoch is validated), honours ``StopTraining`` from a callback, and, when
``cfg.mlflow.enabled``, records a child run through :class:`yolo.tracking.Tracker` as the trainer would.

Behaviour for process-level tests, from the environment:

- ``YOLO_FAKE_TRAIN_SLEEP``: seconds to sleep per call;
- ``YOLO_FAKE_TRAIN_MARKERS``: a folder where each call first writes a file named after its run (``cfg.name``);
- ``YOLO_FAKE_TRAIN_HANG_AT``: with markers, the call that finds exactly that many markers before its own sleeps
  for an hour (a worker to kill mid-generation; its retry, finding more markers, does not hang).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

import evolve.config  # noqa: F401  (registers the schema)
from yolo.config import MlflowConfig
from yolo.engine.callbacks import CallbackList, StopTraining
from yolo.engine.trainer import TrainResults
from yolo.tracking import Tracker

TARGET = {"lr0": 0.02, "momentum": 0.9, "box": 0.08, "cls": 0.8, "obj": 1.5, "hsv_s": 0.5, "scale": 0.3,
          "mosaic": 0.8, "translate": 0.2, "weight_decay": 0.0006}
SCALE = {"lr0": 0.1, "momentum": 0.38, "box": 0.18, "cls": 3.8, "obj": 3.8, "hsv_s": 0.9, "scale": 0.9,
         "mosaic": 1.0, "translate": 0.9, "weight_decay": 0.001}


def score(hyp: dict[str, Any]) -> float:
    """mAP50-95 of a hyp set: 0.6 at :data:`TARGET`, smoothly lower away from it."""
    d = sum(((float(hyp.get(k, v)) - v) / SCALE[k]) ** 2 for k, v in TARGET.items())
    return 0.6 * math.exp(-4.0 * d)


def fake_train(cfg, callbacks=(), save_dir=None) -> TrainResults:


    markers = os.environ.get("YOLO_FAKE_TRAIN_MARKERS")
    if markers:
        folder = Path(markers)
        folder.mkdir(parents=True, exist_ok=True)
        earlier = sum(not p.name.startswith(".") for p in folder.iterdir())
        (folder / str(cfg.name)).write_text(str(os.getpid()))
        hang_at = os.environ.get("YOLO_FAKE_TRAIN_HANG_AT")
        if hang_at is not None and earlier == int(hang_at) and _claim(folder / ".hang"):
            (folder / ".hanging").write_text(f"{os.getpid()} {cfg.name}")
            time.sleep(3600)
    time.sleep(float(os.environ.get("YOLO_FAKE_TRAIN_SLEEP", "0") or 0))

    hyp = OmegaConf.to_container(cfg.hyp, resolve=True)
    epochs = max(1, int(cfg.epochs))
    start, trained = 0, 0
    if cfg.get("resume"):  # a fake checkpoint: {"epoch": last epoch done, "hyp": ..., "trained": epochs run}
        ckpt = json.loads(Path(cfg.resume).read_text())
        start, hyp, trained = int(ckpt["epoch"]) + 1, ckpt["hyp"], int(ckpt["trained"])
    final = score(hyp)
    end = min(epochs, int(cfg.get("stop_epoch") or epochs))
    res = TrainResults(save_dir=str(save_dir or ""))
    tracker = _child_run(cfg, hyp)
    cbs = CallbackList(callbacks)
    try:
        for epoch in range(start, end):
            trained += 1
            last = epoch == end - 1
            m = final * (epoch + 1) / epochs if (last or not cfg.noval) else 0.0
            res.map, res.map50 = m, min(1.0, 1.6 * m)
            res.precision, res.recall = min(1.0, 0.5 + m / 2), min(1.0, 0.3 + m)
            res.val_losses = (0.05 - 0.02 * m, 0.03 - 0.01 * m, 0.02 - 0.01 * m)
            res.fitness = 0.1 * res.map50 + 0.9 * res.map
            res.best_fitness = max(res.best_fitness, res.fitness)
            metrics = {"metrics/precision": res.precision, "metrics/recall": res.recall,
                       "metrics/mAP_0.5": res.map50, "metrics/mAP_0.5:0.95": res.map, "fitness": res.fitness}
            res.history.append({"epoch": epoch, **metrics})
            res.epochs_completed = epoch + 1
            if tracker is not None:
                tracker.log_metrics(metrics, step=epoch)
            cbs.fire("on_fit_epoch_end", SimpleNamespace(epoch=epoch, metrics=metrics))
            if last and save_dir:  # like the trainer with nosave: last.pt at the final epoch of the leg
                w = Path(save_dir) / "weights"
                w.mkdir(parents=True, exist_ok=True)
                (w / "last.pt").write_text(json.dumps({"epoch": epoch, "hyp": hyp, "trained": trained}))
    except StopTraining as e:
        res.stopped_early, res.pruned = True, e.pruned
    res.paused = end < epochs and res.epochs_completed == end
    _record_trained(cfg, trained)
    if tracker is not None:
        res.mlflow_run_id = tracker.run_id
        tracker.end("KILLED" if res.pruned else "FINISHED")
    return res


def _record_trained(cfg, trained: int) -> None:
    """``YOLO_FAKE_TRAIN_LOG``: append ``name epochs-trained-since-scratch`` per call (tests add up epochs)."""
    log = os.environ.get("YOLO_FAKE_TRAIN_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{cfg.name} {trained} {cfg.get('stop_epoch')} {bool(cfg.get('resume'))}\n")


def _claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def compose(overrides: list[str] = ()):
    """The composed ``conf/evolve.yaml`` with Hydra overrides, outside a Hydra app (tests, notebooks)."""


    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="evolve", overrides=list(overrides))


def _child_run(cfg, hyp):
    if not cfg.mlflow.enabled:
        return None


    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(cfg.mlflow, resolve=True)),
                      default_dir=Path(cfg.project).resolve())
    tracker.start(params={"hyp": hyp, "epochs": cfg.epochs}, tags={"yolo.fake_train": "1"})
    return tracker
