"""The evolve sweeper's work: hyperparameter evolution inside Hydra's multirun (``hydra/sweeper=evolve``).

``python run_train.py -m hydra/sweeper=evolve hydra.sweeper.strategy=cmaes hydra.sweeper.generations=50
'hyp.lr0=tag(log, interval(1e-4, 0.1))' 'optimizer=choice(sgd, adamw)'`` runs the evolution engine of
``run_evolve.py`` (one study as the ledger, the same strategies, fidelity, pruning, resume by running the same
command again, evolve.csv / hyp_evolve.yaml / evolve.png and an MLflow parent with one child per trial) with each
trial launched as a Hydra job by the configured launcher; the objective is the job's return value.

* The space is the command line's sweep overrides and ``hydra.sweeper.params`` (:mod:`evolve.sweep_space`); with
  none, upstream's meta table (``hydra.sweeper.space``, else ``conf/evolve_space/default.yaml``), as
  ``run_evolve.py`` searches it. Every other override is given to every job unchanged.
* ``hydra.sweeper.n_jobs`` trials run at once (default: the launcher's ``n_jobs``, or submitit's
  ``array_parallelism``; 1 with the basic launcher, which runs jobs in this process). Each slot asks the study for
  a trial as soon as its job returns, so no job waits for a batch.
* A job's training finds its trial through :mod:`evolve.sweep_trial` (pruning, its run folder, its metrics).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from evolve import fidelity, recovery, samplers, sweep_space
from evolve import optuna_internals as oi
from evolve.beats import Heartbeat
from evolve.config import EvolveConfig, EvolveSettings
from evolve.driver import EvolveResults, run_search
from evolve.progress import Progress
from evolve.settings import Setup
from evolve.space import HYP_KEYS
from evolve.sweep_trial import FACTORY, RESULT_ATTR, SWEEP_ENV, SweepSpec
from evolve.trial import fail, finite, is_user_error, record, suggest, tidy_weights
from evolve.workers import worker_loop
from yolo.cli import CONF_DIR
from yolo.config import check_train_config
from yolo.engine.callbacks import CALLBACKS_ENV
from yolo.errors import ConfigError
from yolo.tracking.names import generation_run_name
from yolo.utils.files import atomic_write_text

log = logging.getLogger("yolo.evolve")

RESULTS_NAME = "optimization_results.yaml"  # in the sweep folder, as Hydra's Optuna sweeper writes it
DEFAULT_SPACE = Path(CONF_DIR) / "evolve_space" / "default.yaml"
# a generation trains as upstream's evolution trains one (validation and a checkpoint only at the end)
# and, as run_evolve.py's mlflow/evolve.yaml, no checkpoint or model uploaded per generation
GENERATION_SETTINGS = (("noval", "true"), ("nosave", "true"), ("noplots", "true"), ("mlflow.log_weights", "false"),
                       ("mlflow.log_model", "false"))
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class EvolveSweep:
    """One ``sweep(arguments)`` of the evolve sweeper: ``settings`` (``hydra.sweeper``), the composed ``config``
    (without the sweep's values) and the launcher that runs the jobs."""

    def __init__(self, settings: Mapping[str, Any], config: DictConfig, launcher: Any):
        self.settings = dict(settings)
        self.config, self.launcher = config, launcher
        self.returns: list[JobReturn] = []
        self._lock = threading.Lock()
        self.fixed: list[str] = []  # the command line's overrides that are no sweep
        self.fixed_keys: set[str] = set()
        self.keys: dict[str, str] = {}  # a searched setting's study name -> its override key
        self.space: tuple[Any, dict[str, Any]] | None = None  # (space, base) of a sweep's own parameters
        self._best: tuple[int, dict[str, Any]] | None = None  # the best trial's number and values, read once

    # ---- configuration -----------------------------------------------------------------------------------------
    def evolve_config(self) -> DictConfig:
        """The training config plus the evolution's settings, checked by the evolution's schema."""
        job = OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"])
        data = OmegaConf.to_container(job, resolve=True)
        known = {f.name for f in fields(EvolveSettings)}
        ev = {k: v for k, v in self.settings.items() if k in known}
        if not ev.get("out_dir"):
            ev["out_dir"] = str(Path(str(data.get("project") or "runs/train")) / "evolve" / str(data.get("name") or "exp"))
        if not ev.get("space"):
            ev["space"] = OmegaConf.to_container(OmegaConf.load(DEFAULT_SPACE), resolve=True)
        if int(ev.get("workers") or 1) != 1:
            raise ConfigError("hydra.sweeper.workers: trials run in parallel through the launcher: set "
                              "hydra/launcher=joblib (and hydra.sweeper.n_jobs) instead")
        for key in ("train_fn", "final_train"):
            if ev.get(key):
                raise ConfigError(f"hydra.sweeper.{key}: run_evolve.py only (a sweep trains its trials with its "
                                  f"task function; retrain the best with the command it prints)")
        data["generations"] = self.settings.get("generations", 300)
        data["evolve"] = ev
        cfg = OmegaConf.merge(OmegaConf.structured(EvolveConfig), data)
        check_train_config(cfg, EvolveConfig)
        return cfg

    def current_value(self, param: sweep_space.SweepParam, hyp: Mapping[str, Any]) -> Any:
        """The composed config's value of a searched setting (a config group's option by its name)."""
        if param.name in HYP_KEYS:
            return hyp.get(param.name)
        key = param.key.lstrip("+")
        choices = OmegaConf.select(self.config, "hydra.runtime.choices") or {}
        if key in choices:
            return choices[key]
        value = OmegaConf.select(self.config, key, default=None)
        return None if OmegaConf.is_config(value) else value  # a whole node is no value to search

    def slots(self, generations: int) -> int:
        """How many trials run at once."""
        n = self.settings.get("n_jobs")
        launcher = OmegaConf.select(self.config, "hydra.launcher") or {}
        if n is None:
            n = launcher.get("n_jobs", launcher.get("array_parallelism", 1))
            n = n if n is not None else -1
            if n < 0:  # joblib: -1 is every core, -2 all but one, ...
                n = max(1, (os.cpu_count() or 1) + 1 + n)
        n = int(n)
        if n < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs: must be >= 1, got {n}")
        if launcher.get("_target_") == BASIC_LAUNCHER and n > 1:
            log.warning(f"WARNING: evolve sweep: the basic launcher runs one job at a time in this process; "
                        f"hydra.sweeper.n_jobs={n} needs hydra/launcher=joblib (or another parallel launcher)")
            n = 1
        return max(1, min(n, generations))

    # ---- the sweep ---------------------------------------------------------------------------------------------
    def run(self, arguments: list[str]) -> list[list[JobReturn]]:
        try:
            return self._run(arguments)
        except ConfigError as e:  # named as the user sets it: hydra.sweeper.eta, not evolve.eta
            text = str(e)
            if text.startswith("evolve."):
                raise ConfigError("hydra.sweeper." + text[len("evolve."):]) from None
            if text.startswith("generations"):
                raise ConfigError("hydra.sweeper." + text) from None
            raise

    def _run(self, arguments: list[str]) -> list[list[JobReturn]]:
        cfg = self.evolve_config()
        sweep_dir = Path(str(OmegaConf.select(self.config, "hydra.sweep.dir")))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweepers do: the sweep's config
        self.fixed, params = sweep_space.parse(arguments, self.settings.get("params") or {})
        self.fixed_keys = {o.split("=", 1)[0].lstrip("+~") for o in self.fixed}
        self.keys = {p.name: p.key for p in params.values()}
        space = None
        if params:
            hyp = OmegaConf.to_container(cfg.hyp, resolve=True)
            model = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else None
            current = {p.name: self.current_value(p, hyp) for p in params.values()}
            space = sweep_space.sweep_space(params, hyp, OmegaConf.to_container(cfg.evolve.space, resolve=True),
                                            current, model_cfg=model)
        self.space = space
        setup = Setup(cfg, announce=True, space=space)
        spec = SweepSpec.of(setup)
        callbacks = ",".join(filter(None, [os.environ.get(CALLBACKS_ENV, ""), FACTORY]))
        with environment({SWEEP_ENV: spec.to_env(), CALLBACKS_ENV: callbacks}):
            results = run_search(setup, lambda study, progress, parent: self.search(setup, study, progress),
                                 lambda r: [*self.fixed, *self.best_overrides(setup, r, extra_only=True)])
        self.write_results(setup, results)
        return [[r] for r in self.returns]

    def search(self, setup: Setup, study: optuna.Study, progress: Progress) -> None:
        n = self.slots(setup.generations)
        lock = threading.Lock()

        def update(s: optuna.Study) -> None:
            with lock:
                progress.update(s)

        if n == 1:
            worker_loop(setup, None, study=study, on_trial_done=update, run=self.launch)
            return
        log.info(f"evolve sweep: {n} trials at a time")
        stop, errors = threading.Event(), []

        def slot(i: int) -> None:
            try:
                worker_loop(Setup(setup.cfg, worker=i, space=self.space), None, on_trial_done=update,
                            run=self.launch, stop=stop)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=slot, args=(i,), name=f"evolve-slot-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except BaseException:
            stop.set()
            raise
        if errors:
            raise errors[0]

    def overrides(self, setup: Setup, trial: optuna.Trial, values: Mapping[str, Any],
                  parent_run_id: str | None) -> list[str]:
        """A trial's job: the command line's fixed overrides, the trial's values, and what the sweep sets."""
        out = [*self.fixed, *sweep_space.trial_overrides(setup.space, values, self.keys)]
        if self.settings.get("upstream_generations", True):  # upstream's habits, unless the command line sets them
            settings = dict(GENERATION_SETTINGS, noval="false" if setup.pruning else "true")
            out += [f"{k}={v}" for k, v in settings.items() if k not in self.fixed_keys]
        if setup.pruning and "noval" in self.fixed_keys:
            log.warning("WARNING: evolve sweep: the pruner needs every epoch validated (noval=false)")
        if parent_run_id:
            out.append(f"mlflow.parent_run_id={parent_run_id}")
        if "mlflow.run_name" not in self.fixed_keys:
            out.append(f"mlflow.run_name={sweep_space.format_value(generation_run_name(setup.cfg.name, trial.number))}")
        if setup.settings.devices and "device" not in self.fixed_keys:
            out.append(f"device={sweep_space.format_value(setup.device)}")
        return out

    def launch(self, setup: Setup, study: optuna.Study, trial: optuna.Trial, train_fn: Any,
               parent_run_id: str | None) -> str:
        """Run one trial as a Hydra job (numbered by the trial) and record it; 'complete', 'pruned' or 'failed'."""
        suggest(trial, setup.space)
        frozen = oi.frozen(study, trial)
        values = samplers.trial_hyp(frozen, setup.base)
        oi.set_user_attr(study, trial, samplers.FULL_HYP_ATTR, {k: v for k, v in values.items() if k in HYP_KEYS})
        overrides = self.overrides(setup, trial, values, parent_run_id)
        rung, keep_last = 0, False
        promotion = setup.out_dir / "promotions" / f"trial{trial.number:04d}"
        t0 = time.time()
        try:
            if setup.rungs is not None:
                rung = fidelity.rung_of(frozen)
                stop = setup.rungs.stop_epoch(rung)
                keep_last = stop is not None  # a lower rung's checkpoint waits for its promotion
                if stop is not None:
                    overrides.append(f"stop_epoch={stop}")
                start = fidelity.prepare_resume(study, frozen, promotion)
                if start is not None:
                    overrides.append(f"resume={sweep_space.format_value(str(start.resolve()))}")
            with Heartbeat(study, trial, setup.beats):
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except KeyboardInterrupt:
            fail(study, trial, "interrupted")
            recovery.retry_trial(study, oi.frozen(study, trial), setup.settings.max_retries, reason="interrupted")
            raise
        except fidelity.PromotionError as e:
            fail(study, trial, str(e))
            log.error(f"evolve sweep: {e}")
            return "failed"
        except BaseException as e:  # the launcher itself failed (or a job exited the process: a user error)
            fail(study, trial, f"{type(e).__name__}: {e}")
            raise
        finally:
            shutil.rmtree(promotion, ignore_errors=True)
        with self._lock:
            self.returns.append(ret)
        return self.conclude(setup, study, trial, ret, rung, keep_last, t0)

    def conclude(self, setup: Setup, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, rung: int,
                 keep_last: bool, t0: float) -> str:
        """Record what a returned job achieved: its reported metrics, and its return value as the objective."""
        attrs = oi.frozen(study, trial).user_attrs
        reported = attrs.get(RESULT_ATTR) if isinstance(attrs.get(RESULT_ATTR), dict) else None
        folder = (reported or {}).get("save_dir") or attrs.get(fidelity.SAVE_DIR_ATTR)
        pruned = bool(reported and reported.get("pruned"))
        ok = ret.status == JobStatus.COMPLETED
        if folder:
            tidy_weights(Path(folder), keep_last=keep_last and ok and not pruned,
                         keep_all=bool(setup.settings.keep_weights))
        if not ok:
            err = ret._return_value
            fail(study, trial, f"{type(err).__name__}: {err}")
            if isinstance(err, BaseException) and is_user_error(err):
                raise err
            log.error(f"evolve sweep: trial {trial.number} failed: {type(err).__name__}: {err}")
            return "failed"
        value = ret.return_value
        if pruned:
            value = None
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
            fail(study, trial, f"the job returned {value!r}, not a finite number")
            log.error(f"evolve sweep: trial {trial.number}: the task function returned {value!r}: the evolve "
                      f"sweeper maximises the number it returns")
            return "failed"
        res = SimpleNamespace(**reported) if reported else None
        return record(setup, study, trial, res, pruned, rung, t0, value=None if value is None else finite(value))

    # ---- the outcome -------------------------------------------------------------------------------------------
    def best_overrides(self, setup: Setup, results: EvolveResults, extra_only: bool = False) -> list[str]:
        """The best trial's searched values as overrides (only the settings outside the hyps: ``extra_only``)."""
        if results.best_trial < 0:
            return []
        if self._best is None or self._best[0] != results.best_trial:
            best = next(t for t in setup.open_study().get_trials(deepcopy=False) if t.number == results.best_trial)
            self._best = (best.number, samplers.trial_hyp(best, setup.base))
        return sweep_space.trial_overrides(setup.space, self._best[1], self.keys,
                                           hyp_keys=() if extra_only else setup.space.tuned_keys)

    def write_results(self, setup: Setup, results: EvolveResults) -> None:
        """``optimization_results.yaml`` in the sweep folder (Hydra's Optuna sweeper's file): the best value and
        its overrides, and where the evolution's files are."""
        if results.best_trial < 0:
            return
        best = dict(o.split("=", 1) for o in self.best_overrides(setup, results))
        doc = {"name": "evolve", "best_value": float(results.best_fitness), "best_trial": results.best_trial,
               "best_params": {k: yaml.safe_load(v) for k, v in best.items()},
               "evolve_dir": str(setup.out_dir), "hyp_evolve": results.hyp_yaml}
        sweep_dir = Path(str(OmegaConf.select(self.config, "hydra.sweep.dir")))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sweep_dir / RESULTS_NAME, yaml.safe_dump(doc, sort_keys=False))
        log.info(f"Best parameters: {' '.join(f'{k}={v}' for k, v in best.items())}\nBest value: "
                 f"{results.best_fitness:.5g}\n(saved to {sweep_dir / RESULTS_NAME})")


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the jobs the sweep starts inherit them), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

