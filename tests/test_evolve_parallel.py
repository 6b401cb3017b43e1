"""Several processes against one journal storage, and workers killed with SIGKILL mid-generation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import ledger
from evolve.driver import evolve
from evolve.samplers import BASE_ATTR
from fake_train import compose, fake_train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process checks")


def overrides(out: Path, generations: int, *extra: str) -> list[str]:
    return [f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false", "evolve.plot=false",
            "epochs=1", "model=yolov5n", "evolve.poll_s=0.2", "evolve.train_fn=fake_train:fake_train", *extra]


def launch(out: Path, generations: int, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_evolve.py", *overrides(out, generations, *extra)], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, out))


def check_ledger(out: Path, generations: int) -> optuna.Study:
    """Every finished generation appears in evolve.csv exactly once, in trial order, and nothing else does."""
    study = load(out)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == generations
    _, rows = ledger.read_evolve_csv(out / ledger.CSV_NAME)
    assert len(rows) == generations
    expected = ledger.study_rows(study.trials, {})
    assert [r.hyp for r in rows] == [{k: ledger.mutation.csv_value(v) for k, v in r.hyp.items() if v is not None}
                                     for r in expected]
    assert len({tuple(sorted(r.hyp.items())) for r in rows}) == generations  # no generation twice
    assert sum(bool(t.user_attrs.get(BASE_ATTR)) for t in study.trials) == 1  # one base trial
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return study


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def test_two_worker_processes_share_one_journal(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_FAKE_TRAIN_SLEEP", "0.3")
    cfg = compose(overrides(tmp_path, 6, "evolve.workers=2"))
    res = evolve(cfg)
    assert res.completed == 6 and res.failed == 0
    study = check_ledger(tmp_path, 6)
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert len({t.system_attrs[ledger.OWNER_ATTR]["pid"] for t in study.trials}) == 2


def test_two_copies_of_the_command_against_one_storage(tmp_path):
    procs = [launch(tmp_path, 6, YOLO_FAKE_TRAIN_SLEEP="1.0") for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = check_ledger(tmp_path, 6)
    assert len({t.system_attrs[ledger.OWNER_ATTR]["pid"] for t in study.trials}) == 2  # both did work


def test_sigkill_mid_generation_then_resume(tmp_path):
    markers = tmp_path / "markers"
    proc = launch(tmp_path / "evo", 5, YOLO_FAKE_TRAIN_MARKERS=str(markers), YOLO_FAKE_TRAIN_HANG_AT="2")
    wait_for(markers / ".hanging", proc)
    pid = int((markers / ".hanging").read_text().split()[0])
    assert pid == proc.pid
    os.kill(pid, signal.SIGKILL)  # mid-generation: trial 2 is RUNNING
    proc.wait(30)
    assert [t.state for t in load(tmp_path / "evo").trials][2] == TrialState.RUNNING

    res = evolve(compose(overrides(tmp_path / "evo", 5)), train_fn=fake_train)  # the same command again
    assert res.completed == 5 and res.failed == 1
    study = check_ledger(tmp_path / "evo", 5)
    killed = study.trials[2]
    assert killed.state == TrialState.FAIL and f"worker process {pid} died" in killed.user_attrs[ledger.FAIL_ATTR]
    retries = [t for t in study.trials if t.system_attrs.get("retry_history") == [2]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params  # the lost generation is run again, not a new one
    assert 2 not in [r.number for r in ledger.study_rows(study.trials, {})]


def test_sigkill_one_of_two_workers_the_other_retries(tmp_path):
    markers = tmp_path / "markers"
    proc = launch(tmp_path / "evo", 6, "evolve.workers=2", YOLO_FAKE_TRAIN_MARKERS=str(markers),
                  YOLO_FAKE_TRAIN_HANG_AT="2", YOLO_FAKE_TRAIN_SLEEP="0.2")
    wait_for(markers / ".hanging", proc)
    pid, name = (markers / ".hanging").read_text().split()
    assert int(pid) != proc.pid  # a worker process, not the main one
    os.kill(int(pid), signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    study = check_ledger(tmp_path / "evo", 6)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and f"trial{failed[0].number:04d}" == name
    assert "died" in failed[0].user_attrs[ledger.FAIL_ATTR]
    retry = [t for t in study.trials if t.system_attrs.get("retry_history") == [failed[0].number]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == failed[0].params
