"""The evolution's lock: one process at a time does its bookkeeping (new trials, failed workers, exported
files), on one machine (a file lock, :class:`yolo.utils.files.FileLock`) or on any machine sharing a database
(a lock held in the database server)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from evolve.locations import describe_storage, dialect, with_installed_driver
from yolo.utils.files import FileLock

log = logging.getLogger("yolo.evolve")


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (PostgreSQL advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(f"yolo-evolve:{name}".encode()).digest()[:8], "big", signed=True)


class DatabaseLock:
    """An exclusive lock between processes on any machines that use one database server, held in the server:
    a PostgreSQL advisory lock, or MySQL/MariaDB's ``GET_LOCK``. The server releases it when its holder's
    connection drops, so a killed worker never keeps it; a vanished machine's connection is dropped by the
    server's TCP keepalives (set to about a minute for this connection on PostgreSQL). Re-entrant within one
    process. It uses one connection of its own, kept open between acquisitions (opened again if it broke)."""

    DIALECTS = ("postgresql", "mysql", "mariadb")
    CONNECT_TRIES = 6  # a database unreachable for about a minute (1 + 2 + 4 + 8 + 16 + 30 s) stops the worker

    def __init__(self, url: str, name: str):
        self.url, self.name = with_installed_driver(url), name
        self.dialect = dialect(url)
        if self.dialect not in self.DIALECTS:
            raise ValueError(f"no database lock for {self.dialect}")
        self.key = _lock_key(name)
        self._params = {"k": self.key, "n": f"yolo-evolve-{self.key & 0xFFFFFFFFFFFFFFFF:x}"}
        self._engine = None
        self._conn = None  # open between acquisitions
        self._depth = 0
        self._thread_lock = threading.RLock()

    def _statements(self) -> tuple[list[str], str, str]:
        """(session set-up statements, lock statement, unlock statement)."""
        if self.dialect == "postgresql":
            return (["SET tcp_keepalives_idle = 30", "SET tcp_keepalives_interval = 10",
                     "SET tcp_keepalives_count = 3"], "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)")
        return [], "SELECT GET_LOCK(:n, -1)", "SELECT RELEASE_LOCK(:n)"  # MySQL >= 5.7 / MariaDB: -1 waits forever

    def _connect(self) -> Any:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        for attempt in range(self.CONNECT_TRIES):
            try:
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                break
            except sqlalchemy.exc.OperationalError as e:
                permanent = any(m in str(e).lower() for m in ("authentication", "does not exist", "password"))
                if permanent or attempt == self.CONNECT_TRIES - 1:
                    raise
                wait = min(30, 2 ** attempt)
                log.warning(f"WARNING: evolve: database unreachable ({str(e).strip().splitlines()[0]}); "
                            f"retrying in {wait}s")
                time.sleep(wait)
        for stmt in self._statements()[0]:
            with contextlib.suppress(Exception):  # e.g. a Unix socket has no keepalives
                conn.exec_driver_sql(stmt)
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> DatabaseLock:
        import sqlalchemy

        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                lock = sqlalchemy.text(self._statements()[1])
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    self._conn.execute(lock, self._params)
                except sqlalchemy.exc.DBAPIError as e:  # the kept connection broke (server restart): a new one
                    if not e.connection_invalidated and not isinstance(e, sqlalchemy.exc.OperationalError):
                        raise
                    self._close()
                    self._conn = self._connect()
                    self._conn.execute(lock, self._params)
            self._depth += 1
        except BaseException:
            if self._depth == 0:
                self._close()  # a half-made request for the lock must not stay behind
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import sqlalchemy

        try:
            self._depth -= 1
            if self._depth == 0 and self._conn is not None:
                try:
                    self._conn.execute(sqlalchemy.text(self._statements()[2]), self._params)
                except Exception as e:  # the connection is gone: the server has released the lock with it
                    log.debug(f"evolve: releasing the database lock: {e}")
                    self._close()
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        """Close the kept connection (it also closes with the process)."""
        with self._thread_lock:
            if self._depth == 0:
                self._close()


def database_lock(url: str, name: str) -> DatabaseLock | None:
    """A :class:`DatabaseLock` named ``name`` in the database of ``url``; None where the database has none."""
    return DatabaseLock(url, name) if dialect(url) in DatabaseLock.DIALECTS else None


class EvolutionLock:
    """The evolution's lock: the out_dir's :class:`FileLock` (processes of this machine writing its files), then
    the storage's: a :class:`DatabaseLock` for PostgreSQL/MySQL (workers on any machine), a :class:`FileLock` next
    to an SQLite file. Taken in that order by everyone; re-entrant within one process."""

    def __init__(self, *locks: Any):
        self.locks = [lock for lock in locks if lock is not None]
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> EvolutionLock:
        with contextlib.ExitStack() as stack:
            for lock in self.locks:
                stack.enter_context(lock)
            self._stacks.append(stack.pop_all())
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().close()


def evolution_lock(out_dir: str | os.PathLike, spec: str | None, study_name: str) -> EvolutionLock:
    """The lock that serializes the evolution's bookkeeping (new trials, failed workers, exported files) across
    every worker that can reach its storage."""
    kind, where = describe_storage(spec, out_dir)
    locks: list[Any] = [FileLock(Path(out_dir) / ".evolve.lock")]
    if kind == "rdb":
        db = where[len("sqlite:///"):].split("?")[0] if where.startswith("sqlite:///") else ""
        if db and db != ":memory:":
            db_path = Path(db).resolve()
            locks.append(FileLock(db_path.with_name(db_path.name + ".evolve.lock")))
        elif not db:
            locks.append(database_lock(where, f"study:{study_name}"))
    return EvolutionLock(*locks)
