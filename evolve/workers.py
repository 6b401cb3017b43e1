"""Workers: the loop that claims generations under the evolution's lock (after failing dead or silent
workers' ones) until the budget is finished, and worker processes (``evolve.workers``) watched by the command."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from evolve import beats, fidelity, recovery
from evolve import optuna_internals as oi
from evolve.formats import export_outputs
from evolve.rows import is_warm, study_rows
from evolve.settings import PARENT_ATTR, Setup, resolve_train_fn
from evolve.trial import fail, run_trial
from yolo.errors import ConfigError

log = logging.getLogger("yolo.evolve")


@dataclass
class Counts:
    completed: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.pruned


def counts(study: optuna.Study) -> Counts:
    c = Counts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.completed += 0 if is_warm(t) else 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL and not t.system_attrs.get(recovery.SURPLUS_ATTR):
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    return c


def over_budget(study: optuna.Study, number: int, generations: int) -> bool:
    """Whether trial ``number`` started after the budget was taken (only possible across machines)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_warm(t) for t in trials)
    ahead = sum(t.state == TrialState.RUNNING and t.number < number for t in trials)
    return finished + ahead >= generations


def recover(study: optuna.Study, setup: Setup) -> None:
    failed = recovery.recover_stale_trials(study, setup.settings.max_retries)
    if setup.beats is not None:
        failed += beats.recover_silent_trials(study, setup.beats, setup.settings.max_retries)
    if failed:
        log.warning(f"WARNING: evolve: marked failed (worker gone): trials {failed}")


def export(setup: Setup, study: optuna.Study, plot: bool) -> dict[str, Path]:
    rows = study_rows(study.get_trials(deepcopy=False), setup.base)
    return export_outputs(rows, setup.out_dir, setup.columns, plot=plot and setup.settings.plot,
                          title=str(setup.out_dir), extra=setup.extra_columns)


def worker_loop(setup: Setup, train_fn: Callable, study: optuna.Study | None = None,
                on_trial_done: Callable[[optuna.Study], None] | None = None, run: Callable = run_trial,
                stop: threading.Event | None = None) -> int:
    """Evaluate generations until the study has ``generations`` finished ones (or ``stop`` is set); returns how
    many this ran. ``run(setup, study, trial, train_fn, parent_run_id)`` trains one (a Hydra sweep launches it
    as a job instead) and returns 'complete', 'pruned' or 'failed'."""
    study = study or setup.open_study()
    parent_run_id = study.user_attrs.get(PARENT_ATTR) if setup.cfg.mlflow.enabled else None
    n_run, failures = 0, 0
    max_failures = max(1, int(setup.settings.max_consecutive_failures))
    report = beats.WaitReport()
    while stop is None or not stop.is_set():
        with setup.lock:
            recover(study, setup)
            c = counts(study)
            if c.finished >= setup.generations:
                break
            trial = None
            if c.finished + c.running < setup.generations:
                if setup.rungs is not None:
                    fidelity.maybe_promote(study, setup.rungs)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna: "heartbeat ... supposed to be used with optimize"
                    trial = study.ask()
                oi.set_system_attr(study, trial, recovery.OWNER_ATTR, recovery.owner_info())
        if trial is None:  # the rest of the budget is being trained by other workers: wait for them
            report.waiting(study, setup.beats)
            time.sleep(float(setup.settings.poll_s))
            continue
        report.done()
        if over_budget(study, trial.number, setup.generations):
            oi.set_system_attr(study, trial, recovery.SURPLUS_ATTR, True)
            fail(study, trial, "started past the budget by a concurrent worker")
            continue
        outcome = run(setup, study, trial, train_fn, parent_run_id)
        n_run += 1
        with setup.lock:
            export(setup, study, plot=False)
        if on_trial_done is not None:
            on_trial_done(study)
        failures = failures + 1 if outcome == "failed" else 0
        if failures >= max_failures:
            raise RuntimeError(f"evolve: {failures} generations failed in a row (see the errors above); "
                               f"fix the cause and run the same command again to continue")
    return n_run


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this worker when the process that started it is gone (SIGKILLed, or a SIGTERM without clean-up)."""
    recovery.exit_when(lambda: os.getppid() != parent,
                       lambda: f"WARNING: evolve: the main process {parent} is gone; worker {os.getpid()} exits",
                       poll_s, name="evolve-parent-watch")


def worker_entry(container: dict, worker: int, train_fn: Any, level: int, threads: int | None,
                 parent: int | None = None) -> None:
    """A worker process (spawned): its own storage connection and sampler, the shared lock."""
    if parent is not None:
        exit_with_parent(parent, poll_s=min(1.0, float(container["evolve"]["poll_s"])))
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    logging.basicConfig(level=level, format=f"[worker {worker}] %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = Setup(container, worker=worker)
    worker_loop(setup, resolve_train_fn(train_fn))


def run_processes(setup: Setup, study: optuna.Study, train_fn: Any,
                  on_update: Callable[[optuna.Study], None]) -> None:
    """Run ``evolve.workers`` worker processes to the end, failing dead workers' trials meanwhile."""
    n = int(setup.settings.workers)
    if callable(train_fn):
        try:
            pickle.dumps(train_fn)
        except Exception:
            raise ConfigError("evolve.workers: > 1 needs an importable train_fn (a module-level function), "
                             "or evolve.train_fn='package.module:function'") from None
    container = OmegaConf.to_container(setup.cfg, resolve=True)
    container["evolve"]["out_dir"] = str(setup.out_dir)
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_entry, name=f"evolve-worker-{i}",
                         args=(container, i, train_fn, log.getEffectiveLevel(), threads, os.getpid()))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            next(p for p in procs if p.is_alive()).join(float(setup.settings.poll_s))
            with setup.lock:
                recover(study, setup)
            on_update(study)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(30)
        raise
    on_update(study)
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if bad and counts(study).finished < setup.generations:
        raise RuntimeError(f"evolve: worker(s) failed: {bad}; run the same command again to continue")
