"""Run an evolution: ``evolve(cfg, train_fn=None) -> EvolveResults``.

One Optuna study is the ledger of the search whatever the strategy (:mod:`evolve.samplers`). The study is created
(and its first trial, the base hyps, queued) by the calling process before any worker starts. Each worker then
loops: under the evolution's lock it fails the trials of dead workers, checks the budget and asks for a trial;
it trains that generation with ``train_fn`` (``yolo.train.train`` by default), records the metrics and
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

import logging
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig

from evolve import fidelity, samplers
from evolve.final import FINAL_NAME, FinalCheck, final_train
from evolve.formats import CSV_NAME, Row, best_index
from evolve.progress import ParentRun, Progress
from evolve.rows import seed_study_from_csv, study_rows, warm_start
from evolve.settings import CONFIG_ATTR, Setup, redact, resolve_train_fn
from evolve.workers import counts, export, recover, run_processes, worker_loop

log = logging.getLogger("yolo.evolve")


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
    rows: list[Row] = field(default_factory=list, repr=False)
    final: FinalCheck | None = None  # evolve.final_train: the best and the base hyps retrained for the full schedule


def _final_check(setup: Setup, study: optuna.Study, train_fn: Callable | str | None,
                 parent: ParentRun) -> FinalCheck | None:
    rows = study_rows(study.get_trials(deepcopy=False), setup.base)
    if not rows:
        return None
    check = final_train(setup, rows[best_index(rows)].hyp, resolve_train_fn(train_fn), parent.run_id)
    parent.log_final(check)
    return check


def initialize(setup: Setup) -> optuna.Study:
    """Create or load the study, queue generation 1 (or seed from a CSV) when new, fail dead workers' trials."""
    with setup.lock:
        study = setup.open_study()
        fp = setup.fingerprint()
        old = study.user_attrs.get(CONFIG_ATTR)
        if old is None:
            csv_path = setup.settings.resume_from_csv
            own_csv = setup.out_dir / CSV_NAME
            if not csv_path and own_csv.exists() and not study.get_trials(deepcopy=False):
                csv_path = str(own_csv)
                log.info(f"evolve: new storage but {own_csv} exists: continuing from it")
            warm = [str(w) for w in setup.settings.warm_start or []]
            if csv_path and not study.get_trials(deepcopy=False):
                seed_study_from_csv(study, csv_path, setup.space, setup.base)
            elif not study.get_trials(deepcopy=False):
                warm_start(study, warm, setup.space, setup.base, setup.out_dir)
                samplers.enqueue_base(study, setup.space, setup.base)
            study.set_user_attr(CONFIG_ATTR, fp)
        else:
            changed = [k for k in fp if old.get(k) != _jsonish(fp[k])]
            if changed:
                log.warning(f"WARNING: evolve: continuing study '{setup.study_name}' with changed settings: "
                            f"{', '.join(changed)} (the earlier generations are kept)")
            if setup.settings.resume_from_csv or setup.settings.warm_start:
                log.warning(f"WARNING: evolve: evolve.resume_from_csv / warm_start ignored: the study already has "
                            f"{len(study.get_trials(deepcopy=False))} trials")
        recover(study, setup)
    return study


def _jsonish(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))


def evolve(cfg: Any, train_fn: Callable | str | None = None) -> EvolveResults:
    """Evolve the training hyperparameters of ``cfg`` (an :class:`evolve.config.EvolveConfig`).

    ``train_fn(cfg, callbacks=..., save_dir=...)`` trains one generation and returns an object with the fields of
    ``yolo.engine.trainer.TrainResults`` (precision, recall, map50, map, val_losses, pruned, mlflow_run_id, ...);
    default: the config's ``evolve.train_fn`` if set, else ``yolo.train.train``.
    """
    setup = Setup(cfg, announce=True)
    train_fn = train_fn if train_fn is not None else setup.settings.train_fn

    def search(study: optuna.Study, progress: Progress, parent: ParentRun) -> FinalCheck | None:
        if int(setup.settings.workers) > 1:
            run_processes(setup, study, train_fn, progress.update)
        else:
            worker_loop(setup, resolve_train_fn(train_fn), study=study, on_trial_done=progress.update)
        if setup.settings.final_train:
            progress.update(study)
            return _final_check(setup, study, train_fn, parent)
        return None

    return run_search(setup, search, lambda results: command_overrides())


def run_search(setup: Setup, search: Callable[[optuna.Study, Progress, ParentRun], FinalCheck | None],
               overrides: Callable[[EvolveResults], list[str]]) -> EvolveResults:
    """The life of an evolution around ``search`` (which trains generations until the budget is met): the study
    opened or created, the MLflow parent and the progress bar, then, however the search ends, the files written,
    waiting checkpoints released and the parent finished; the results and a training command for the best hyps
    with ``overrides(results)`` (the command line's, or a sweep's)."""
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    study = initialize(setup)
    parent = ParentRun(setup, study)
    progress = Progress(setup, parent, study)
    status, check = "FINISHED", None
    try:
        check = search(study, progress, parent)
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
            paths = export(setup, study, plot=True)
            if check is not None:
                paths["final"] = setup.out_dir / FINAL_NAME
            if setup.rungs is not None and status == "FINISHED" and not setup.settings.keep_weights:
                fidelity.release_unpromoted(study)
        parent.finish(paths, status)
    results = _results(setup, study, paths, parent.run_id)
    results.final = check
    if results.best_generation >= 0:
        log.info(f"evolve: {results.generations} generations finished ({results.completed} complete, "
                 f"{results.pruned} pruned, {results.failed} failed); best fitness {results.best_fitness:.5g} in "
                 f"generation {results.best_generation} (trial {results.best_trial})\n"
                 f"evolve: results in {setup.out_dir}\nevolve: train with the best hyps: "
                 f"{train_command(results.hyp_yaml, setup.cfg, overrides(results))}")
    return results


# the evolution's own settings and places: not for the training command it suggests
_EVOLVE_ONLY = ("generations", "evolve", "evolve_space", "project", "name", "mlflow", "hyp", "hyp_file", "hydra")


def command_overrides() -> list[str]:
    """The overrides on the current Hydra job's command line ([] outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train_command(hyp_yaml: str | Path, cfg: Any, overrides: list[str]) -> str:
    """``python run_train.py hyp=/abs/path/hyp_evolve.yaml`` and the evolution's training overrides (a dataset
    or model file given by path named by its path again)."""
    parts = ["python", "run_train.py", f"hyp={Path(hyp_yaml).resolve()}"]
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~").split(".")[0] in _EVOLVE_ONLY or key == "data.file":
            continue
        if key == "data" and value == "external" and cfg.data.get("file"):
            o = f"data={cfg.data.file}"
        elif key == "model" and cfg.get("model_file"):
            o = f"model={cfg.model_file}"
        parts.append(o)
    return shlex.join(parts)


def _results(setup: Setup, study: optuna.Study, paths: Mapping[str, Path], parent_id: str | None) -> EvolveResults:
    c = counts(study)
    rows = study_rows(study.get_trials(deepcopy=False), setup.base)
    j = best_index(rows) if rows else -1
    best = rows[j] if rows else None
    return EvolveResults(
        out_dir=str(setup.out_dir), generations=c.finished, completed=c.completed, pruned=c.pruned, failed=c.failed,
        best_fitness=best.fitness if best else 0.0, best_generation=j, best_trial=best.number if best else -1,
        best_hyp=dict(best.hyp) if best else dict(setup.base),
        evolve_csv=str(paths["csv"]) if "csv" in paths else None,
        hyp_yaml=str(paths["yaml"]) if "yaml" in paths else None,
        evolve_png=str(paths["png"]) if "png" in paths else None,
        storage=f"{setup.storage_kind}:{redact(setup.storage_where)}", study_name=setup.study_name,
        mlflow_parent_run_id=parent_id, rows=rows)
