"""Training run: config validation, a short real run tracked in MLflow, sweeps, and resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose, train_overrides
from hydra.errors import ConfigCompositionException


@pytest.mark.parametrize("override, key", [("hyp.lr00=0.1", "lr00"), ("epochs=ten", "epochs"),
                                            ("mlflow.enabld=false", "enabld")])
def test_bad_override_rejected_by_schema(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", [override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_bad_override_fails_before_data_loading(tmp_path):
    """The CLI stops at the config, naming the key, before any dataset is touched."""
    env = dict(os.environ, DATASETS_DIR=str(tmp_path / "no_datasets_here"))
    out = subprocess.run([sys.executable, "run_train.py", "hyp.lr00=0.1", f"hydra.run.dir={tmp_path}/run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "lr00" in out.stderr
    assert "Scanning" not in out.stdout + out.stderr
    assert not (tmp_path / "run" / "weights").exists()


def test_short_run_learns_and_is_tracked(tiny_shapes, tmp_path):
    from mlflow.tracking import MlflowClient

    from yolo.checkpoint import load_checkpoint, load_model
    from yolo.train import train

    cfg = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=3", "hyp.lr0=0.05"))
    seen = []
    res = train(cfg, callbacks=[lambda epoch, metrics: seen.append((epoch, metrics["fitness"]))])

    assert [e for e, _ in seen] == [0, 1, 2]
    # from scratch, still inside warmup: the box regression loss is the one that falls first (objectness rises
    # while the model learns where objects are not)
    box = [h["train/box_loss"] for h in res.history]
    assert box[-1] < box[0], box
    save_dir = Path(res.save_dir)
    for name in ("results.csv", "hyp.yaml", "config.yaml", "weights/last.pt", "weights/best.pt"):
        assert (save_dir / name).exists(), name
    assert len((save_dir / "results.csv").read_text().strip().splitlines()) == 1 + 3

    ckpt = load_checkpoint(res.best)
    assert ckpt.source == "native" and ckpt.optimizer is None  # stripped at the end
    model, _ = load_model(res.best)
    assert model.nc == 5

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert float(run.data.params["hyp.lr0"]) == 0.05
    assert run.data.params["model.width_multiple"] == "0.25"
    history = client.get_metric_history(run.info.run_id, "metrics/mAP_0.5:0.95")
    assert [m.step for m in history] == [0, 1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train/box_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "config.yaml", "weights"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/best.pt"]


def test_unreachable_tracking_server_warns_and_trains(tiny_shapes, tmp_path, caplog):
    from yolo.train import train

    cfg = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=1", "noval=true", "noplots=true",
                                           "mlflow.tracking_uri=http://127.0.0.1:9", "mlflow.timeout_s=1"))
    res = train(cfg)
    assert res.last and Path(res.last).exists()
    assert res.mlflow_run_id is None
    assert any("MLflow" in r.getMessage() and "disabled" in r.getMessage() for r in caplog.records)


def test_multirun_sweep_groups_runs_under_one_parent(tiny_shapes, tmp_path):
    """``-m`` with 2 values, run by the joblib launcher in 2 parallel processes: 2 child runs, 1 parent."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    args = [a for a in train_overrides(tiny_shapes, tmp_path, "epochs=1", "noplots=true") if "data" not in a]
    cmd = [sys.executable, "run_train.py", "-m", "hyp.lr0=0.001,0.01", f"data={tiny_shapes}", *args,
           f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("yolo")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(children) == 2 and len(parents) == 1
    assert sorted(float(r.data.params["hyp.lr0"]) for r in children) == [0.001, 0.01]
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED"


def test_sigkill_then_resume_finishes_all_epochs(tiny_shapes, tmp_path):
    """Killed mid-training, resumed from last.pt: all epochs done, in the same folder and the same MLflow run."""
    EPOCHS = 6  # noqa: N806  (long enough that the kill lands before the end on a fast machine)
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "killed"
    args = train_overrides(tiny_shapes, tmp_path, f"epochs={EPOCHS}", "noplots=true")
    cmd = [sys.executable, "run_train.py", *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = run_dir / "weights" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no checkpoint appeared before the kill"
    time.sleep(0.3)  # into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    from yolo.checkpoint import load_checkpoint

    killed_at = load_checkpoint(last).epoch
    # a finished run's stripped last.pt says epoch -1: the kill must come before the last epoch ends
    assert 0 <= killed_at < EPOCHS - 1, "the run finished before it could be killed; make it longer"
    run_id = load_checkpoint(last).extra["mlflow_run_id"]
    assert run_id
    places = [a for a in args if a.split("=")[0] in ("data", "data.file", "mlflow.tracking_uri", "workers", "device")]
    out = subprocess.run([sys.executable, "run_train.py", f"resume={last}", *places,
                          f"hydra.run.dir={tmp_path / 'resume_launch'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = (run_dir / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == list(range(EPOCHS))
    assert "Resuming training from" in out.stdout + out.stderr
    assert load_checkpoint(last).optimizer is None  # finished: stripped, as upstream does at the end
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("yolo").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resumed run continued, no second run
    assert runs[0].info.status == "FINISHED"
    assert not (tmp_path / "resume_launch").exists()  # the resume wrote into its run's folder only
    steps = [m.step for m in client.get_metric_history(run_id, "metrics/mAP_0.5")]
    assert sorted(set(steps)) == list(range(EPOCHS))
