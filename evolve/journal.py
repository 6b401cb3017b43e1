"""The evolution's journal file, read as untrusted input and never appended onto a torn record.

:class:`SafeJournalFile` is an Optuna journal backend for the same file format as Optuna's own
(one JSON operation a line, the same ``<file>.lock`` lock), with three differences:

- a torn last record (a write cut short by a kill: bytes after the last newline) is cut off, under the journal's
  lock, before anything is appended, with a warning; the discarded bytes are kept beside the journal
  (``<journal>.torn-<time>-<pid>``);
- a line longer than :data:`MAX_RECORD_BYTES` is never loaded: it is one clear :class:`JournalError` naming the
  line (memory stays bounded whatever the file holds);
- a line that is not a journal record is a :class:`JournalError` naming the line, except a record glued onto the
  torn bytes of an earlier one (what appending onto a torn record used to leave), which is read with a warning.

Record numbers are line numbers, as in Optuna's backend, so both read a clean file alike.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any

from optuna.storages.journal import BaseJournalBackend, JournalFileOpenLock

from yolo.errors import UserError
from yolo.utils.files import atomic_write

log = logging.getLogger("yolo.evolve")

MAX_RECORD_BYTES = 4 << 20  # one operation of an evolution is a few KiB
CHUNK = 1 << 16
RECORD_START = b'{"op_code":'
OP_CODES = range(0, 11)  # Optuna's JournalOperation values


class JournalError(UserError):
    """The journal file holds something that is not a journal record (a hostile or damaged file)."""


def _scan_to_newline(f: IO[bytes]) -> bool:
    """Skip past the next newline without keeping what is read; False at the end of the file."""
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return False
        i = chunk.find(b"\n")
        if i >= 0:
            f.seek(i + 1 - len(chunk), os.SEEK_CUR)
            return True


def _last_newline_end(f: IO[bytes], size: int) -> int:
    """Offset just past the last newline of the file (0 when there is none), reading backwards in chunks."""
    pos = size
    while pos > 0:
        start = max(0, pos - CHUNK)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _checked(record: Any) -> dict[str, Any] | None:
    """The record if it has the shape of a journal operation, else None."""
    if not isinstance(record, dict):
        return None
    op = record.get("op_code")
    if not isinstance(op, int) or isinstance(op, bool) or op not in OP_CODES:
        return None
    return record if isinstance(record.get("worker_id"), str) else None


def _parse(line: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(record, salvaged): the line's record, or the record glued after torn bytes; (None, False) if neither."""
    try:
        return _checked(json.loads(line)), False
    except (ValueError, RecursionError):
        pass
    i = line.rfind(RECORD_START)
    if i <= 0:
        return None, False
    try:
        return _checked(json.loads(line[i:])), True
    except (ValueError, RecursionError):
        return None, False


def discard_torn_tail(path: str | os.PathLike) -> Path | None:
    """Cut the bytes after the journal's last newline (a torn record), keeping a copy of them beside it.

    Call under the journal's lock. Returns the copy's path, None when the file ends with a record.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        cut = _last_newline_end(f, size)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        backup = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}")

        def copy(out: IO[bytes]) -> None:
            f.seek(cut)
            while chunk := f.read(CHUNK):
                out.write(chunk)

        atomic_write(backup, copy)
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    log.warning(f"WARNING: evolve: {path}: discarded a torn last record ({size - cut} bytes after line "
                f"{_count_lines(path)}, a write cut short by a kill); the bytes are kept in {backup}")
    return backup


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            n += chunk.count(b"\n")
    return n


class SafeJournalFile(BaseJournalBackend):
    """Optuna's journal file format and lock, read with bounded memory and repaired before appending."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = JournalFileOpenLock(str(self.path))
        self._offsets: dict[int, int] = {0: 0}  # record (line) number -> byte offset of its line
        self._warned: set[int] = set()
        with self._locked():
            self.path.touch(exist_ok=True)
            discard_torn_tail(self.path)

    def _locked(self) -> _Held:
        return _Held(self.lock)

    def _error(self, number: int, what: str) -> JournalError:
        return JournalError(
            f"{self.path}, line {number + 1}: {what}; the evolution cannot be read past it. Keep a copy of the "
            f"file, then cut it before that line (head -n {number} ...) to continue from the records before it, "
            f"or start a new evolve.out_dir")

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        start = (log_number_from if log_number_from in self._offsets
                 else max(n for n in self._offsets if n <= log_number_from))
        with open(self.path, "rb") as f:
            end = os.fstat(f.fileno()).st_size  # records appended while reading are left for the next read
            f.seek(self._offsets[start])
            number = start
            while f.tell() < end:
                line = f.readline(MAX_RECORD_BYTES + 1)
                if not line.endswith(b"\n"):
                    if len(line) <= MAX_RECORD_BYTES or not _scan_to_newline(f) or f.tell() > end:
                        return  # the last record is being written, or was torn (cut before the next append)
                    raise self._error(number, f"a line over {MAX_RECORD_BYTES} bytes")
                if f.tell() > end:
                    return
                self._offsets.setdefault(number + 1, f.tell())
                if number >= log_number_from:
                    yield self._record(number, line)
                number += 1

    def _record(self, number: int, line: bytes) -> dict[str, Any]:
        record, salvaged = _parse(line)
        if record is None:
            raise self._error(number, f"not a journal record ({line[:60]!r}...)")
        if salvaged and number not in self._warned:
            self._warned.add(number)
            log.warning(f"WARNING: evolve: {self.path}, line {number + 1}: a record written onto the torn bytes "
                        f"of an earlier one (by an older version); the torn bytes are ignored")
        return record

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in logs).encode()
        with self._locked():
            discard_torn_tail(self.path)  # a worker killed mid-write since we opened the file
            with open(self.path, "ab") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


class _Held:
    """Optuna's journal file lock as a context manager."""

    def __init__(self, lock: JournalFileOpenLock):
        self.lock = lock

    def __enter__(self) -> _Held:
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
