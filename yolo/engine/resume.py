"""Resuming a training run from its ``last.pt``: what a checkpoint may decide, and what it never decides.

A checkpoint is data from a file that anyone could have written. On resume:

* **training settings** (epochs, hyps, model, optimizer, batch size, image size...) come from the checkpoint's
  stored config, as upstream does, re-validated by the schema; a stored value holding an interpolation
  (``${...}``) is refused, never resolved;
* **places** (``data``, ``datasets_dir``, ``project``, ``name``, ``mlflow``, ``weights``) always come from the
  resuming command and the current config, never from the checkpoint;
* a setting given on the resuming command is honoured where that is sound (:data:`HONOURED_KEYS`: more
  ``epochs``, ``workers``, ``device``...) or refused in one line when it would change the training;
* a finished run (stripped ``last.pt``) is never trained again; a run whose epochs are all done but whose end
  (strip, final validation) was interrupted is finished without training;
* the run continues in its own folder only when ``last.pt`` sits in ``<run>/weights/`` of the run that wrote it
  (its ``run.json`` names the checkpoint's run id); otherwise the resume starts a new run folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from yolo.checkpoint import Checkpoint, load_checkpoint
from yolo.config import TrainConfig, check_train_config
from yolo.engine import run_dir
from yolo.errors import CheckpointError, ConfigError, UserError
from yolo.models.yolo import to_plain
from yolo.utils.files import remove_stale_temps

log = logging.getLogger("yolo")

PLACE_KEYS = frozenset({"data", "datasets_dir", "project", "name", "mlflow", "weights", "resume", "exist_ok"})
# this command's only, never the checkpoint's: where this leg of the schedule stops (none: at its end)
LEG_KEYS = frozenset({"stop_epoch"})
HONOURED_KEYS = frozenset({"epochs", "workers", "device", "cache", "noplots", "save_period", "patience"})
_FALSE = (None, False, 0, "", "false", "False", "no", "0")
_TRUE = ("true", "True", "1", "yes")


class ResumeError(UserError):
    """A resume that cannot go ahead as asked (finished run, changed setting...)."""


@dataclass
class ResumePlan:
    cfg: DictConfig  # the run's training settings, with places from the resuming command
    ckpt: Checkpoint
    path: Path
    start_epoch: int
    run_dir: Path | None  # the run's own folder, or None: resume into a new run folder
    run_id: str | None
    mlflow_run_id: str | None

    @property
    def has_epochs_left(self) -> bool:
        return self.start_epoch < self.cfg.epochs


def requested(resume: Any) -> bool:
    return resume not in _FALSE


def find_checkpoint(resume: Any, project: str) -> Path:
    """``resume=true`` → the newest ``last.pt`` under ``project``; ``resume=path`` → that file."""
    if isinstance(resume, str) and resume not in _TRUE:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"resume={resume}: no such checkpoint")
        return path
    candidates = sorted(Path(project).glob("**/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"resume=true: no last.pt found under {project}/")
    return candidates[-1]


_loaded: dict[tuple, Checkpoint] = {}  # the Hydra callback and the trainer of one process read the file once


def load(path: Path) -> Checkpoint:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_checkpoint(path)
    return _loaded[key]


def run_folder_of(path: Path, ckpt: Checkpoint) -> Path | None:
    """The run folder ``path`` belongs to: ``<run>/weights/last.pt`` whose ``<run>/run.json`` names the run id
    stored in the checkpoint; None for a checkpoint kept anywhere else."""
    run_id = run_dir.valid_run_id(ckpt.extra.get("run_id"))
    folder = path.resolve().parent.parent
    if run_id is None or path.resolve().parent.name != "weights" or run_dir.read_run_id(folder) != run_id:
        return None
    return folder


def command_keys() -> list[str] | None:
    """The keys set on the command line of the current Hydra job (``hyp.lr0`` for ``hyp.lr0=0.1``), or None
    outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig  # deferred: only meaningful inside a Hydra app

        if not HydraConfig.initialized():
            return None
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:
        return None
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def _interpolation_key(value: Any, key: str = "") -> str | None:
    if isinstance(value, str):
        return key or "<root>" if "${" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _interpolation_key(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _stored_training(path: Path, ckpt: Checkpoint) -> DictConfig:
    stored = ckpt.config
    if not isinstance(stored, dict) or not stored:
        raise CheckpointError(f"{path}: checkpoint holds no training config, cannot resume")
    bad = _interpolation_key(stored)
    if bad:
        raise CheckpointError(f"{path}: stored config value '{bad}' holds an interpolation; refusing to resume from it")
    training = {k: v for k, v in stored.items() if k not in PLACE_KEYS}
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), training)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: stored training config is not valid: {msg}") from None


def _apply_command(merged: DictConfig, cfg: DictConfig, given: Iterable[str] | None, path: Path) -> None:
    """Places from the current config; command settings honoured where sound, else refused."""
    for key in PLACE_KEYS | LEG_KEYS:
        if key in cfg:
            merged[key] = cfg[key]
    if given is None:  # a library call: no command line to read; honour what differs from the defaults
        defaults = OmegaConf.structured(TrainConfig)
        given = [k for k in HONOURED_KEYS if k in cfg and cfg[k] != defaults[k]]
    for key in given:
        top = key.split(".")[0]
        if top in PLACE_KEYS or top in LEG_KEYS or top == "hydra" or top not in cfg:
            continue
        if top in HONOURED_KEYS:
            merged[top] = cfg[top]
            continue
        now, then = to_plain(OmegaConf.select(cfg, key)), to_plain(OmegaConf.select(merged, key))
        if now != then:
            shown = now if not isinstance(now, (dict, list)) else "<changed>"
            raise ResumeError(f"resume: {key}={shown} differs from the run's setting; a resumed run keeps its "
                              f"training settings (to change them, start a new run from it: weights={path})")


def plan(cfg: DictConfig, given: Iterable[str] | None = None) -> ResumePlan | None:
    """What a ``resume=`` request means for ``cfg`` (None when no resume is asked)."""
    if not requested(cfg.resume):
        return None
    path = find_checkpoint(cfg.resume, cfg.project)
    ckpt = load(path)
    merged = _stored_training(path, ckpt)
    given = list(given) if given is not None else None
    _apply_command(merged, cfg, given, path)
    merged.resume = str(path)
    try:  # the stored settings pass the same checks as a command's
        check_train_config(merged)
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored setting refused: {e}") from None
    folder = run_folder_of(path, ckpt)
    if folder is not None:  # what a save killed half-way left behind, even when there is nothing to train
        for sub in (folder, folder / "weights"):
            remove_stale_temps(sub)
    if ckpt.epoch < 0 or ckpt.optimizer is None:
        raise ResumeError(f"resume: {path} is a finished run (stripped after its last epoch); nothing to resume. "
                          f"To train further, start a new run from it: weights={path} epochs=N")
    start = int(ckpt.epoch) + 1
    if merged.epochs < start:
        raise ResumeError(f"resume: epochs={merged.epochs} but {path} has already trained {start} epochs")
    mlflow_id = ckpt.extra.get("mlflow_run_id")
    mlflow_id = mlflow_id if isinstance(mlflow_id, str) and mlflow_id.isalnum() and len(mlflow_id) <= 64 else None
    return ResumePlan(cfg=merged, ckpt=ckpt, path=path, start_epoch=start, run_dir=folder,
                      run_id=run_dir.valid_run_id(ckpt.extra.get("run_id")) if folder else None,
                      mlflow_run_id=mlflow_id if folder else None)


def last_step(stored: Any, done: int) -> int:
    """The global batch index of the last optimizer step a checkpoint recorded, if sound (an int before the
    ``done`` batches it trained); else -1, upstream's start (the first batch then steps)."""
    if isinstance(stored, int) and not isinstance(stored, bool) and -1 <= stored < done:
        return stored
    return -1


def check_data_matches(p: ResumePlan, nc: int, names: list[str]) -> None:
    """The resuming command's dataset must be the run's (same classes): a checkpoint never chooses data paths."""
    then_names = [str(n) for n in (p.ckpt.names or [])]
    if p.ckpt.nc == nc and (not then_names or then_names == [str(n) for n in names]):
        return
    hint = ""
    stored = p.ckpt.config.get("data") if isinstance(p.ckpt.config, dict) else None
    if isinstance(stored, dict) and isinstance(stored.get("file"), str):
        hint = f" (the run used data={_printable(stored['file'])})"
    raise ResumeError(f"resume: the run trained on {p.ckpt.nc} classes but this command's data has {nc}; pass the "
                      f"run's dataset on the resuming command{hint}: a checkpoint never chooses data paths")


def _printable(text: str, limit: int = 200) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def hydra_dirs(config: DictConfig) -> tuple[str, str | None]:
    """``(hydra.run.dir, output_subdir or None to keep)`` for a training job about to start under Hydra.

    A resume of a checkpoint in its run's folder continues there (Hydra's files of the resume go to
    ``.hydra/resume``); a folder given with ``hydra.run.dir=`` is kept as given (the trainer checks it is free);
    the default, time-stamped folder is claimed atomically, so jobs started in the same instant never share one.
    """
    if requested(config.get("resume")):
        try:
            path = find_checkpoint(config.resume, config.project)
            folder = run_folder_of(path, load(path))
        except (UserError, OSError):
            folder = None  # the trainer reports what is wrong with it
        if folder is not None:
            return str(folder), ".hydra/resume"
    chosen = str(OmegaConf.select(config, "hydra.run.dir"))
    overrides = OmegaConf.select(config, "hydra.overrides.hydra") or []
    if any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides):
        run_dir.check_free(chosen, exist_ok=bool(config.get("exist_ok")))  # before Hydra writes .hydra/ there
        return chosen, None
    return os.fspath(run_dir.claim_fresh(chosen)), None
