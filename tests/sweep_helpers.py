"""Trainer callbacks for the sweeper tests, attached to a sweep's jobs through ``$YOLO_TRAIN_CALLBACKS``."""

from __future__ import annotations

import os
import time


class _SlowJob:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_start(self, trainer) -> None:
        time.sleep(self.seconds)


def slow_first(cfg):
    """Job 0 (the sweep's first trial) takes ``$SWEEP_TEST_SLOW_S`` seconds longer than the others."""
    from evolve.sweep_trial import job_number

    return _SlowJob(float(os.environ.get("SWEEP_TEST_SLOW_S", "8"))) if job_number() == 0 else None


class _Kill:
    def on_train_start(self, trainer) -> None:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def kill_at(cfg):
    """Job number ``$SWEEP_TEST_KILL_AT`` SIGKILLs its process as it starts training (with the basic launcher: the
    whole sweep), once: a marker file ``$SWEEP_TEST_KILL_MARK`` says it happened."""
    from pathlib import Path

    from evolve.sweep_trial import job_number

    mark = Path(os.environ["SWEEP_TEST_KILL_MARK"])
    if job_number() != int(os.environ["SWEEP_TEST_KILL_AT"]) or mark.exists():
        return None
    mark.write_text("killed")
    return _Kill()


class _PidAndWait:
    def __init__(self, folder):
        self.folder = folder

    def on_train_epoch_start(self, trainer) -> None:  # after every callback's on_train_start
        from pathlib import Path

        from evolve.sweep_trial import job_number

        Path(self.folder, f"{job_number()}.pid").write_text(str(os.getpid()))
        time.sleep(120)


def pid_and_wait(cfg):
    """Every job writes its process id into ``$SWEEP_TEST_PID_DIR`` and then waits (a long training)."""
    return _PidAndWait(os.environ["SWEEP_TEST_PID_DIR"])
