"""Tests for yolo.tracking: real local MLflow stores in tmp_path, loopback HTTP only."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from yolo.config import MlflowConfig
from yolo.tracking import (
    PARENT_RUN_ID_TAG,
    Tracker,
    artifact_location_for,
    command_line,
    flatten_dict,
    git_commit,
    resolve_tracking_uri,
    sanitize_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BOX, MAP = "train/box_loss", "metrics/mAP_0.5:0.95"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the local tests (creating one runs ~2 s of schema migrations);
    each test uses its own experiment (see ``cfg``)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def cfg(request) -> MlflowConfig:
    return MlflowConfig(experiment=request.node.name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "yolo.tracking" and r.levelno == logging.WARNING]


# ---- helpers ---------------------------------------------------------------------------------


def test_flatten_dict():
    d = {"hyp": {"lr0": 0.01, "aug": {"mosaic": 1.0}}, "epochs": 3, "names": ["a", "b"], "empty": {}}
    assert flatten_dict(d) == {"hyp.lr0": 0.01, "hyp.aug.mosaic": 1.0, "epochs": 3, "names": ["a", "b"]}
    assert flatten_dict({"a": {"b": 1}}, sep="/") == {"a/b": 1}


def test_sanitize_name():
    assert sanitize_name(BOX) == BOX
    if os.name != "nt":
        assert sanitize_name(MAP) == MAP
    assert sanitize_name("a//b/") == "a/b"
    assert sanitize_name("/x/./y") == "x/y"
    assert sanitize_name("lr@0") == "lr_0"
    long = sanitize_name("k" * 300)
    assert len(long) == 250 and long == sanitize_name("k" * 300)


def test_git_commit_and_command_line(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository: None, no exception
    assert git_commit(tmp_path / "does-not-exist") is None
    sha = git_commit(REPO_ROOT)
    assert sha is None or len(sha) == 40
    assert command_line().startswith("python")


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    cfg = MlflowConfig()
    uri = resolve_tracking_uri(cfg, tmp_path / "runs")
    assert uri == "sqlite:///" + (tmp_path / "runs" / "mlflow.db").resolve().as_posix()
    assert artifact_location_for(uri) == (tmp_path / "runs" / "mlartifacts").resolve().as_uri()
    assert artifact_location_for("http://127.0.0.1:5000") is None
    cfg.tracking_uri = "http://127.0.0.1:5000"
    assert resolve_tracking_uri(cfg, tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert resolve_tracking_uri(cfg, tmp_path) == "sqlite:////elsewhere/x.db"


# ---- local store -----------------------------------------------------------------------------


def test_run_roundtrip(tmp_path, store, cfg):
    art = tmp_path / "results.csv"
    art.write_text("epoch,map\n0,0.1\n")
    params = {"hyp": {"lr0": 0.01, "momentum": 0.937}, "epochs": 3, "long": "x" * 7000}
    params.update({f"many.p{i}": i for i in range(250)})  # > 100: several log_batch calls

    cfg.run_name = "r1"
    tracker = Tracker(cfg, default_dir=store)
    with tracker:
        run_id = tracker.start(params, tags={"task": "train"})
        assert run_id is not None and tracker.run_id == run_id and tracker.active
        odd = {"skip": "not-a-number", "skip2": np.zeros(3), "np": np.float32(0.5), "nan": float("nan")}
        for step in range(3):
            tracker.log_metrics({BOX: 0.1 / (step + 1), MAP: np.float64(0.2 * step), **odd}, step=step)
        tracker.log_artifact(art)
    assert not tracker.active and tracker.enabled

    assert (store / "mlflow.db").is_file()
    client = _client(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())
    p = run.data.params
    assert p["hyp.lr0"] == "0.01" and p["hyp.momentum"] == "0.937" and p["epochs"] == "3"
    assert len(p["long"]) == 6000 and p["many.p249"] == "249"
    assert run.data.tags["task"] == "train"
    assert "yolo.command" in run.data.tags
    assert PARENT_RUN_ID_TAG not in run.data.tags
    for name in (BOX, MAP):
        hist = client.get_metric_history(run_id, sanitize_name(name))
        assert sorted(m.step for m in hist) == [0, 1, 2]
    assert "skip" not in run.data.metrics and "skip2" not in run.data.metrics
    assert run.data.metrics["np"] == 0.5 and math.isnan(run.data.metrics["nan"])
    assert [f.path for f in client.list_artifacts(run_id)] == ["results.csv"]


def test_log_artifacts_dir_and_tags(tmp_path, store, cfg):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "last.pt").write_bytes(b"\0" * 10)
    (d / "best.pt").write_bytes(b"\1" * 10)
    tracker = Tracker(cfg, default_dir=store)
    run_id = tracker.start({"a": 1}, {})
    tracker.log_artifacts(d, artifact_path="weights")
    tracker.set_tags({"best_fitness": 0.5})
    tracker.end()
    client = _client(tracker.tracking_uri)
    assert sorted(f.path for f in client.list_artifacts(run_id, "weights")) == ["weights/best.pt", "weights/last.pt"]
    assert client.get_run(run_id).data.tags["best_fitness"] == "0.5"


def test_parent_and_children_from_separate_trackers(tmp_path, store):
    runs = store
    key = str(tmp_path / "multirun" / "2024-01-01")
    trackers = [Tracker(MlflowConfig(experiment="sweep"), default_dir=runs) for _ in range(2)]
    parents = [t.get_or_create_parent(None, "sweep-parent", key) for t in trackers]
    assert parents[0] is not None and parents[0] == parents[1]
    children = []
    for i, t in enumerate(trackers):
        children.append(t.start({"job": i}, {}))
        t.log_metrics({MAP: 0.1 * i}, step=0)
        t.end()
    client = _client(trackers[0].tracking_uri)
    for c in children:
        assert client.get_run(c).data.tags[PARENT_RUN_ID_TAG] == parents[0]
    exp_id = client.get_experiment_by_name("sweep").experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{parents[0]}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)

    # parent id handed over through the config (how the evolution driver passes it on)
    t3 = Tracker(MlflowConfig(experiment="sweep", parent_run_id=parents[0]), default_dir=runs)
    c3 = t3.start({}, {})
    t3.end()
    assert client.get_run(c3).data.tags[PARENT_RUN_ID_TAG] == parents[0]

    trackers[0].finish_parent(parents[0])
    assert client.get_run(parents[0]).info.status == "FINISHED"
    # a finished parent is not reused: the same key now gets a fresh parent
    new_parent = Tracker(MlflowConfig(experiment="sweep"), default_dir=runs).get_or_create_parent(None, "p", key)
    assert new_parent not in (None, parents[0])


def test_start_parent_nested(store, cfg):
    t = Tracker(cfg, default_dir=store)
    parent = t.start_parent("evolve", {"kind": "evolve"})
    ids = []
    for gen in range(2):  # one tracker, several child runs one after another
        ids.append(t.start({"gen": gen}, {}))
        t.log_metrics({"fitness": gen}, step=gen)
        t.end()
    t.finish_parent()
    client = _client(t.tracking_uri)
    assert len(set(ids)) == 2
    assert all(client.get_run(i).data.tags[PARENT_RUN_ID_TAG] == parent for i in ids)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["kind"] == "evolve"


_WORKER = textwrap.dedent(
    """
    import sys
    from yolo.config import MlflowConfig
    from yolo.tracking import Tracker
    runs, key, job = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = Tracker(MlflowConfig(experiment="mp"), default_dir=runs)
    parent = t.get_or_create_parent(None, "parent", key)
    assert parent, "no parent"
    rid = t.start({"job": job, "hyp": {"lr0": 0.01 * job}}, {})
    assert rid, "no run"
    for step in range(5):
        t.log_metrics({"metrics/mAP_0.5:0.95": step * 0.1, "train/box_loss": 1.0 / (step + 1)}, step)
    t.end()
    assert t.enabled
    print(parent, rid)
    """
)


def test_multiprocess_sweep_shares_parent_and_sqlite(tmp_path):
    """Parallel jobs (separate processes) on a fresh SQLite store: one parent, N children."""
    runs, n = tmp_path / "runs", 3
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(runs), "sweep-key", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "MLflow tracking disabled" not in err, err
    pairs = [o.split() for o, _ in outs]
    parents = {p for p, _ in pairs}
    assert len(parents) == 1
    client = _client(resolve_tracking_uri(MlflowConfig(), runs))
    parent = parents.pop()
    for _, rid in pairs:
        run = client.get_run(rid)
        assert run.data.tags[PARENT_RUN_ID_TAG] == parent and run.info.status == "FINISHED"
        assert len(client.get_metric_history(rid, "metrics/mAP_0.5:0.95")) == 5
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_continues_the_same_run(store, cfg):
    t1 = Tracker(cfg, default_dir=store)
    run_id = t1.start({"epochs": 3, "hyp": {"lr0": 0.01}}, {})
    for step in range(2):
        t1.log_metrics({BOX: 1.0 / (step + 1)}, step)
    # the process "dies" here: no end(); the run stays RUNNING
    t1._unregister_atexit()
    client = _client(t1.tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    client.set_terminated(run_id, status="FAILED")  # or it was marked failed at exit

    t2 = Tracker(cfg, default_dir=store)
    assert t2.start({"epochs": 5, "hyp": {"lr0": 0.01}, "resume": True}, {}, resume_run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    t2.log_metrics({BOX: 1.0 / 3}, 2)
    t2.end()
    assert t2.enabled  # a changed param on resume is not an error
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["resume"] == "True"
    assert [m.step for m in client.get_metric_history(run_id, BOX)] == [0, 1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_context_manager_marks_failure(store, cfg):
    t = Tracker(cfg, default_dir=store)
    with pytest.raises(RuntimeError), t:
        run_id = t.start({}, {})
        raise RuntimeError("boom")
    assert _client(t.tracking_uri).get_run(run_id).info.status == "FAILED"


def test_disabled_config_does_nothing(tmp_path):
    t = Tracker(MlflowConfig(enabled=False), default_dir=tmp_path)
    assert t.start({"a": 1}, {}) is None and t.get_or_create_parent(None, "p", "k") is None
    t.log_metrics({"a": 1.0}, 0)
    t.log_artifact(tmp_path / "nothing")
    t.end()
    assert list(tmp_path.iterdir()) == []


# ---- failures never kill the run ---------------------------------------------------------------


def test_unreachable_server_disables_quickly(tmp_path, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"
    t = Tracker(MlflowConfig(tracking_uri=uri, timeout_s=2.0), default_dir=tmp_path)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert t.start({"hyp": {"lr0": 0.01}}, {"task": "train"}) is None
        assert t.get_or_create_parent(None, "p", "k") is None
        t.log_metrics({BOX: 1.0}, 0)
        t.log_artifact(__file__)
        t.set_tags({"a": 1})
        t.end()
        t.finish_parent("abc")
    assert time.monotonic() - t0 < 5
    assert not t.enabled and t.run_id is None
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(f"MLflow tracking disabled: cannot reach {uri}")


def test_silent_server_times_out(tmp_path, caplog):
    """A port that accepts connections but never answers (hung server) fails after timeout_s."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # never accept(): the kernel completes handshakes, nobody replies
        uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t = Tracker(MlflowConfig(tracking_uri=uri, timeout_s=1.0), default_dir=tmp_path)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert t.start({}, {}) is None
            t.log_metrics({BOX: 1.0}, 0)
            t.end()
        assert time.monotonic() - t0 < 4
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and msgs[0].startswith(f"MLflow tracking disabled: cannot reach {uri}")


def test_bad_uri_disables(tmp_path, caplog):
    t = Tracker(MlflowConfig(tracking_uri="nosuchscheme://x/y"), default_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        assert t.start({}, {}) is None
        t.log_metrics({"a": 1.0}, 0)
        t.end()
    assert not t.enabled
    assert len(_warnings(caplog)) == 1


def test_failure_mid_run_disables_once(store, cfg, caplog):
    t = Tracker(cfg, default_dir=store)
    assert t.start({}, {})

    def broken(*a, **k):
        raise ConnectionError("server went away")

    t.client.log_batch = broken
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            t.log_metrics({BOX: 1.0}, step)
        t.set_tags({"x": 1})
        t.end()
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "logging metrics failed" in msgs[0] and "server went away" in msgs[0]
    assert not t.enabled


# ---- a real tracking server over loopback --------------------------------------------------------


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("mlflow server did not become ready")


@pytest.mark.timeout(180)  # `mlflow server` needs ~10-20 s to start on 2 cores; the whole test takes ~25 s
def test_end_to_end_http_server(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    art_dir = tmp_path / "art"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{(tmp_path / 'db.sqlite').as_posix()}",
        "--artifacts-destination", art_dir.as_uri(),
    ]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        _wait_health(uri, proc)
        (tmp_path / "best.pt").write_bytes(b"weights")
        t = Tracker(MlflowConfig(tracking_uri=uri, experiment="http"), default_dir=tmp_path / "runs")
        parent = t.start_parent("sweep")
        run_id = t.start({"hyp": {"lr0": 0.01}}, {"task": "train"})
        assert run_id, (tmp_path / "server.log").read_text()[-2000:]
        for step in range(3):
            t.log_metrics({BOX: 1.0 / (step + 1), MAP: 0.1 * step}, step)
        t.log_artifact(tmp_path / "best.pt", artifact_path="weights")
        t.end()
        t.finish_parent()
        assert t.enabled

        client = _client(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["hyp.lr0"] == "0.01"
        assert run.data.tags[PARENT_RUN_ID_TAG] == parent
        assert [m.step for m in client.get_metric_history(run_id, MAP)] == [0, 1, 2]
        assert [f.path for f in client.list_artifacts(run_id, "weights")] == ["weights/best.pt"]
        assert list(art_dir.rglob("best.pt"))  # proxied upload landed in --artifacts-destination
        assert not (tmp_path / "runs").exists()  # nothing local for a remote store
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
