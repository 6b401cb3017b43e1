"""An evolution's settings, derived once per process from its config: search space, strategy, sampler, pruner,
storage and lock, this worker's device, and each generation's training config."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from evolve import fidelity, mutation, samplers
from evolve.beats import JournalBeats
from evolve.config import EvolveConfig
from evolve.locations import describe_storage
from evolve.locks import evolution_lock
from evolve.space import HYP_KEYS, SearchSpace, build_space, csv_columns
from evolve.storages import open_storage
from yolo.config import MlflowConfig, TrainConfig
from yolo.train import train
from yolo.errors import ConfigError
from yolo.tracking import resolve_tracking_uri
from yolo.tracking.names import generation_run_name
from yolo.utils.redact import redact_url

log = logging.getLogger("yolo.evolve")

CONFIG_ATTR = "evolve:config"  # study user attr: the settings the study was created with
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr
PRUNERS = ("none", "median", "hyperband")


class Setup:
    """Everything a process needs, derived once from the config."""

    def __init__(self, cfg: Any, worker: int = 0, announce: bool = False,
                 space: tuple[SearchSpace, dict[str, Any]] | None = None):
        """``space``: (search space, base values) chosen by the caller (a Hydra sweep's own parameters) instead
        of ``evolve.space``'s table."""
        if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is not EvolveConfig:
            cfg = OmegaConf.merge(OmegaConf.structured(EvolveConfig), cfg)
        self.cfg = cfg
        ev = cfg.evolve
        self.settings = ev
        self.worker = worker
        self.out_dir = Path(ev.out_dir or f"{cfg.project}/{cfg.name}").resolve()
        self.generations = int(cfg.generations)
        self.strategy = samplers.canonical_strategy(ev.strategy)
        self.pruner_name = str(ev.pruner or "none").lower()
        if self.pruner_name not in PRUNERS:
            raise ConfigError(f"evolve.pruner: must be one of {PRUNERS}, got {ev.pruner!r}")
        self.pruning = self.pruner_name != "none"
        self.fidelity = str(ev.fidelity or "full").lower()
        if self.fidelity not in fidelity.FIDELITIES:
            raise ConfigError(f"evolve.fidelity: must be one of {', '.join(fidelity.FIDELITIES)}, got {ev.fidelity!r}")
        self.rungs = (fidelity.Rungs.make(int(cfg.epochs), int(ev.min_epochs), int(ev.eta))
                      if self.fidelity == "asha" else None)
        self.extra_columns = fidelity.EXTRA_COLUMNS if self.rungs is not None else ()
        if ev.parent not in mutation.PARENT_METHODS:
            raise ConfigError(f"evolve.parent: must be one of {mutation.PARENT_METHODS}, got {ev.parent!r}")
        if int(cfg.generations) < 0 or int(ev.workers) < 1:
            raise ConfigError(f"generations, evolve.workers: must be >= 0 and >= 1, got {cfg.generations}, {ev.workers}")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else None
        hyp = OmegaConf.to_container(cfg.hyp, resolve=True)
        self.space, self.base = space or build_space(
            OmegaConf.to_container(ev.space, resolve=True) if ev.space else {}, hyp, weights=cfg.weights,
            noautoanchor=cfg.noautoanchor, search_anchors=ev.search_anchors, model_cfg=model_cfg)
        if not self.space.bounds and not self.space.extra:
            raise ConfigError("evolve.space is empty: nothing to search (is conf/evolve_space/default.yaml composed?)")
        self.columns = csv_columns(self.base)
        self.storage_kind, self.storage_where = describe_storage(ev.storage, self.out_dir)
        self.study_name = str(ev.study_name)
        self.lock = evolution_lock(self.out_dir, ev.storage, self.study_name)  # all machines, for an RDB
        self.beats = (JournalBeats(self.storage_where, ev.heartbeat_s, ev.heartbeat_grace_s)
                      if self.storage_kind == "journal" else None)
        devices = [str(d) for d in (ev.devices or [])]
        self.device = devices[worker % len(devices)] if devices else str(cfg.device)
        full = OmegaConf.to_container(cfg, resolve=True)
        full.pop("generations", None)
        full.pop("evolve", None)
        self.train_container = full
        self.tracking_uri, self.mlflow_root = tracking_location(cfg)
        if announce:
            self._announce()

    def _announce(self) -> None:
        sp = self.space
        where = f"{self.storage_kind}:{redact(self.storage_where)}"
        log.info(f"evolve: {self.generations} generations, strategy {self.strategy}"
                 + (f" (parent {self.settings.parent})" if self.strategy == "mutation" else "")
                 + f", seed {self.settings.seed}, pruner {self.pruner_name}, {max(1, self.settings.workers)} worker(s)")
        if self.rungs is not None:
            log.info(f"evolve: fidelity asha: rungs of {', '.join(map(str, self.rungs.budgets))} epochs, the top "
                     f"1/{self.rungs.eta} of each promoted (every rung is one generation)")
        log.info(f"evolve: searching {len(sp.keys)} hyperparameters ({len(sp.tuned_keys)} with gain > 0)"
                 + (f" and {', '.join(sp.extra)}" if sp.extra else "")
                 + (f"; not searched: {', '.join(sp.excluded)}" if sp.excluded else ""))
        cats = [k for k, d in sp.extra.items() if isinstance(d, optuna.distributions.CategoricalDistribution)]
        if cats and self.strategy == "cmaes":
            log.info(f"evolve: {self.strategy} models numbers only: {', '.join(cats)} drawn at random (strategy "
                     f"tpe or auto models choices)")
        log.info(f"evolve: results in {self.out_dir}, storage {where}, study '{self.study_name}'")

    # ---- study -------------------------------------------------------------------------------------------------
    def storage(self) -> optuna.storages.BaseStorage:
        return open_storage(self.settings.storage, self.out_dir, heartbeat_s=self.settings.heartbeat_s,
                            grace_s=self.settings.heartbeat_grace_s, max_retries=self.settings.max_retries)

    def sampler(self) -> optuna.samplers.BaseSampler:
        kw = OmegaConf.to_container(self.settings.sampler_kwargs, resolve=True)
        if self.strategy == "auto":
            kw.setdefault("switch", int(self.settings.auto_switch))
        inner = samplers.make_sampler(self.strategy, self.space, self.base, seed=self.settings.seed,
                                      parent=self.settings.parent, worker=self.worker, kwargs=kw)
        return fidelity.FirstRungSampler(inner) if self.rungs is not None else inner

    def pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.pruner_name, self.settings.pruner_startup, self.settings.pruner_warmup_epochs,
                           self.cfg.epochs)

    def open_study(self) -> optuna.Study:
        return optuna.create_study(study_name=self.study_name, storage=self.storage(), sampler=self.sampler(),
                                   pruner=self.pruner(), direction="maximize", load_if_exists=True)

    def fingerprint(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "fidelity": self.fidelity,
                "rungs": list(self.rungs.budgets) if self.rungs else None,
                "seed": int(self.settings.seed), "parent": str(self.settings.parent),
                "space": self.space.describe(), "base": self.base, "columns": self.columns}

    # ---- a generation's training config ------------------------------------------------------------------------
    def train_cfg(self, hyp: Mapping[str, Any], number: int, parent_run_id: str | None) -> DictConfig:
        c = OmegaConf.create(self.train_container)
        c.hyp = {k: hyp.get(k) for k in HYP_KEYS}
        c.noval = not self.pruning
        c.nosave = True
        c.noplots = True
        c.resume = False
        c.device = self.device
        c.project = str(self.out_dir / "generations")
        c.name = f"trial{number:04d}"
        c.mlflow.tracking_uri = self.tracking_uri
        c.mlflow.parent_run_id = parent_run_id
        c.mlflow.run_name = generation_run_name(self.cfg.name, number)
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), c)


def make_pruner(name: str, startup: int, warmup_epochs: int, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner ``evolve.pruner`` names (``none``: Optuna's NopPruner)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(startup), n_warmup_steps=int(warmup_epochs))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(epochs)))
    return optuna.pruners.NopPruner()


def tracking_location(cfg: DictConfig) -> tuple[str | None, Path]:
    """The MLflow tracking URI every process of this evolution uses (the training default: ``runs/mlflow.db``)."""
    root = Path(cfg.project).resolve()
    root = root.parent if root.name in ("train", "evolve") else root
    try:
        return resolve_tracking_uri(MlflowConfig(tracking_uri=cfg.mlflow.tracking_uri), root), root
    except Exception:  # tracking unavailable: leave the choice to the trainer
        return cfg.mlflow.tracking_uri, root


def redact(where: str) -> str:
    """A storage location fit to show: a database URL without its password."""
    try:
        return redact_url(where)
    except Exception:  # a location that is no URL is shown as it is
        return where


def resolve_train_fn(train_fn: Callable | str | None) -> Callable:
    """The function that trains a generation: given, named ``module:function``, or the trainer's ``train``."""
    if callable(train_fn):
        return train_fn
    if isinstance(train_fn, str) and train_fn:
        module, _, name = train_fn.partition(":")
        if not name:
            raise ConfigError(f"evolve.train_fn: must look like 'package.module:function', got {train_fn!r}")
        return getattr(importlib.import_module(module), name)
    return train
