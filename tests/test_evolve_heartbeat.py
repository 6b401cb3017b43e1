"""Journal storage: a generation owned by a worker that cannot be checked (another host id) is failed and queued
again once silent past the grace; a worker that beats is left alone; a waiting worker says what it waits for."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import beats, driver, ledger, settings
from fake_train import compose, fake_train

REPO = Path(__file__).resolve().parents[1]
FOREIGN = {"host": "node-gone/3f2a/pid:[4026531836]", "pid": 4242, "start": 17}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process checks")


def overrides(out: Path, generations: int, *extra: str) -> list[str]:
    return [f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false", "evolve.plot=false",
            "epochs=1", "model=yolov5n", "evolve.poll_s=0.2", "evolve.train_fn=fake_train:fake_train", *extra]


def command(out: Path, generations: int, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "run_evolve.py", *overrides(out, generations, *extra)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])}, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the rerun hangs ({timeout}s):\n{e.stdout}\n{e.stderr}") from None
    return p, time.monotonic() - t0


def foreign_running_trial(out: Path) -> optuna.trial.FrozenTrial:
    """A generation that a worker on another machine (or before a reboot) asked for, then vanished."""
    setup = settings.Setup(compose(overrides(out, 3)))
    study = setup.open_study()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    for k in setup.space.tuned_keys:
        trial.suggest_float(k, setup.space.bounds[k].lower, setup.space.bounds[k].upper)
    study._storage.set_trial_system_attr(trial._trial_id, ledger.OWNER_ATTR, FOREIGN)
    beat = out / (ledger.JOURNAL_NAME + ".beats") / f"trial-{trial._trial_id}.json"  # its last beat, long ago
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text(json.dumps({"trial_id": trial._trial_id, "owner": FOREIGN, "seq": 9, "time": 1.0}))
    return study._storage.get_trial(trial._trial_id)


def test_rerun_after_a_host_change_fails_the_vanished_generation_within_the_grace(tmp_path):
    out = tmp_path / "ev"
    driver.evolve(compose(overrides(out, 2)), train_fn=fake_train)
    _, startup = command(out, 2, timeout=300)  # nothing to train: what starting the command costs here
    t = foreign_running_trial(out)
    grace = 3 + int(startup)  # the rerun must still be waiting after its own start (importing torch...)
    p, elapsed = command(out, 3, "evolve.heartbeat_s=1", f"evolve.heartbeat_grace_s={grace}", timeout=startup + 90)
    assert p.returncode == 0, p.stdout + p.stderr
    print(f"rerun {elapsed:.1f}s, of which starting the command {startup:.1f}s, grace {grace}s")
    assert elapsed < startup + grace + 15, (elapsed, startup)
    log = p.stdout + p.stderr
    assert f"waiting for other workers: trial {t.number} (worker 4242 on node-gone, silent" in log
    study = optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, out))
    gone = study.trials[t.number]
    assert gone.state == TrialState.FAIL
    assert gone.user_attrs[ledger.FAIL_ATTR] == f"no heartbeat for {grace}s: worker 4242 on node-gone is gone"
    retry = [x for x in study.trials if x.system_attrs.get("retry_history") == [t.number]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t.params
    assert sum(x.state == TrialState.COMPLETE for x in study.trials) == 3
    assert not (out / (ledger.JOURNAL_NAME + ".beats") / f"trial-{t._trial_id}.json").exists()


def running_trial(tmp_path: Path, owner) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    study = optuna.create_study(storage=ledger.open_storage(None, tmp_path), study_name="s", direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    trial.suggest_float("a", 0, 1)
    study._storage.set_trial_system_attr(trial._trial_id, ledger.OWNER_ATTR, owner)
    return study, study._storage.get_trial(trial._trial_id)


def test_a_remote_worker_that_beats_is_left_alone_then_failed_once_silent(tmp_path):
    study, trial = running_trial(tmp_path, FOREIGN)
    journal = tmp_path / ledger.JOURNAL_NAME
    watcher, worker = beats.JournalBeats(journal, 1, 2), beats.JournalBeats(journal, 1, 2)
    t0, seq = time.monotonic(), 0
    while time.monotonic() - t0 < 5:  # beating for more than twice the grace
        worker.beat(trial._trial_id, seq)
        last_beat, seq = time.monotonic(), seq + 1
        assert beats.recover_silent_trials(study, watcher, max_retries=1) == []
        time.sleep(0.5)
    failed = []
    while not failed and time.monotonic() - last_beat < 10:
        time.sleep(0.2)
        failed = beats.recover_silent_trials(study, watcher, max_retries=1)
    assert failed == [trial.number] and 2 <= time.monotonic() - last_beat < 4
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert study.get_trials()[1].params == trial.params
    assert not worker.path(trial._trial_id).exists()


def test_a_live_worker_of_this_machine_needs_no_beat(tmp_path):
    study, trial = running_trial(tmp_path, ledger.owner_info())
    watcher = beats.JournalBeats(tmp_path / ledger.JOURNAL_NAME, 1, 2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        assert beats.recover_silent_trials(study, watcher, max_retries=1) == []
        time.sleep(0.3)


@pytest.mark.parametrize("owner", [None, {"host": FOREIGN["host"], "pid": "x"}, ["not", "a", "mapping"]])
def test_an_owner_that_cannot_be_read_is_judged_by_its_silence(tmp_path, owner):
    study, trial = running_trial(tmp_path, owner)
    watcher = beats.JournalBeats(tmp_path / ledger.JOURNAL_NAME, 1, 2)
    watcher.folder.mkdir()
    os.mkfifo(watcher.path(trial._trial_id))  # a beat file that would block a plain open()
    assert beats.recover_silent_trials(study, watcher, max_retries=0) == []
    time.sleep(2.3)
    assert beats.recover_silent_trials(study, watcher, max_retries=0) == [trial.number]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]  # max_retries=0: skipped


def test_the_waiting_report_is_throttled(tmp_path, caplog):
    study, trial = running_trial(tmp_path, FOREIGN)
    watcher = beats.JournalBeats(tmp_path / ledger.JOURNAL_NAME, 1, 5)
    report = beats.WaitReport(every_s=60)
    with caplog.at_level(logging.INFO, logger="yolo.evolve"):
        for _ in range(3):
            beats.recover_silent_trials(study, watcher, max_retries=1)
            report.waiting(study, watcher)
            time.sleep(0.6)
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert lines == ["evolve: waiting for other workers: trial 0 (worker 4242 on node-gone, silent 0s of 5s)"]
