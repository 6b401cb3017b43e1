"""SIGKILL at random moments of a short training (its end included), resumed each time: nothing lost, nothing
counted twice, and the final weights load strictly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, train_overrides

EPOCHS = 12
KILLS = 10


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def _kill_at(proc: subprocess.Popen, log: Path, rng: random.Random, at_end: bool) -> str:
    """Kill ``proc`` at a random moment (or, with ``at_end``, a random moment after its last epoch); returns
    what happened."""
    deadline = time.time() + (rng.uniform(2.0, 14.0) if not at_end else 600)
    while proc.poll() is None and time.time() < deadline:
        if at_end and "epochs completed" in log.read_text(errors="replace"):
            time.sleep(rng.uniform(0.0, 1.5))  # during the strip or the final validation
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return f"exited {proc.returncode}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "killed"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tiny_shapes, tmp_path):
    from yolo.checkpoint import load_checkpoint, load_model

    seed = int(os.environ.get("YOLO_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    run = tmp_path / "run"
    args = train_overrides(tiny_shapes, tmp_path, f"epochs={EPOCHS}", "noplots=true", "mlflow.enabled=false")
    places = [a for a in args if a.split("=")[0] in ("data", "data.file", "workers", "device", "project")]
    fresh = [sys.executable, "run_train.py", *args, f"hydra.run.dir={run}", "exist_ok=true"]
    last = run / "weights" / "last.pt"
    at_end = set(range(KILLS - 3, KILLS))  # mid-run moments first; then kills during the end (strip, final val)
    story, finished = [], False
    for k in range(KILLS + 1):
        cmd = [sys.executable, "run_train.py", f"resume={last}", *places] if last.exists() else fresh
        log = tmp_path / f"log{k}.txt"
        proc = _start(cmd, log)
        if k == KILLS:  # the last start runs to its end
            proc.wait(timeout=900)
            what = f"exited {proc.returncode}"
        else:
            what = _kill_at(proc, log, rng, at_end=k in at_end)
        story.append(what)
        text = log.read_text(errors="replace")
        if what == "exited 0":
            finished = True
            break
        if what.startswith("exited"):
            # the only acceptable refusal: a finished run, in one line
            assert "finished run" in text and "Traceback" not in text, (seed, story, text[-2000:])
            finished = True
            break
    print(f"kill test seed {seed}: {story}")
    assert finished, (seed, story)
    rows = (run / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == list(range(EPOCHS)), (seed, story)
    model, _ = load_model(run / "weights" / "best.pt")  # strict: fits its architecture, finite
    assert model.nc == 5
    assert load_checkpoint(last).epoch in (-1, EPOCHS - 1), (seed, story)
    assert list(run.glob("**/.*.tmp")) == [], (seed, story)
