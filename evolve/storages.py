"""Opening an evolution's storage (see :mod:`evolve.locations`): Optuna's journal format through
:class:`evolve.journal.SafeJournalFile`, or a database with Optuna's heartbeats, its tables created once whichever
worker starts first."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from evolve.journal import SafeJournalFile
from evolve.locations import DRIVER_HINTS, describe_storage, dialect, redact_url, with_installed_driver
from evolve.locks import database_lock
from evolve.recovery import retry_trial

log = logging.getLogger("yolo.evolve")


def grace_period(heartbeat_s: int, grace_s: int | None) -> tuple[int, int]:
    """(heartbeat interval, grace) in seconds: the grace defaults to twice the interval, and exceeds it."""
    heartbeat_s = max(1, int(heartbeat_s))
    return heartbeat_s, (max(heartbeat_s + 1, int(grace_s)) if grace_s else 2 * heartbeat_s)


def open_storage(spec: str | None, out_dir: str | os.PathLike, *, heartbeat_s: int = 60,
                 grace_s: int | None = None, max_retries: int = 1) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the evolution's storage; see :func:`describe_storage`.

    An RDB storage records heartbeats: a RUNNING trial without one for ``grace_s`` (default twice ``heartbeat_s``)
    belongs to a dead worker (:func:`evolve.recovery.recover_stale_trials`). Workers started at the same moment
    against a new database create its tables one at a time (a lock in the database server,
    :class:`evolve.locks.DatabaseLock`). The journal's heartbeats are files beside it (:mod:`evolve.beats`).
    """
    kind, where = describe_storage(spec, out_dir)
    if kind == "journal":
        return optuna.storages.JournalStorage(SafeJournalFile(where))
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if where.startswith("sqlite") else None
    if where.startswith("sqlite:///"):
        Path(where[len("sqlite:///"):].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    where = with_installed_driver(where)
    heartbeat_s, grace_s = grace_period(heartbeat_s, grace_s)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:  # when Optuna's own fail_stale_trials runs
        retry_trial(study, trial, max_retries, reason="no heartbeat")

    db_lock = None
    try:
        db_lock = database_lock(where, "schema")
        for attempt in range(4):
            try:
                with db_lock or contextlib.nullcontext(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(where, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                                      heartbeat_stale_trial_callback=on_stale)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                    optuna.exceptions.StorageInternalError) as e:  # tables created concurrently by another worker
                if attempt == 3:
                    raise
                log.debug(f"evolve: opening the storage raced with another worker ({type(e).__name__}), retrying")
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
        raise AssertionError("unreachable")
    except ModuleNotFoundError as e:
        hint = DRIVER_HINTS.get(dialect(where), "its SQLAlchemy driver")
        raise ModuleNotFoundError(f"evolve.storage={redact_url(where)} needs the database driver "
                                  f"{e.name!r}: install {hint}") from e
    finally:
        if db_lock is not None:
            db_lock.close()
