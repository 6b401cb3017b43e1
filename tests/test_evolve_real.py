"""Evolution with real training (``yolo.train.train``): two worker processes sharing one journal; a
worker SIGKILLed mid-generation, then the same command run again; the command of two workers SIGKILLed.

The generations are tiny but real: yolov5n from scratch on the session's tiny shapes set (tests/conftest.py),
imgsz 64, one epoch, one torch thread per process. Their fitness is about 0 (one epoch from scratch learns
nothing), which is fine: these tests are about the ledger, not the search.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from test_evolve_parallel import REPO, check_ledger, load, wait_for

from evolve import ledger

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process checks")


def real_overrides(out: Path, data_yaml: Path, generations: int, *extra: str) -> list[str]:
    """One tiny real generation: yolov5n from scratch, imgsz 64, 1 epoch, batch 16, no loader workers."""
    return [f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false", "evolve.plot=false",
            "evolve.poll_s=0.2", "model=yolov5n", "hyp=shapes-scratch", "data=external", f"data.file={data_yaml}",
            "imgsz=64", "epochs=1", "batch_size=16", "workers=0", "device=cpu", "noautoanchor=true", *extra]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "run_evolve.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out:\n{proc.communicate()[0][-5000:]}") from None
    assert proc.returncode == 0, out[-5000:]
    return out


def wait_training(proc: subprocess.Popen, out: Path, number: int, timeout: float = 90) -> Path:
    """Wait until trial ``number``'s training has started (the trainer has written its hyp.yaml); its folder."""
    started = out / "generations" / f"trial{number:04d}" / "hyp.yaml"
    wait_for(started, proc, timeout)
    return started.parent


def kill_when_training(proc: subprocess.Popen, out: Path, number: int) -> None:
    """SIGKILL the (single-worker) command once trial ``number``'s training has started, then check it died
    mid-generation."""
    folder = wait_training(proc, out, number)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (folder / "results.csv").exists()  # killed before its epoch ended
    trial = load(out).trials[number]
    assert trial.state == TrialState.RUNNING  # as the dead worker left it
    assert trial.system_attrs[ledger.OWNER_ATTR]["pid"] == proc.pid


def check_real(study, generations: int) -> None:
    """Every finished generation was really trained, once, in its own folder."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == generations
    for t in done:
        assert t.user_attrs["epochs_completed"] == 1 and t.user_attrs["train_s"] > 0
        folder = Path(t.user_attrs["save_dir"])
        assert folder.name == f"trial{t.number:04d}" and (folder / "results.csv").is_file()
        assert not (folder / "weights").exists()  # evolve.keep_weights=false
    assert len({t.user_attrs["save_dir"] for t in done}) == generations


def test_real_two_worker_processes_share_one_journal(tiny_shapes, tmp_path):
    out = tmp_path / "evo"
    log = finish(launch(real_overrides(out, tiny_shapes, 6, "evolve.workers=2")))
    assert "6 generations finished (6 complete, 0 pruned, 0 failed)" in log
    study = check_ledger(out, 6)
    check_real(study, 6)
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert len({t.system_attrs[ledger.OWNER_ATTR]["pid"] for t in study.trials}) == 2  # two processes trained


def test_real_sigkill_mid_generation_then_resume(tiny_shapes, tmp_path):
    """Killed in generation 3, the same command again retries it (evolve.max_retries=1); killed again in that retry,
    the next run skips it; the third run finishes the 4 generations asked for."""
    out = tmp_path / "evo"
    args = real_overrides(out, tiny_shapes, 4)

    first = launch(args)
    kill_when_training(first, out, 2)
    assert [t.state for t in load(out).trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]

    second = launch(args)  # marks trial 2 failed and queues its hyps again: trial 3 is the retry
    kill_when_training(second, out, 3)

    log = finish(launch(args))  # marks the retry failed and skips it (retried once already)
    assert "4 generations finished (4 complete, 0 pruned, 2 failed)" in log
    assert "retried 1 times already, skipping it" in log

    study = check_ledger(out, 4)
    check_real(study, 4)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    killed, retry = study.trials[2], study.trials[3]
    assert killed.user_attrs[ledger.FAIL_ATTR] == f"worker process {first.pid} died"
    assert retry.user_attrs[ledger.FAIL_ATTR] == f"worker process {second.pid} died"
    assert retry.system_attrs["retry_history"] == [2] and retry.params == killed.params  # the same generation
    assert not [t for t in study.trials if t.system_attrs.get("retry_history") == [2, 3]]  # not retried twice
    rows = ledger.study_rows(study.trials, {})
    assert [r.number for r in rows] == [0, 1, 4, 5]  # evolve.csv holds the finished generations only
    assert not any(all(r.hyp[k] == v for k, v in killed.params.items()) for r in rows)  # nor the lost one


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rfind(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    state = ledger.process_start(pid)
    return state is not None and state[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_real_sigkill_the_command_of_two_workers_then_resume(tiny_shapes, tmp_path):
    """The main process of ``evolve.workers=2`` SIGKILLed mid-generation: its workers exit too (no orphan goes on
    training beside the command run again); the same command again fails and retries what they were training."""
    out = tmp_path / "evo"
    args = real_overrides(out, tiny_shapes, 6, "evolve.workers=2")
    proc = launch(args)
    folder = wait_training(proc, out, 3)
    workers = children(proc.pid)
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    t0 = time.time()
    while any(alive(w) for w in workers) and time.time() - t0 < 15:
        time.sleep(0.1)
    orphans = [w for w in workers if alive(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    log = proc.communicate(timeout=30)[0]  # the workers held the pipe too
    assert not orphans, log[-3000:]
    assert "the main process" in log and "is gone" in log
    before = load(out).trials
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    assert 3 in running and not (folder / "results.csv").exists()

    log = finish(launch(args))  # the same command again
    assert "6 generations finished (6 complete" in log
    study = check_ledger(out, 6)
    check_real(study, 6)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == running
    for t in failed:
        assert "died" in t.user_attrs[ledger.FAIL_ATTR]
        retry = [r for r in study.trials if r.system_attrs.get("retry_history") == [t.number]]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t.params


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_worker_memory_does_not_grow_across_generations(tiny_shapes, tmp_path):
    """RSS of the worker after 20 real generations stays within 10% of its RSS after 2 (no leak per generation:
    models, loaders, optimizers and caches of finished generations are freed)."""
    log = tmp_path / "rss.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "YOLO_RSS_LOG": str(log),
           "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "run_evolve.py",
                             *real_overrides(tmp_path / "evo", tiny_shapes, 20, "evolve.train_fn=rss_train:train",
                                             "evolve.strategy=cmaes")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finish(proc, timeout=400)
    rss = [int(x) for x in log.read_text().split()]
    assert len(rss) == 20
    assert rss[-1] <= 1.10 * rss[1], f"RSS (kB) by generation: {rss}"
