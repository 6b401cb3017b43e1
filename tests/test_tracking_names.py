"""Run names that tell MLflow runs apart, and a sweep's parent that names its best job (issue 14 item 6)."""

from __future__ import annotations

import logging
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose, train_overrides

from yolo.config import MlflowConfig
from yolo.tracking import (
    HydraJob,
    Tracker,
    best_child,
    finish_sweep,
    generation_run_name,
    overrides_run_name,
    run_name_for_training,
    training_run_name,
)
from yolo.tracking.hydra_job import read_sweep_overrides, swept_overrides
from yolo.tracking.names import MAX_NAME_LENGTH, data_label, model_label
from yolo.tracking.parents import PARENT_RUN_ID_TAG, SWEEP_JOB_TAG, SWEEP_OVERRIDES_TAG
from yolo.tracking.sweep import summary_line


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


# ---- the naming functions ---------------------------------------------------------------------------------------


def test_training_run_name_says_model_data_and_folder():
    assert training_run_name("yolov5s", "coco128", "exp3") == "yolov5s-coco128-exp3"
    assert model_label("yolov5n", None, None) == "yolov5n"
    assert model_label(None, None, "/w/yolov5s.pt") == "yolov5s"  # architecture from the weights
    assert model_label(None, {"depth_multiple": 0.33, "width_multiple": 0.25}, None) == "yolov5-d0.33-w0.25"
    assert data_label("coco128", None) == "coco128"
    assert data_label("external", {"file": "/d/my_set.yaml"}) == "my_set"
    assert data_label(None, {"path": "/datasets/tiny"}) == "tiny"
    assert data_label(None, "sets/custom.yaml") == "custom"


def test_names_from_a_hydra_job():
    cfg = {"mlflow": {"run_name": None}, "model": {"depth_multiple": 0.33}, "weights": None, "data": {}}
    run = HydraJob(overrides=("epochs=3",), choices={"model": "yolov5n", "data": "coco128"})
    assert run_name_for_training(cfg, "/r/train/2024-05-01_12-00-00_exp", run) == \
        "yolov5n-coco128-2024-05-01_12-00-00_exp"
    child = HydraJob(overrides=("model=yolov5s", "hyp.lr0=0.01", "epochs=1"), choices={"model": "yolov5s"},
                     sweep_dir="/r/train/multirun/2024-05-01", job_num=3,
                     sweep_overrides=("model=yolov5n,yolov5s", "hyp.lr0=0.001,0.01", "epochs=1"))
    assert run_name_for_training(cfg, "/r/train/multirun/2024-05-01/3", child) == "hyp.lr0=0.01,model=yolov5s"
    # a multirun whose overrides do not vary: the sweep folder and the job number tell the jobs apart
    same = HydraJob(overrides=("epochs=1",), choices={"model": "yolov5n", "data": "coco128"},
                    sweep_dir="/r/train/multirun/2024-05-01", job_num=0, sweep_overrides=("epochs=1",))
    assert run_name_for_training(cfg, "/r/train/multirun/2024-05-01/0", same) == "yolov5n-coco128-2024-05-01-job0"
    # an explicit mlflow.run_name wins everywhere
    explicit = {**cfg, "mlflow": {"run_name": "mine"}}
    assert run_name_for_training(explicit, "/r/x", child) == "mine"
    assert generation_run_name("exp", 7) == "exp-gen7"


def test_swept_overrides_keep_only_what_varies(tmp_path):
    job = ["hyp.lr0=0.01", "epochs=1", "noplots=True", "mlflow.tracking_uri=sqlite\\:////tmp/x.db", "model=yolov5s"]
    sweep = ["hyp.lr0=0.001,0.01", "epochs=1", "noplots=true", "mlflow.tracking_uri=sqlite:////tmp/x.db"]
    # model= is not on the sweep's command line (a sweeper's params): it varies
    assert swept_overrides(job, sweep) == ["hyp.lr0=0.01", "model=yolov5s"]
    assert swept_overrides(job, ["hyp.lr0=range(0,1,0.5)", "epochs=1", "noplots=true",
                                 "mlflow.tracking_uri=x"]) == ["hyp.lr0=0.01", "model=yolov5s"]
    assert swept_overrides(job, None) == job  # unknown sweep: every override is kept

    good = tmp_path / "multirun.yaml"
    good.write_text("hydra:\n  overrides:\n    task:\n    - hyp.lr0=0.001,0.01\n    - epochs=1\n")
    assert read_sweep_overrides(good) == ("hyp.lr0=0.001,0.01", "epochs=1")
    for text in ("hydra: [1, 2]\n", "hydra:\n  overrides:\n    task: 5\n", ": : bad yaml ["):
        good.write_text(text)
        assert read_sweep_overrides(good) is None
    good.write_bytes(b"#" * (2 << 20))  # larger than any sweep config: not read
    assert read_sweep_overrides(good) is None
    assert read_sweep_overrides(tmp_path / "missing.yaml") is None


def test_overrides_names_are_short_and_distinct():
    assert overrides_run_name(["model=yolov5s", "hyp.lr0=0.01"]) == "hyp.lr0=0.01,model=yolov5s"
    assert overrides_run_name(["data.file=/very/long/path/to/the/custom_set.yaml"]) == "data.file=custom_set.yaml"
    long_value = "x" * 100
    assert overrides_run_name([f"name={long_value}"]) == f"name={'x' * 29}..."
    many_a = [f"hyp.k{i}={i}" for i in range(30)] + ["hyp.lr0=0.001"]
    many_b = [f"hyp.k{i}={i}" for i in range(30)] + ["hyp.lr0=0.01"]
    a, b = overrides_run_name(many_a), overrides_run_name(many_b)
    assert len(a) == len(b) == MAX_NAME_LENGTH and a != b  # cut with a digest of the whole


# ---- MLflow never picks the name from the seeded global random -----------------------------------------------------


def test_runs_started_after_the_same_seed_get_different_names(tmp_path):
    names = []
    for _ in range(2):
        random.seed(1)  # what the trainer does before it starts tracking
        t = Tracker(MlflowConfig(experiment="seeded"), default_dir=tmp_path)
        run_id = t.start({}, {})
        t.end()
        names.append(_client(tmp_path / "mlflow.db").get_run(run_id).info.run_name)
    assert names[0] != names[1], names


@pytest.mark.timeout(300)
def test_two_trainings_with_the_same_seed_have_distinct_descriptive_names(tiny_shapes, tmp_path):
    """The runs table once showed one random name for every training: the trainer seeds `random` first."""
    from yolo.train import train

    cfg = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=1", "noval=true", "noplots=true",
                                           "imgsz=64", "seed=0"))
    results = [train(cfg) for _ in range(2)]
    client = _client(tmp_path / "mlflow.db")
    names = [client.get_run(r.mlflow_run_id).info.run_name for r in results]
    folders = [Path(r.save_dir).name for r in results]
    assert folders[0] != folders[1]
    assert names[0] != names[1], names
    assert names == [f"yolov5-d0.33-w0.25-tiny_shapes-{f}" for f in folders], names


# ---- a sweep's parent names its best child -----------------------------------------------------------------------


def _run(run_id, status="FINISHED", metrics=None, tags=None, name=""):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, run_name=name),
                           data=SimpleNamespace(metrics=metrics or {}, tags=tags or {}))


def test_best_child_and_summary_line():
    runs = [
        _run("a", metrics={"best_fitness": 0.2}, tags={SWEEP_JOB_TAG: "0", SWEEP_OVERRIDES_TAG: "hyp.lr0=0.001"}),
        _run("b", metrics={"best_fitness": 0.5, "fitness": 0.4}, tags={SWEEP_JOB_TAG: "1",
                                                                       SWEEP_OVERRIDES_TAG: "hyp.lr0=0.01"}),
        _run("c", status="FAILED", metrics={"best_fitness": 0.9}),  # did not finish: not a result
        _run("d", metrics={"best_fitness": float("nan")}),
        _run("e", metrics={"fitness": 0.5}, tags={SWEEP_JOB_TAG: "2"}),  # ties with b: the lower job wins
    ]
    best = best_child(runs)
    assert best.run_id == "b" and best.job == 1 and best.overrides == "hyp.lr0=0.01"
    assert summary_line(best) == "Sweep best: job 1 (hyp.lr0=0.01) fitness 0.50000, run b"
    assert best_child([_run("x", status="FAILED")]) is None
    assert summary_line(None).startswith("Sweep best: no finished job")


def test_finish_sweep_records_the_best_child_on_the_parent(tmp_path, caplog):
    tracker = Tracker(MlflowConfig(experiment="sweep"), default_dir=tmp_path)
    parent = tracker.get_or_create_parent(None, "sweep s", key_tag=str(tmp_path / "s"))
    children = []
    for job, (lr, fit) in enumerate([(0.001, 0.3), (0.01, 0.7), (0.1, 0.1)]):
        child = Tracker(MlflowConfig(experiment="sweep", parent_run_id=parent), default_dir=tmp_path)
        children.append(child.start({"hyp.lr0": lr}, {SWEEP_JOB_TAG: job, SWEEP_OVERRIDES_TAG: f"hyp.lr0={lr}"},
                                    run_name=f"hyp.lr0={lr}"))
        for epoch, f in enumerate((fit / 2, fit)):
            child.log_metrics({"fitness": f, "best_fitness": f}, step=epoch)
        child.end()
    with caplog.at_level(logging.INFO, logger="yolo"):
        best = finish_sweep(Tracker(MlflowConfig(experiment="sweep"), default_dir=tmp_path), parent)
    assert best.run_id == children[1]
    run = _client(tmp_path / "mlflow.db").get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_fitness"] == pytest.approx(0.7)
    assert run.data.tags["best_overrides"] == "hyp.lr0=0.01" and run.data.tags["best_run_id"] == children[1]
    assert run.data.tags["best_job"] == "1"
    assert f"Sweep best: job 1 (hyp.lr0=0.01) fitness 0.70000, run {children[1]}" in caplog.text


@pytest.mark.timeout(600)
def test_sweep_children_are_named_by_their_overrides_and_the_parent_by_the_best(tiny_shapes, tmp_path):
    """``-m hyp.lr0=0.001,0.01`` (Hydra's basic launcher: both jobs in one process, seeded alike)."""
    args = [a for a in train_overrides(tiny_shapes, tmp_path, "epochs=1", "noplots=true", "imgsz=64")
            if "data" not in a]
    cmd = [sys.executable, "run_train.py", "-m", "hyp.lr0=0.001,0.01", f"data={tiny_shapes}", *args,
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    client = _client(tmp_path / "mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("yolo").experiment_id])
    children = [r for r in runs if PARENT_RUN_ID_TAG in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["hyp.lr0=0.001", "hyp.lr0=0.01"]
    assert sorted(r.data.tags[SWEEP_JOB_TAG] for r in children) == ["0", "1"]
    parent = client.get_run(children[0].data.tags[PARENT_RUN_ID_TAG])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep sweep"
    best = max(children, key=lambda r: (r.data.metrics["best_fitness"], -int(r.data.tags[SWEEP_JOB_TAG])))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_overrides"] == best.info.run_name
    assert parent.data.metrics["best_fitness"] == pytest.approx(best.data.metrics["best_fitness"])
    pattern = r"Sweep best: job (\d) \((hyp\.lr0=[0-9.]+)\) fitness ([0-9.]+), run (\w+)"
    line = re.search(pattern, out.stdout + out.stderr)
    assert line, (out.stdout + out.stderr)[-3000:]
    assert line.group(1) == best.data.tags[SWEEP_JOB_TAG] and line.group(2) == best.info.run_name
    assert line.group(4) == best.info.run_id
