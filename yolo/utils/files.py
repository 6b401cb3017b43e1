"""Writing files so that a kill never leaves a torn one, and locks between processes of one machine.

:func:`atomic_write` writes into a temporary file beside the target (``.<name>.<pid>.<random>.tmp``), flushes it
to disk, then renames it over the target and flushes the folder: a reader sees the old file or the new one,
never half of one, even after a power cut. :func:`remove_stale_temps` deletes what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` that :func:`remove_stale_temps` recognises."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem (or OS) lets a folder be opened and synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically and durably.

    The new file gets the permissions a plain ``open(path, 'w')`` would give (0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda f: f.write(text.encode(encoding)))


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (an image list, a source list), stripped; a byte-order mark at the
    start is dropped. Raises ``OSError`` or ``UnicodeDecodeError`` for the caller to word."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return [x.strip() for x in text.splitlines() if x.strip()]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours, or unknowable: keep its file
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporary files of :func:`atomic_write` in ``folder`` (of target ``name`` only, when given) whose
    writer process is gone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


class FileLock:
    """An exclusive lock between processes of one machine (``flock`` on ``path``), released by the OS when its
    holder dies. Re-entrant within one process (threads of the process share it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh: IO | None = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    def __enter__(self) -> FileLock:
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(self.path, "a+")
                try:
                    _lock(fh)
                except BaseException:
                    fh.close()
                    raise
                self._fh = fh
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fh is not None:
                fh, self._fh = self._fh, None
                try:
                    _unlock(fh)
                finally:
                    fh.close()
        finally:
            self._thread_lock.release()


def _lock(fh: IO) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        while True:
            try:
                msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def _unlock(fh: IO) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def try_lock(fh: IO) -> bool:
    """Take an exclusive lock on the open file ``fh`` without waiting: False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # deferred: Windows has msvcrt instead of fcntl
        import msvcrt

        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True

