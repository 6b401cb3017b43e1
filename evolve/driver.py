"""Run an evolution: ``evolve(cfg, train_fn=None) -> EvolveResults``.

One Optuna study is the ledger of the search whatever the strategy (:mod:`evolve.samplers`). The study is created
(and its first trial, the base hyps, queued) by the calling process before any worker starts. Each worker then
loops: under the evolution's lock it fails the trials of dead workers, checks the budget and asks for a trial;
it trains that generation with ``train_fn`` (``yolo.engine.trainer.train`` by default), records the metrics and
tells the study COMPLETE (value = fitness), PRUNED or FAIL, then rewrites evolve.csv and hyp_evolve.yaml from the
storage. ``generations`` is the number of finished (COMPLETE + PRUNED) generations wanted in total, so running the
same command again continues an evolution and a larger ``generations`` adds exactly the difference.

Upstream semantics: every generation trains with ``noval=True, nosave=True, noplots=True`` (validation and the
checkpoint only at the final epoch). With a pruner, generations validate every epoch and report their fitness
through an ``on_epoch_end`` callback, which raises ``StopTraining(pruned=True)`` to stop a hopeless one.

MLflow: the calling process owns one parent run per evolution (its id is kept in the study, so a resumed evolution
continues it); each generation's training run is its child (``mlflow.parent_run_id``). The parent gets the best
fitness so far by generation, and evolve.csv, hyp_evolve.yaml and evolve.png as artifacts.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from evolve import beats, ledger, mutation, samplers
from evolve.config import EvolveConfig
from evolve.space import HYP_KEYS, build_space, csv_columns
from yolo.tracking.names import generation_run_name

log = logging.getLogger("yolo.evolve")

CONFIG_ATTR = "evolve:config"  # study user attr: the settings the study was created with
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr
PRUNERS = ("none", "median", "hyperband")


@dataclass
class EvolveResults:
    """What an evolution returns (all of the study, not just this call)."""

    out_dir: str
    generations: int  # finished generations (COMPLETE + PRUNED)
    completed: int
    pruned: int
    failed: int
    best_fitness: float
    best_generation: int  # 0-based row of evolve.csv, -1 when none
    best_trial: int  # Optuna trial number, -1 when none
    best_hyp: dict[str, Any]
    evolve_csv: str | None
    hyp_yaml: str | None
    evolve_png: str | None
    storage: str
    study_name: str
    mlflow_parent_run_id: str | None = None
    rows: list[ledger.Row] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------


class _Setup:
    """Everything a process needs, derived once from the config."""

    def __init__(self, cfg: Any, worker: int = 0, announce: bool = False):
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
            raise ValueError(f"evolve.pruner must be one of {PRUNERS}, got {ev.pruner!r}")
        self.pruning = self.pruner_name != "none"
        if ev.parent not in mutation.PARENT_METHODS:
            raise ValueError(f"evolve.parent must be one of {mutation.PARENT_METHODS}, got {ev.parent!r}")
        if int(cfg.generations) < 0 or int(ev.workers) < 1:
            raise ValueError(f"generations must be >= 0 and evolve.workers >= 1, got {cfg.generations}, {ev.workers}")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else None
        hyp = OmegaConf.to_container(cfg.hyp, resolve=True)
        self.space, self.base = build_space(
            OmegaConf.to_container(ev.space, resolve=True) if ev.space else {}, hyp, weights=cfg.weights,
            noautoanchor=cfg.noautoanchor, search_anchors=ev.search_anchors, model_cfg=model_cfg)
        if not self.space.bounds:
            raise ValueError("evolve.space is empty: nothing to search (is conf/evolve_space/default.yaml composed?)")
        self.columns = csv_columns(self.base)
        self.storage_kind, self.storage_where = ledger.describe_storage(ev.storage, self.out_dir)
        self.study_name = str(ev.study_name)
        self.lock = ledger.evolution_lock(self.out_dir, ev.storage, self.study_name)  # all machines, for an RDB
        self.beats = (beats.JournalBeats(self.storage_where, ev.heartbeat_s, ev.heartbeat_grace_s)
                      if self.storage_kind == "journal" else None)
        devices = [str(d) for d in (ev.devices or [])]
        self.device = devices[worker % len(devices)] if devices else str(cfg.device)
        full = OmegaConf.to_container(cfg, resolve=True)
        full.pop("generations", None)
        full.pop("evolve", None)
        self.train_container = full
        self.tracking_uri, self.mlflow_root = _tracking_location(cfg)
        if announce:
            self._announce()

    def _announce(self) -> None:
        sp = self.space
        where = f"{self.storage_kind}:{_redact(self.storage_where)}"
        log.info(f"evolve: {self.generations} generations, strategy {self.strategy}"
                 + (f" (parent {self.settings.parent})" if self.strategy == "mutation" else "")
                 + f", seed {self.settings.seed}, pruner {self.pruner_name}, {max(1, self.settings.workers)} worker(s)")
        log.info(f"evolve: searching {len(sp.keys)} hyperparameters ({len(sp.tuned_keys)} with gain > 0)"
                 + (f"; not searched: {', '.join(sp.excluded)}" if sp.excluded else ""))
        log.info(f"evolve: results in {self.out_dir}, storage {where}, study '{self.study_name}'")

    # ---- study -------------------------------------------------------------------------------------------------
    def storage(self) -> optuna.storages.BaseStorage:
        return ledger.open_storage(self.settings.storage, self.out_dir, heartbeat_s=self.settings.heartbeat_s,
                                   grace_s=self.settings.heartbeat_grace_s, max_retries=self.settings.max_retries)

    def sampler(self) -> optuna.samplers.BaseSampler:
        return samplers.make_sampler(self.strategy, self.space, self.base, seed=self.settings.seed,
                                     parent=self.settings.parent, worker=self.worker,
                                     kwargs=OmegaConf.to_container(self.settings.sampler_kwargs, resolve=True))

    def pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner_name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.settings.pruner_startup,
                                               n_warmup_steps=self.settings.pruner_warmup_epochs)
        if self.pruner_name == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(self.cfg.epochs)))
        return optuna.pruners.NopPruner()

    def open_study(self) -> optuna.Study:
        return optuna.create_study(study_name=self.study_name, storage=self.storage(), sampler=self.sampler(),
                                   pruner=self.pruner(), direction="maximize", load_if_exists=True)

    def fingerprint(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "seed": int(self.settings.seed), "parent": str(self.settings.parent),
                "space": self.space.as_table(), "base": self.base, "columns": self.columns}

    # ---- a generation's training config ------------------------------------------------------------------------
    def train_cfg(self, hyp: Mapping[str, Any], number: int, parent_run_id: str | None) -> DictConfig:
        from yolo.config import TrainConfig

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


def _tracking_location(cfg: DictConfig) -> tuple[str | None, Path]:
    """The MLflow tracking URI every process of this evolution uses (the training default: ``runs/mlflow.db``)."""
    root = Path(cfg.project).resolve()
    root = root.parent if root.name in ("train", "evolve") else root
    try:
        from yolo.config import MlflowConfig
        from yolo.tracking import resolve_tracking_uri

        return resolve_tracking_uri(MlflowConfig(tracking_uri=cfg.mlflow.tracking_uri), root), root
    except Exception:  # tracking unavailable: leave the choice to the trainer
        return cfg.mlflow.tracking_uri, root


def _data_name(setup: _Setup) -> Any:
    data = setup.train_container.get("data")
    return (data.get("file") or data.get("path")) if isinstance(data, dict) else data


def _redact(where: str) -> str:
    try:
        from yolo.utils.redact import redact_url as redact

        return redact(where)
    except Exception:
        return where


def _resolve_train_fn(train_fn: Callable | str | None) -> Callable:
    if callable(train_fn):
        return train_fn
    if isinstance(train_fn, str) and train_fn:
        module, _, name = train_fn.partition(":")
        if not name:
            raise ValueError(f"evolve.train_fn must look like 'package.module:function', got {train_fn!r}")
        return getattr(importlib.import_module(module), name)
    from yolo.engine.trainer import train

    return train


# ---------------------------------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    completed: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.pruned


def _counts(study: optuna.Study) -> _Counts:
    c = _Counts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.completed += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL and not t.system_attrs.get(ledger.SURPLUS_ATTR):
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    return c


def _over_budget(study: optuna.Study, number: int, generations: int) -> bool:
    """Whether trial ``number`` started after the budget was taken (only possible across machines)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    ahead = sum(t.state == TrialState.RUNNING and t.number < number for t in trials)
    return finished + ahead >= generations


def _recover(study: optuna.Study, setup: _Setup) -> None:
    failed = ledger.recover_stale_trials(study, setup.settings.max_retries)
    if setup.beats is not None:
        failed += beats.recover_silent_trials(study, setup.beats, setup.settings.max_retries)
    if failed:
        log.warning(f"WARNING: evolve: marked failed (worker gone): trials {failed}")


class PruningCallback:
    """Reports each epoch's fitness to the trial and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_fit_epoch_end(self, trainer: Any) -> None:
        from yolo.engine.callbacks import StopTraining

        epoch, metrics = trainer.epoch, trainer.metrics
        value = metrics.get("fitness")
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), step=int(epoch))
        if self.trial.should_prune():
            raise StopTraining(f"pruned after epoch {epoch} (fitness {float(value):.5g})", pruned=True)


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _is_user_error(e: BaseException) -> bool:
    """A bad path, checkpoint or dataset (``yolo.cli.user_error_types``): every generation would fail alike.
    Looked up in the modules already loaded, since whatever raised such an error has imported its module."""
    import sys

    types: list[type[BaseException]] = [FileNotFoundError]
    for module, name in (("yolo.checkpoint", "CheckpointError"), ("yolo.data.config", "DatasetError")):
        t = getattr(sys.modules.get(module), name, None)
        if isinstance(t, type):
            types.append(t)
    return isinstance(e, tuple(types))


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    try:
        study._storage.set_trial_user_attr(trial._trial_id, ledger.FAIL_ATTR, reason[:2000])
        study.tell(trial, state=TrialState.FAIL)
    except Exception as e:  # someone else finished it (e.g. it was declared stale)
        log.warning(f"WARNING: evolve: could not mark trial {trial.number} failed: {e}")


def run_trial(setup: _Setup, study: optuna.Study, trial: optuna.Trial, train_fn: Callable,
              parent_run_id: str | None) -> str:
    """Train one generation and record it; returns 'complete', 'pruned' or 'failed'."""
    for k in setup.space.tuned_keys:
        b = setup.space.bounds[k]
        trial.suggest_float(k, b.lower, b.upper)
    frozen = study._storage.get_trial(trial._trial_id)
    hyp = {k: v for k, v in samplers.trial_hyp(frozen, setup.base).items() if k in HYP_KEYS}
    cfg = setup.train_cfg(hyp, trial.number, parent_run_id)
    save_dir = setup.out_dir / "generations" / f"trial{trial.number:04d}"
    callbacks = [PruningCallback(trial)] if setup.pruning else []
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, ledger.FULL_HYP_ATTR, hyp)
    t0 = time.time()
    res, pruned = None, False
    try:
        from yolo.engine.callbacks import StopTraining

        with beats.Heartbeat(study, trial, setup.beats):
            try:
                res = train_fn(cfg, callbacks=callbacks, save_dir=str(save_dir))
                pruned = bool(getattr(res, "pruned", False))
            except StopTraining as e:  # a train_fn that lets it escape
                pruned = e.pruned
                if not pruned:
                    raise
    except KeyboardInterrupt:
        _fail(study, trial, "interrupted")
        ledger.retry_trial(study, study._storage.get_trial(trial._trial_id), setup.settings.max_retries,
                           reason="interrupted")
        raise
    except Exception as e:
        if _is_user_error(e):
            _fail(study, trial, f"{type(e).__name__}: {e}")
            raise
        log.exception(f"evolve: generation (trial {trial.number}) failed: {type(e).__name__}: {e}")
        _fail(study, trial, f"{type(e).__name__}: {e}")
        return "failed"
    finally:
        if not setup.settings.keep_weights:
            shutil.rmtree(save_dir / "weights", ignore_errors=True)

    if res is not None:
        losses = list(getattr(res, "val_losses", (0.0, 0.0, 0.0)) or (0.0, 0.0, 0.0))[:3]
        metrics = [_finite(getattr(res, a, 0.0)) for a in ("precision", "recall", "map50", "map")]
        metrics += [_finite(x) for x in losses] + [0.0] * (3 - len(losses))
    else:
        metrics = [0.0] * 7
    fit = float(mutation.fitness(metrics[:4])[0])
    attrs = {samplers.METRICS_ATTR: metrics, "fitness": fit,
             "train_s": round(time.time() - t0, 3), "worker": setup.worker, "save_dir": str(save_dir)}
    if res is not None:
        attrs["epochs_completed"] = int(getattr(res, "epochs_completed", 0) or 0)
        if getattr(res, "mlflow_run_id", None):
            attrs["mlflow_run_id"] = res.mlflow_run_id
    try:
        for k, v in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, k, v)
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"evolve: trial {trial.number} pruned (fitness so far {fit:.5g})")
            return "pruned"
        study.tell(trial, fit)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(f"WARNING: evolve: trial {trial.number} was marked failed by another worker meanwhile; "
                    f"its result is dropped")
        return "failed"
    p, r, m50, m = metrics[:4]
    log.info(f"evolve: trial {trial.number} finished: fitness {fit:.5g} (P {p:.4g}, R {r:.4g}, mAP50 {m50:.4g}, "
             f"mAP50-95 {m:.4g}) in {time.time() - t0:.1f}s")
    return "complete"


def _export(setup: _Setup, study: optuna.Study, plot: bool) -> dict[str, Path]:
    rows = ledger.study_rows(study.get_trials(deepcopy=False), setup.base)
    return ledger.export_outputs(rows, setup.out_dir, setup.columns, plot=plot and setup.settings.plot,
                                 title=str(setup.out_dir))


def worker_loop(setup: _Setup, train_fn: Callable, study: optuna.Study | None = None,
                on_trial_done: Callable[[optuna.Study], None] | None = None) -> int:
    """Evaluate generations until the study has ``generations`` finished ones; returns how many this ran."""
    study = study or setup.open_study()
    parent_run_id = study.user_attrs.get(PARENT_ATTR) if setup.cfg.mlflow.enabled else None
    n_run, failures = 0, 0
    max_failures = max(1, int(setup.settings.max_consecutive_failures))
    report = beats.WaitReport()
    while True:
        with setup.lock:
            _recover(study, setup)
            c = _counts(study)
            if c.finished >= setup.generations:
                break
            trial = None
            if c.finished + c.running < setup.generations:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna: "heartbeat ... supposed to be used with optimize"
                    trial = study.ask()
                study._storage.set_trial_system_attr(trial._trial_id, ledger.OWNER_ATTR, ledger.owner_info())
        if trial is None:  # the rest of the budget is being trained by other workers: wait for them
            report.waiting(study, setup.beats)
            time.sleep(float(setup.settings.poll_s))
            continue
        report.done()
        if _over_budget(study, trial.number, setup.generations):
            study._storage.set_trial_system_attr(trial._trial_id, ledger.SURPLUS_ATTR, True)
            _fail(study, trial, "started past the budget by a concurrent worker")
            continue
        outcome = run_trial(setup, study, trial, train_fn, parent_run_id)
        n_run += 1
        with setup.lock:
            _export(setup, study, plot=False)
        if on_trial_done is not None:
            on_trial_done(study)
        failures = failures + 1 if outcome == "failed" else 0
        if failures >= max_failures:
            raise RuntimeError(f"evolve: {failures} generations failed in a row (see the errors above); "
                               f"fix the cause and run the same command again to continue")
    return n_run


# ---------------------------------------------------------------------------------------------------------------
# MLflow parent run and progress
# ---------------------------------------------------------------------------------------------------------------


class _ParentRun:
    """The evolution's MLflow parent run, owned by the calling process."""

    def __init__(self, setup: _Setup, study: optuna.Study):
        self.tracker = None
        self.run_id: str | None = None
        self.logged = 0
        if not setup.cfg.mlflow.enabled:
            return
        try:
            from yolo.config import MlflowConfig
            from yolo.tracking import Tracker, flatten_dict
        except Exception as e:
            log.warning(f"WARNING: evolve: MLflow tracking unavailable: {e}")
            return
        m = setup.cfg.mlflow
        tcfg = MlflowConfig(enabled=True, tracking_uri=setup.tracking_uri, experiment=m.experiment,
                            run_name=m.run_name or f"evolve-{setup.cfg.name}", timeout_s=m.timeout_s)
        params = flatten_dict({
            "evolve": {k: v for k, v in OmegaConf.to_container(setup.settings, resolve=True).items()
                       if k not in ("space", "out_dir", "storage", "devices", "sampler_kwargs")},
            "space": {k: ",".join(f"{x:g}" for x in row) for k, row in setup.space.as_table().items()},
            "base": setup.base,
            "train": {**{k: setup.train_container.get(k) for k in ("weights", "epochs", "imgsz", "batch_size", "seed",
                                                                    "optimizer")}, "data": _data_name(setup)},
        })
        tags = {"yolo.evolve.out_dir": str(setup.out_dir), "yolo.evolve.study": setup.study_name,
                "yolo.evolve.storage": f"{setup.storage_kind}:{_redact(setup.storage_where)}",
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

    def log_rows(self, rows: list[ledger.Row]) -> None:
        if self.tracker is None or len(rows) <= self.logged:
            return
        best = max((r.fitness for r in rows[: self.logged]), default=-math.inf)
        for i in range(self.logged, len(rows)):
            best = max(best, rows[i].fitness)
            self.tracker.log_metrics({"fitness": rows[i].fitness, "best_fitness": best}, step=i)
        self.logged = len(rows)

    def finish(self, paths: Mapping[str, Path], status: str) -> None:
        if self.tracker is None:
            return
        for p in paths.values():
            self.tracker.log_artifact(p)
        self.tracker.end(status)


class _Progress:
    """A tqdm bar over generations (best fitness so far) and the parent run's metrics."""

    def __init__(self, setup: _Setup, parent: _ParentRun, study: optuna.Study):
        from tqdm import tqdm

        self.setup, self.parent = setup, parent
        c = _counts(study)
        self.bar = tqdm(total=setup.generations, initial=min(c.finished, setup.generations), desc="evolve",
                        unit="gen", dynamic_ncols=True)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        c = _counts(study)
        rows = ledger.study_rows(study.get_trials(deepcopy=False), self.setup.base)
        self.bar.n = min(c.finished, self.setup.generations)
        if rows:
            self.bar.set_postfix(best=f"{max(r.fitness for r in rows):.5g}", failed=c.failed, pruned=c.pruned)
        self.bar.refresh()
        self.parent.log_rows(rows)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------


def _initialize(setup: _Setup) -> optuna.Study:
    """Create or load the study, queue generation 1 (or seed from a CSV) when new, fail dead workers' trials."""
    with setup.lock:
        study = setup.open_study()
        fp = setup.fingerprint()
        old = study.user_attrs.get(CONFIG_ATTR)
        if old is None:
            csv_path = setup.settings.resume_from_csv
            own_csv = setup.out_dir / ledger.CSV_NAME
            if not csv_path and own_csv.exists() and not study.get_trials(deepcopy=False):
                csv_path = str(own_csv)
                log.info(f"evolve: new storage but {own_csv} exists: continuing from it")
            if csv_path and not study.get_trials(deepcopy=False):
                ledger.seed_study_from_csv(study, csv_path, setup.space, setup.base)
            elif not study.get_trials(deepcopy=False):
                samplers.enqueue_base(study, setup.space, setup.base)
            study.set_user_attr(CONFIG_ATTR, fp)
        else:
            changed = [k for k in fp if old.get(k) != _jsonish(fp[k])]
            if changed:
                log.warning(f"WARNING: evolve: continuing study '{setup.study_name}' with changed settings: "
                            f"{', '.join(changed)} (the earlier generations are kept)")
            if setup.settings.resume_from_csv:
                log.warning(f"WARNING: evolve: evolve.resume_from_csv ignored: the study already has "
                            f"{len(study.get_trials(deepcopy=False))} trials")
        _recover(study, setup)
    return study


def _jsonish(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this worker when the process that started it is gone (SIGKILLed, or a SIGTERM without clean-up):
    workers must not go on training, orphaned, beside those of the command run again. The generation it was
    training is then failed (and retried) like any whose worker died."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning(f"WARNING: evolve: the main process {parent} is gone; worker {os.getpid()} exits")
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="evolve-parent-watch").start()


def _worker_entry(container: dict, worker: int, train_fn: Any, level: int, threads: int | None,
                  parent: int | None = None) -> None:
    """A worker process (spawned): its own storage connection and sampler, the shared lock."""
    if parent is not None:
        _exit_with_parent(parent, poll_s=min(1.0, float(container["evolve"]["poll_s"])))
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    logging.basicConfig(level=level, format=f"[worker {worker}] %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = _Setup(container, worker=worker)
    worker_loop(setup, _resolve_train_fn(train_fn))


def _run_processes(setup: _Setup, study: optuna.Study, train_fn: Any, progress: _Progress) -> None:
    n = int(setup.settings.workers)
    if callable(train_fn):
        try:
            pickle.dumps(train_fn)
        except Exception:
            raise ValueError("evolve.workers > 1 needs an importable train_fn (a module-level function), "
                             "or evolve.train_fn='package.module:function'") from None
    container = OmegaConf.to_container(setup.cfg, resolve=True)
    container["evolve"]["out_dir"] = str(setup.out_dir)
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, name=f"evolve-worker-{i}",
                         args=(container, i, train_fn, log.getEffectiveLevel(), threads, os.getpid()))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            next(p for p in procs if p.is_alive()).join(float(setup.settings.poll_s))
            with setup.lock:
                _recover(study, setup)
            progress.update(study)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(30)
        raise
    progress.update(study)
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if bad and _counts(study).finished < setup.generations:
        raise RuntimeError(f"evolve: worker(s) failed: {bad}; run the same command again to continue")


def evolve(cfg: Any, train_fn: Callable | str | None = None) -> EvolveResults:
    """Evolve the training hyperparameters of ``cfg`` (an :class:`evolve.config.EvolveConfig`).

    ``train_fn(cfg, callbacks=..., save_dir=...)`` trains one generation and returns an object with the fields of
    ``yolo.engine.trainer.TrainResults`` (precision, recall, map50, map, val_losses, pruned, mlflow_run_id, ...);
    default: the config's ``evolve.train_fn`` if set, else ``yolo.engine.trainer.train``.
    """
    setup = _Setup(cfg, announce=True)
    train_fn = train_fn if train_fn is not None else setup.settings.train_fn
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    study = _initialize(setup)
    parent = _ParentRun(setup, study)
    progress = _Progress(setup, parent, study)
    status = "FINISHED"
    try:
        if int(setup.settings.workers) > 1:
            _run_processes(setup, study, train_fn, progress)
        else:
            worker_loop(setup, _resolve_train_fn(train_fn), study=study, on_trial_done=progress.update)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        progress.update(study)
        progress.close()
        with setup.lock:
            paths = _export(setup, study, plot=True)
        parent.finish(paths, status)
    results = _results(setup, study, paths, parent.run_id)
    if results.best_generation >= 0:
        log.info(f"evolve: {results.generations} generations finished ({results.completed} complete, "
                 f"{results.pruned} pruned, {results.failed} failed); best fitness {results.best_fitness:.5g} in "
                 f"generation {results.best_generation} (trial {results.best_trial})\n"
                 f"evolve: results in {setup.out_dir}\nevolve: train with the best hyps: copy {results.hyp_yaml} "
                 f"to conf/hyp/evolved.yaml and run `python run_train.py hyp=evolved`")
    return results


def _results(setup: _Setup, study: optuna.Study, paths: Mapping[str, Path], parent_id: str | None) -> EvolveResults:
    c = _counts(study)
    rows = ledger.study_rows(study.get_trials(deepcopy=False), setup.base)
    j = ledger.best_index(rows) if rows else -1
    best = rows[j] if rows else None
    return EvolveResults(
        out_dir=str(setup.out_dir), generations=c.finished, completed=c.completed, pruned=c.pruned, failed=c.failed,
        best_fitness=best.fitness if best else 0.0, best_generation=j, best_trial=best.number if best else -1,
        best_hyp=dict(best.hyp) if best else dict(setup.base),
        evolve_csv=str(paths["csv"]) if "csv" in paths else None,
        hyp_yaml=str(paths["yaml"]) if "yaml" in paths else None,
        evolve_png=str(paths["png"]) if "png" in paths else None,
        storage=f"{setup.storage_kind}:{_redact(setup.storage_where)}", study_name=setup.study_name,
        mlflow_parent_run_id=parent_id, rows=rows)
