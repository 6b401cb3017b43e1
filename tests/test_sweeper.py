"""The evolve sweeper (``hydra/sweeper=evolve``): Hydra's grammar as the search space, trials launched as jobs by
the basic and the joblib launchers, resume by rerunning, MLflow, asha, presets, and the plain grid still a grid."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from evolve import ledger, samplers, sweep_space
from evolve.sweep_trial import RESULT_ATTR, SWEEP_ENV, SweepSpec, TrialCallback
from helpers import CONF, ROOT, compose, train_overrides
from test_evolve_ledger import ISSUE_HEADER
from yolo.engine.callbacks import StopTraining
from yolo.errors import ConfigError

MIXED = ["optimizer=choice(sgd,adamw)", "hyp.lr0=tag(log, interval(1e-4, 0.1))", "hyp.mosaic=interval(0.0, 1.0)",
         "hyp.warmup_epochs=range(0,3)"]


# ---- the space, pure ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.01, 1e-05, 3, -2, True, False, None, "sgd", "yolov5n", "a b", "it's",
                                   "x,y", "true", "1.5", "path/to/w.pt", "c:\\dir\\", "a\\'b\\\\", "=", "", float("inf")])
def test_format_value_reads_back_as_the_same_value(value):
    (o,) = OverridesParser.create().parse_overrides([f"key={sweep_space.format_value(value)}"])
    got = o.value()
    assert got == value and type(got) is type(value)


def test_hydra_grammar_maps_to_distributions():
    fixed, params = sweep_space.parse(
        [*MIXED, "epochs=3", "batch_size=range(8,33,8)", "imgsz=int(interval(32,96))",
         "hyp.box=tag(log, int(interval(1, 4)))", "hyp.fliplr=0.25,0.5", "+extra_key=choice(1,2)"], {"hyp.lr0": "interval(0.5, 0.6)", "hyp.obj": "interval(0.2, 4)", "seed": "7"})
    assert fixed == ["seed=7", "epochs=3"]
    assert params["optimizer"].dist == CategoricalDistribution(["sgd", "adamw"])
    assert params["hyp.lr0"].name == "lr0" and params["hyp.lr0"].dist == FloatDistribution(1e-4, 0.1, log=True)
    assert params["hyp.lr0"].is_hyp_float and params["hyp.obj"].is_hyp_float  # the command line's wins over params
    assert params["hyp.warmup_epochs"].dist == IntDistribution(0, 2) and not params["hyp.warmup_epochs"].is_hyp_float
    assert params["batch_size"].dist == IntDistribution(8, 32, step=8)
    assert params["imgsz"].dist == IntDistribution(32, 96)
    assert params["hyp.box"].dist == FloatDistribution(1, 4, log=True)  # a training hyp stays a float
    assert params["hyp.fliplr"].dist == CategoricalDistribution([0.25, 0.5])
    assert params["extra_key"].key == "+extra_key" and params["extra_key"].name == "extra_key"


@pytest.mark.parametrize("line, message", [
    ("hyp.lr0=glob(*)", "glob"),
    ("resume=choice(a,b)", "set by the evolve sweeper"),
    ("hyp.lr0=tag(log, interval(0, 1))", "hyp.lr0"),
    ("hyp.lr0=interval(0.5, 0.1)", "hyp.lr0"),
    ("hyp.lr0=choice([1,2],3)", "a searched value must be"),
    ("~hyp.lr0=choice(1,2)", "only a setting can be searched"),
])
def test_bad_sweeps_fail_naming_the_key(line, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        sweep_space.parse([line])


def test_sweep_space_and_base_values():
    hyp = {"lr0": 0.5, "mosaic": 1.0, "warmup_epochs": 3.0, "momentum": 0.937}
    table = {"lr0": [1, 1e-5, 0.1], "mosaic": [0.5, 0, 1]}
    _, params = sweep_space.parse(MIXED)
    current = {"optimizer": "sgd", "lr0": 0.5, "mosaic": 1.0, "warmup_epochs": 3.0}
    space, base = sweep_space.sweep_space(params, hyp, table, current)
    assert space.keys == ["lr0", "mosaic"] and space.bounds["lr0"].log and not space.bounds["mosaic"].log
    assert space.bounds["mosaic"].gain == 0.5 and space.bounds["lr0"].gain == 1  # the table's gains
    assert set(space.extra) == {"optimizer", "warmup_epochs"}
    assert base["lr0"] == 0.1 and base["mosaic"] == 1.0  # clipped into the searched range
    assert base["optimizer"] == "sgd" and base["warmup_epochs"] == 3.0  # not in range(0,3): drawn instead
    assert base["momentum"] == 0.937  # not searched: kept
    keys = {p.name: p.key for p in params.values()}
    values = {**base, "warmup_epochs": 2}
    assert sweep_space.trial_overrides(space, values, keys) == [
        "hyp.lr0=0.1", "hyp.mosaic=1.0", "optimizer=sgd", "hyp.warmup_epochs=2"]


def test_mutation_search_moves_choices_within_their_options(tmp_path):
    _, params = sweep_space.parse(MIXED)
    hyp = {"lr0": 0.01, "mosaic": 1.0, "warmup_epochs": 3.0}
    space, base = sweep_space.sweep_space(params, hyp, {}, {"optimizer": "sgd", **hyp})
    study = optuna.create_study(direction="maximize", sampler=samplers.MutationSampler(space, base, seed=0))
    samplers.enqueue_base(study, space, base)
    from evolve.trial import suggest

    for _ in range(25):
        t = study.ask()
        suggest(t, space)
        study.tell(t, 1.0 if t.params["optimizer"] == "adamw" else 0.1)
    trials = study.trials
    assert (trials[0].params["lr0"], trials[0].params["optimizer"]) == (0.01, "sgd")  # generation 1: the base
    assert all(t.params["optimizer"] in ("sgd", "adamw") and t.params["warmup_epochs"] in (0, 1, 2) for t in trials)
    assert all(1e-4 <= t.params["lr0"] <= 0.1 for t in trials)
    late = [t.params["optimizer"] for t in trials[10:]]
    assert late.count("adamw") > len(late) / 2  # the best's choice is kept, and redrawn now and then


# ---- the job's side ----------------------------------------------------------------------------------------------
class _Trainer:
    def __init__(self, save_dir):
        self.save_dir, self.epoch, self.metrics, self.results = save_dir, 0, {}, None
        self.cfg = compose("train", ["hyp=scratch-high", "hyp.lr0=0.02"])


def test_trial_callback_reports_prunes_and_records(tmp_path, monkeypatch):
    from evolve.storages import open_storage

    spec = SweepSpec(out_dir=str(tmp_path), storage=None, study_name="evolve", pruner="median", pruner_startup=1,
                     epochs=3)
    study = optuna.create_study(study_name="evolve", storage=open_storage(None, tmp_path), direction="maximize")
    done = study.ask()
    for epoch, value in enumerate((0.5, 0.6, 0.7)):
        done.report(value, epoch)
    study.tell(done, 0.7)
    trial = study.ask()
    monkeypatch.setenv(SWEEP_ENV, spec.to_env())
    cb = TrialCallback(SweepSpec.from_env(), trial.number)
    trainer = _Trainer(tmp_path / "job")
    cb.on_train_start(trainer)
    assert study.trials[trial.number].user_attrs["save_dir"] == str(tmp_path / "job")
    hyp = study.trials[trial.number].user_attrs["hyp"]  # what the job trains with, for evolve.csv
    assert hyp["lr0"] == 0.02 and hyp["mixup"] == 0.1 and "anchors" not in hyp  # scratch-high's mixup
    trainer.metrics = {"fitness": 0.55}
    cb.on_fit_epoch_end(trainer)  # above the median at epoch 0 (0.5): goes on
    trainer.epoch, trainer.metrics = 1, {"fitness": 0.58}  # its best, 0.58, is below the median at epoch 1
    with pytest.raises(StopTraining) as stop:
        cb.on_fit_epoch_end(trainer)
    assert stop.value.pruned
    from yolo.engine.trainer import TrainResults

    trainer.results = TrainResults(precision=0.2, recall=0.3, map50=0.4, map=0.1, val_losses=(1.0, 2.0, 3.0),
                                   epochs_completed=2, pruned=True, save_dir=str(tmp_path / "job"))
    cb.on_train_end(trainer)
    got = study.trials[trial.number].user_attrs[RESULT_ATTR]
    assert got["map50"] == 0.4 and got["val_losses"] == [1.0, 2.0, 3.0] and got["pruned"] is True
    assert study.trials[trial.number].intermediate_values == {0: 0.55, 1: 0.58}


def test_trial_callback_outside_a_sweep_is_none(monkeypatch):
    from evolve.sweep_trial import trial_callback

    monkeypatch.delenv(SWEEP_ENV, raising=False)
    assert trial_callback(None) is None


# ---- presets and discovery ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_presets_select_the_evolve_sweeper(preset):
    cfg = compose("train", [f"hparams_search={preset}"], with_hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("evolve_sweeper.EvolveSweeper")
    assert sweeper.strategy in samplers.STRATEGIES and sweeper.generations >= 1
    for key, text in (sweeper.params or {}).items():  # every preset's space is one the sweeper reads
        sweep_space.parse([f"{key}={text}"])
    assert "hparams_search" not in cfg  # a preset adds no key to the training config


def test_plugin_is_discovered_outside_the_project_folder(tmp_path):
    try:
        importlib.metadata.distribution("yolo-hydra")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("yolo-hydra is not installed (pip install -e .)")
    code = ("from hydra.core.plugins import Plugins\nfrom hydra.plugins.sweeper import Sweeper\n"
            "print([p.__name__ for p in Plugins.instance().discover(Sweeper)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert "EvolveSweeper" in out.stdout


# ---- sweeps end to end -------------------------------------------------------------------------------------------
def _sweep(tiny_shapes, tmp_path, sweep_dir, *extra, env=None, timeout=600):
    args = [a for a in train_overrides(tiny_shapes, tmp_path, "epochs=1", "imgsz=64") if not a.startswith("data")]
    cmd = [sys.executable, "run_train.py", "-m", f"data={tiny_shapes}", *args,
           f"hydra.sweep.dir={tmp_path / sweep_dir}", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _study(tmp_path):
    from evolve.storages import open_storage

    out = tmp_path / "runs" / "train" / "evolve" / "exp"
    return optuna.load_study(study_name="evolve", storage=open_storage(None, out)), out


def _mlflow_family(tmp_path, experiment="yolo"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _job_folders(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) if sweep.is_dir() else []


def test_sweep_with_the_basic_launcher_resumes_and_tracks(tiny_shapes, tmp_path):
    """4 trials over choice, interval, tag(log, interval) and range: upstream's evolve.csv header, one MLflow parent
    with 4 children; the same command again trains nothing more."""
    extra = ["hydra/sweeper=evolve", "hydra.sweeper.generations=4", "hydra.sweeper.strategy=tpe", *MIXED]
    _sweep(tiny_shapes, tmp_path, "sweep1", *extra)
    study, out = _study(tmp_path)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert _job_folders(tmp_path / "sweep1") == ["0", "1", "2", "3"]
    base = trials[0].params
    assert (base["lr0"], base["mosaic"], base["optimizer"]) == (0.01, 1.0, "sgd")  # generation 1: the config's
    for t in trials:
        assert t.params["optimizer"] in ("sgd", "adamw") and 1e-4 <= t.params["lr0"] <= 0.1
        assert t.params["warmup_epochs"] in (0, 1, 2) and 0 <= t.params["mosaic"] <= 1
        job = yaml.safe_load((tmp_path / "sweep1" / str(t.number) / "config.yaml").read_text())
        assert job["hyp"]["lr0"] == t.params["lr0"] and job["optimizer"]["name"].lower() == t.params["optimizer"]
        assert job["hyp"]["warmup_epochs"] == t.params["warmup_epochs"] and job["noval"] is True
    header = (out / "evolve.csv").read_text().splitlines()[0]
    assert [f.strip() for f in header.split(",")] == ISSUE_HEADER.split(", ")[:-1]  # noautoanchor: no anchors
    columns, rows = ledger.read_evolve_csv(out / "evolve.csv")
    assert len(rows) == 4 and [r.hyp["lr0"] for r in rows] == pytest.approx([t.params["lr0"] for t in trials],
                                                                             rel=1e-4)
    assert (out / "hyp_evolve.yaml").is_file() and (out / "evolve.png").is_file()
    assert not list(tmp_path.rglob("*.pt"))  # no checkpoint kept per generation
    best = yaml.safe_load((tmp_path / "sweep1" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"hyp.lr0", "hyp.mosaic", "optimizer", "hyp.warmup_epochs"}
    assert best["best_value"] == pytest.approx(max(t.value for t in trials))
    parents, children = _mlflow_family(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(float(c.data.params["hyp.lr0"]) for c in children) == sorted(t.params["lr0"] for t in trials)

    _sweep(tiny_shapes, tmp_path, "sweep2", *extra)  # the same command again: nothing to do
    study, _ = _study(tmp_path)
    assert len(study.trials) == 4 and _job_folders(tmp_path / "sweep2") == []
    parents, children = _mlflow_family(tmp_path)
    assert len(parents) == 1 and len(children) == 4 and parents[0].info.status == "FINISHED"


def test_sweep_killed_mid_trial_resumes_by_rerunning(tiny_shapes, tmp_path):
    """SIGKILL of the sweep while trial 2 trains, then the same command: trials 0 and 1 are not trained again,
    trial 2's values are trained again once (its retry), and the budget of 4 finished trials is met."""
    extra = ["hydra/sweeper=evolve", "hydra.sweeper.generations=4", "hydra.sweeper.strategy=random", *MIXED[:3]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "YOLO_TRAIN_CALLBACKS": "sweep_helpers:kill_at",
           "SWEEP_TEST_KILL_AT": "2", "SWEEP_TEST_KILL_MARK": str(tmp_path / "killed")}
    args = [a for a in train_overrides(tiny_shapes, tmp_path, "epochs=1", "imgsz=64") if not a.startswith("data")]
    cmd = [sys.executable, "run_train.py", "-m", f"data={tiny_shapes}", *args, *extra]
    out = subprocess.run([*cmd, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == -9 and (tmp_path / "killed").exists(), out.stderr[-3000:]
    study, _ = _study(tmp_path)
    assert [t.state for t in sorted(study.trials, key=lambda t: t.number)] == [TrialState.COMPLETE] * 2 + [
        TrialState.RUNNING]

    _sweep(tiny_shapes, tmp_path, "sweep2", *extra)
    study, out_dir = _study(tmp_path)
    t = sorted(study.trials, key=lambda t: t.number)
    assert [x.state for x in t] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert t[3].params == t[2].params  # the killed trial, retried once
    assert _job_folders(tmp_path / "sweep1") == ["0", "1", "2"] and _job_folders(tmp_path / "sweep2") == ["3", "4"]
    assert len(ledger.read_evolve_csv(out_dir / "evolve.csv")[1]) == 4
    parents, children = _mlflow_family(tmp_path)
    assert len(parents) == 1 and sum(c.info.status == "FINISHED" for c in children) == 4


def test_sweep_with_joblib_runs_two_at_a_time_and_asks_as_slots_free(tiny_shapes, tmp_path):
    """Trial 0's job is slow: with 2 slots, trials 2 and 3 start (in the freed slot) before it ends; in Hydra's
    batches of 2 they would wait for it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "YOLO_TRAIN_CALLBACKS": "sweep_helpers:slow_first",
           "SWEEP_TEST_SLOW_S": "10"}
    _sweep(tiny_shapes, tmp_path, "sweep", "hydra/sweeper=evolve", "hydra.sweeper.generations=4",
           "hydra.sweeper.strategy=random", *MIXED[:3], "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", env=env)
    study, out = _study(tmp_path)
    t = {x.number: x for x in study.trials}
    assert [t[i].state for i in range(4)] == [TrialState.COMPLETE] * 4
    assert t[1].datetime_start < t[0].datetime_complete  # two at once
    assert t[2].datetime_start < t[0].datetime_complete and t[3].datetime_start < t[0].datetime_complete
    assert len({x.user_attrs["worker"] for x in study.trials}) == 2
    parents, children = _mlflow_family(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert len(ledger.read_evolve_csv(out / "evolve.csv")[1]) == 4


def test_jobs_do_not_outlive_a_killed_sweep(tiny_shapes, tmp_path):
    """SIGKILL of the sweep while its joblib jobs train: the jobs' processes end within seconds instead of training
    on, orphaned, beside the retries that the same command run again would start."""
    import signal
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "YOLO_TRAIN_CALLBACKS": "sweep_helpers:pid_and_wait",
           "SWEEP_TEST_PID_DIR": str(pids)}
    args = [a for a in train_overrides(tiny_shapes, tmp_path, "epochs=1", "imgsz=64") if not a.startswith("data")]
    cmd = [sys.executable, "run_train.py", "-m", f"data={tiny_shapes}", *args, "hydra/sweeper=evolve",
           "hydra.sweeper.generations=4", *MIXED[:1], "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs: list[int] = []
    try:
        deadline = time.time() + 180
        while len(list(pids.glob("*.pid"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        jobs = [int(p.read_text()) for p in pids.glob("*.pid")]
        assert len(jobs) == 2, "the two jobs did not start"
        proc.kill()
        proc.wait()

        def alive(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.time() + 20
        while any(alive(p) for p in jobs) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in jobs), "a job trains on after its sweep was killed"
    finally:
        proc.kill()
        for pid in jobs:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_sweep_with_asha_promotes_and_resumes(tiny_shapes, tmp_path):
    """epochs=3, first rung 1 epoch: three candidates, then the best resumed from its checkpoint to 3 epochs."""
    out = _sweep(tiny_shapes, tmp_path, "sweep", "epochs=3", "hydra/sweeper=evolve", "hydra.sweeper.generations=4",
                 "hydra.sweeper.strategy=random", "hydra.sweeper.fidelity=asha", "hydra.sweeper.min_epochs=1",
                 "hyp.lr0=interval(0.001, 0.02)")
    study, evolve_dir = _study(tmp_path)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs["epochs"] for t in trials] == [1, 1, 1, 3]
    assert trials[3].system_attrs["asha:parent"] in (0, 1, 2)
    assert trials[3].params == trials[trials[3].system_attrs["asha:parent"]].params
    rows = list(np.atleast_1d(np.genfromtxt(tmp_path / "sweep" / "3" / "results.csv", delimiter=",", names=True)
                              ["epoch"]))
    assert rows == [1, 2]  # the promotion trained only the epochs its parent had not
    assert "Resuming training from" in out.stdout + out.stderr
    header = (evolve_dir / "evolve.csv").read_text().splitlines()[0]
    assert [f.strip() for f in header.split(",")] == [*ISSUE_HEADER.split(", ")[:-1], "epochs"]
    assert not list(tmp_path.rglob("*.pt"))


def test_mission_grid_still_runs_with_the_basic_sweeper(tiny_shapes, tmp_path):
    """``python run_train.py -m model=yolov5n,yolov5s hyp.lr0=0.001,0.01``: Hydra's grid, 4 jobs, one parent."""
    _sweep(tiny_shapes, tmp_path, "grid", "model=yolov5n,yolov5s", "hyp.lr0=0.001,0.01")
    jobs = _job_folders(tmp_path / "grid")
    assert jobs == ["0", "1", "2", "3"]
    seen = set()
    for j in jobs:
        cfg = yaml.safe_load((tmp_path / "grid" / j / "config.yaml").read_text())
        seen.add((cfg["model"]["width_multiple"], cfg["hyp"]["lr0"]))
    assert seen == {(0.25, 0.001), (0.25, 0.01), (0.5, 0.001), (0.5, 0.01)}
    assert not (tmp_path / "runs" / "train" / "evolve").exists()
    parents, children = _mlflow_family(tmp_path)
    assert len(parents) == 1 and len(children) == 4


def test_sweeper_settings_fail_in_one_line(tiny_shapes, tmp_path):
    args = [a for a in train_overrides(tiny_shapes, tmp_path) if not a.startswith("data")]
    for bad, message in (("hydra.sweeper.eta=1", "hydra.sweeper.eta: must be >= 2"),
                         ("hydra.sweeper.strategy=nope", "hydra.sweeper.strategy: must be one of"),
                         ("hyp.lr0=glob(*)", "glob")):
        cmd = [sys.executable, "run_train.py", "-m", f"data={tiny_shapes}", *args, "hydra/sweeper=evolve", bad,
               f"hydra.sweep.dir={tmp_path / 'bad'}"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert json.loads(SweepSpec(out_dir="x", storage=None, study_name="s").to_env())["out_dir"] == "x"
