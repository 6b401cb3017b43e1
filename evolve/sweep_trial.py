"""Inside a job of the evolve sweeper: the trainer callback that ties the training to its trial of the study.

The sweeper (:mod:`evolve.sweeper`) launches each trial as a Hydra job, in its own process or not, numbered by
the trial (``hydra.job.num``), and tells the trainings of its jobs where the study is through the environment
(``$YOLO_EVOLVE_SWEEP``, a small JSON object) and :data:`yolo.engine.callbacks.CALLBACKS_ENV`. The callback
records the run folder as soon as it is open (a later promotion continues its checkpoint), reports each epoch's
fitness to the pruner when the sweep prunes (and stops a hopeless run), and records what the run achieved at its
end (:data:`RESULT_ATTR`), which the sweeper reads back for evolve.csv when the job returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from evolve import fidelity, recovery, samplers
from evolve import optuna_internals as oi
from evolve.settings import Setup, make_pruner
from evolve.space import HYP_KEYS
from evolve.storages import open_storage
from yolo.engine.callbacks import StopTraining

log = logging.getLogger("yolo.evolve")

SWEEP_ENV = "YOLO_EVOLVE_SWEEP"
FACTORY = "evolve.sweep_trial:trial_callback"  # the value of $YOLO_TRAIN_CALLBACKS for the sweep's jobs
RESULT_ATTR = "job_result"  # user attr: what the job's training achieved (the fields of TrainResults below)
RESULT_FIELDS = ("precision", "recall", "map50", "map", "val_losses", "fitness", "epochs_completed", "pruned",
                 "mlflow_run_id", "save_dir")


@dataclass(frozen=True)
class SweepSpec:
    """Where a sweep's study is and how it prunes: what its jobs need to find their trial."""

    out_dir: str
    storage: str | None
    study_name: str
    pruner: str = "none"
    pruner_startup: int = 5
    pruner_warmup_epochs: int = 0
    epochs: int = 1
    heartbeat_s: int = 60
    heartbeat_grace_s: int | None = None
    max_retries: int = 1
    owner: dict | None = None  # the sweep's process (evolve.recovery.owner_info): a job outlives it never

    @classmethod
    def of(cls, setup: Setup) -> SweepSpec:
        """The description of the evolution ``setup`` runs, owned by this process."""
        ev = setup.settings
        return cls(out_dir=str(setup.out_dir), storage=ev.storage, study_name=setup.study_name,
                   pruner=setup.pruner_name, pruner_startup=int(ev.pruner_startup),
                   pruner_warmup_epochs=int(ev.pruner_warmup_epochs), epochs=int(setup.cfg.epochs),
                   heartbeat_s=int(ev.heartbeat_s), heartbeat_grace_s=ev.heartbeat_grace_s,
                   max_retries=int(ev.max_retries), owner=recovery.owner_info())

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> SweepSpec | None:
        text = os.environ.get(SWEEP_ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError) as e:
            raise ValueError(f"${SWEEP_ENV}: not a sweep description ({e})") from None


def job_number() -> int | None:
    """This Hydra job's number (the trial's), or None outside a multirun job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        num = HydraConfig.get().job.get("num")
    except Exception:  # noqa: BLE001 - not inside a Hydra job
        return None
    return int(num) if num is not None else None


def trial_callback(cfg: Any) -> TrialCallback | None:
    """The factory named in ``$YOLO_TRAIN_CALLBACKS``: a callback for this job's trial, None outside a sweep."""
    spec, number = SweepSpec.from_env(), job_number()
    if spec is None or number is None:
        return None
    return TrialCallback(spec, number)


def trained_hyp(hyp: Any) -> dict[str, float]:
    """A training config's hyps that are numbers, in the evolution's key order."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(hyp, resolve=True) if OmegaConf.is_config(hyp) else dict(hyp or {})
    return {k: float(data[k]) for k in HYP_KEYS if isinstance(data.get(k), (int, float))
            and not isinstance(data[k], bool) and math.isfinite(data[k])}


def watch_owner(owner: dict | None, number: int, poll_s: float = 1.0) -> None:
    """End this job's process when the sweep that launched it is gone (SIGKILLed): a job in another process (a
    joblib or submitit worker) would otherwise train on, orphaned, beside the retry of its trial that the sweep
    run again starts. Only where the sweep's process can be seen (same machine), never the sweep's own."""
    if not owner or owner.get("pid") == os.getpid() or recovery.owner_alive(owner) is not True:
        return
    recovery.exit_when(lambda: recovery.owner_alive(owner) is False,
                       lambda: f"WARNING: evolve sweep: the sweep (process {owner.get('pid')}) is gone; job "
                               f"{number} (process {os.getpid()}) exits", poll_s, name="evolve-sweep-watch")


class TrialCallback:
    """Connects a training to its trial: run folder, per-epoch reports to the pruner, the final result."""

    def __init__(self, spec: SweepSpec, number: int):
        self.spec, self.number = spec, number
        self.study: optuna.Study | None = None
        self.trial: optuna.Trial | None = None

    def _connect(self) -> None:
        s = self.spec
        storage = open_storage(s.storage, s.out_dir, heartbeat_s=s.heartbeat_s, grace_s=s.heartbeat_grace_s,
                               max_retries=s.max_retries)
        study = optuna.load_study(study_name=s.study_name, storage=storage,
                                  pruner=make_pruner(s.pruner, s.pruner_startup, s.pruner_warmup_epochs, s.epochs))
        trial_id = storage.get_trial_id_from_study_id_trial_number(oi.study_id(study), self.number)
        if storage.get_trial(trial_id).state != TrialState.RUNNING:
            raise RuntimeError(f"trial {self.number} of study '{s.study_name}' is not running")
        self.study, self.trial = study, optuna.Trial(study, trial_id)

    def on_train_start(self, trainer: Any) -> None:
        watch_owner(self.spec.owner, self.number)
        try:
            self._connect()
            oi.set_user_attr(self.study, self.trial, fidelity.SAVE_DIR_ATTR, str(trainer.save_dir))
            # the hyps this job really trains with (a swept hyp= group, or a resumed checkpoint's): evolve.csv's row
            oi.set_user_attr(self.study, self.trial, samplers.FULL_HYP_ATTR, trained_hyp(trainer.cfg.hyp))
        except Exception as e:  # noqa: BLE001 - the training goes on; its return value still reaches the sweeper
            log.warning(f"WARNING: evolve sweep: job {self.number} cannot reach its trial ({type(e).__name__}: {e}): "
                        f"no pruning, and evolve.csv gets only its fitness")
            self.study = self.trial = None

    def on_fit_epoch_end(self, trainer: Any) -> None:
        if self.trial is None or self.spec.pruner == "none":
            return
        value = trainer.metrics.get("fitness")
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), step=int(trainer.epoch))
        if self.trial.should_prune():
            raise StopTraining(f"pruned after epoch {trainer.epoch} (fitness {float(value):.5g})", pruned=True)

    def on_train_end(self, trainer: Any) -> None:
        res = getattr(trainer, "results", None)
        if self.trial is None or res is None:
            return
        result = {k: getattr(res, k, None) for k in RESULT_FIELDS}
        result["val_losses"] = [float(x) for x in (result["val_losses"] or ())][:3]
        oi.set_user_attr(self.study, self.trial, RESULT_ATTR, json.loads(json.dumps(result, default=str)))
