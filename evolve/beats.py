"""Heartbeats of training generations, and failing the generations whose worker went silent.

With a database storage the heartbeat is Optuna's (a row per trial). With the journal file, a worker training a
generation rewrites a small file beside the journal, ``<journal>.beats/trial-<id>.json`` (atomically), every
``heartbeat_s``: its owner and a counter. A process that waits for that generation watches the file by its own
clock, so machines need no common clock: when the file has not changed for ``heartbeat_grace_s`` and the owner
cannot be seen alive from here (another host id, a dead or unknown process), the generation is failed with the
reason and queued again (``max_retries``). A waiting worker says what it waits for, every :data:`WAIT_REPORT_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve import optuna_internals as oi
from evolve import recovery
from evolve.storages import grace_period
from yolo.utils.files import atomic_write_text, remove_stale_temps

log = logging.getLogger("yolo.evolve")

MAX_BEAT_BYTES = 4096  # a beat file is ~150 bytes; more is not ours
WAIT_REPORT_S = 30.0


class JournalBeats:
    """The beat files of one journal, and how long each RUNNING trial has been silent as this process saw it."""

    def __init__(self, journal: str | os.PathLike, heartbeat_s: int = 60, grace_s: int | None = None):
        journal = Path(journal)
        self.folder = journal.with_name(journal.name + ".beats")
        self.interval, self.grace = grace_period(heartbeat_s, grace_s)
        self._seen: dict[int, tuple[bytes | None, float]] = {}  # trial id -> (beat, when it was first seen)
        remove_stale_temps(self.folder)  # of a worker killed while it wrote a beat

    def path(self, trial_id: int) -> Path:
        return self.folder / f"trial-{int(trial_id)}.json"

    def beat(self, trial_id: int, seq: int) -> None:
        record = {"trial_id": int(trial_id), "owner": recovery.owner_info(), "seq": int(seq), "time": time.time()}
        atomic_write_text(self.path(trial_id), json.dumps(record))

    def read(self, trial_id: int) -> bytes | None:
        """The beat file's bytes (at most :data:`MAX_BEAT_BYTES`), None without a readable regular file."""
        try:
            fd = os.open(self.path(trial_id), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        try:
            return os.read(fd, MAX_BEAT_BYTES) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def remove(self, trial_id: int) -> None:
        with contextlib.suppress(OSError):
            self.path(trial_id).unlink()

    def silent_for(self, trial_id: int) -> float:
        """Seconds since this process first saw the trial's current beat (0 when it just changed)."""
        beat, now = self.read(trial_id), time.monotonic()
        seen = self._seen.get(trial_id)
        if seen is None or seen[0] != beat:
            self._seen[trial_id] = (beat, now)
            return 0.0
        return now - seen[1]

    def seen_silent(self, trial_id: int) -> float:
        """The silence :meth:`silent_for` measured last (without reading the file again)."""
        seen = self._seen.get(trial_id)
        return time.monotonic() - seen[1] if seen else 0.0

    def keep_only(self, trial_ids: set[int]) -> None:
        for tid in set(self._seen) - trial_ids:
            del self._seen[tid]


def recover_silent_trials(study: optuna.Study, beats: JournalBeats, max_retries: int) -> list[int]:
    """Fail (and queue again) the RUNNING trials silent past the grace whose owner cannot be seen alive from
    here; returns their numbers. Owners seen dead are :func:`evolve.recovery.recover_stale_trials`' job. Call under
    the evolution's lock, often: silence is measured between calls."""
    failed = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beats.keep_only({oi.trial_id(t) for t in running})
    for t in running:
        owner = t.system_attrs.get(recovery.OWNER_ATTR)
        if recovery.owner_alive(owner) is not None:
            continue
        if beats.silent_for(oi.trial_id(t)) <= beats.grace:
            continue
        reason = f"no heartbeat for {beats.grace}s: {recovery.describe_owner(owner)} is gone"
        if recovery.mark_failed(study, t, reason):
            failed.append(t.number)
            beats.remove(oi.trial_id(t))
            recovery.retry_trial(study, oi.frozen(study, t), max_retries, reason=reason)
    return failed


def describe_running(trial: FrozenTrial, beats: JournalBeats | None) -> str:
    """``trial 3 (worker 4242 on node07, silent 35s of 120s)``: what a waiting worker waits for."""
    owner = trial.system_attrs.get(recovery.OWNER_ATTR)
    alive = recovery.owner_alive(owner)
    if alive is not None:
        state = "running here" if alive else "its process died"
    elif beats is not None:
        state = f"silent {beats.seen_silent(oi.trial_id(trial)):.0f}s of {beats.grace}s"
    else:
        start = trial.datetime_start
        state = f"started {(datetime.now() - start).total_seconds():.0f}s ago" if start else "not started"
    return f"trial {trial.number} ({recovery.describe_owner(owner)}, {state})"


class WaitReport:
    """Says, at most every ``every_s`` while a worker keeps waiting, which generations it waits for."""

    def __init__(self, every_s: float = WAIT_REPORT_S):
        self.every_s = every_s
        self._last: float | None = None

    def waiting(self, study: optuna.Study, beats: JournalBeats | None) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            log.info("evolve: waiting for other workers: " + "; ".join(describe_running(t, beats) for t in running))

    def done(self) -> None:
        self._last = None


class Heartbeat:
    """Records a trial's heartbeat while it trains: Optuna's for a database, a beat file for the journal."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, beats: JournalBeats | None):
        self.storage = oi.storage_of(study)
        self.trial_id = oi.trial_id(trial)
        self.beats = beats
        self.rdb = oi.heartbeat_enabled(study)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _record(self, seq: int) -> None:
        if self.rdb:
            self.storage.record_heartbeat(self.trial_id)
        elif self.beats is not None:
            self.beats.beat(self.trial_id, seq)

    def _run(self) -> None:
        interval = (self.storage.get_heartbeat_interval() if self.rdb else self.beats.interval) or 60
        seq = 0
        while not self.stop.is_set():
            try:
                self._record(seq)
            except Exception as e:  # a missed beat is not fatal
                log.debug(f"heartbeat failed: {e}")
            seq += 1
            self.stop.wait(interval)

    def __enter__(self) -> Heartbeat:
        if self.rdb or self.beats is not None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="evolve-heartbeat")
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        if self.beats is not None:
            self.beats.remove(self.trial_id)
