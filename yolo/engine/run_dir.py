"""Run folders: one run, one folder, claimed atomically and recognised by the marker it wrote at creation.

* :func:`claim_fresh` makes a folder that no other process can also get: ``os.mkdir`` either creates it or fails,
  so two runs started in the same instant get ``..._exp`` and ``..._exp2``.
* :class:`RunHold` is an exclusive lock on ``<run>/.run.lock`` held for the life of a training; the OS drops it
  when the process dies, so "held" means "a live run is writing here".
* ``run.json`` (:func:`write_marker` / :func:`read_run_id`) names the run that created the folder. Checkpoints
  carry the same id, so a resume knows whether ``path/to/weights/last.pt`` still sits in the folder of the run
  that wrote it (and then continues there) or not (and then starts a new folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import IO

from yolo.errors import UserError
from yolo.utils.files import atomic_write_text, try_lock

MARKER = "run.json"
LOCK = ".run.lock"
MARKER_MAX_BYTES = 64 * 1024
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RunDirError(UserError):
    """A run folder that cannot be used: held by a live run, or already holding another run."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def valid_run_id(value) -> str | None:
    """``value`` when it is a run id (32 lower-case hex digits), else None: ids from files are data."""
    return value if isinstance(value, str) and _RUN_ID.match(value) else None


def claim_fresh(base: str | os.PathLike) -> Path:
    """Create and return ``base``, or ``base2``, ``base3``... : the first name no one else has created."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        cand = base if n == 1 else base.with_name(f"{base.name}{n}")
        try:
            os.mkdir(cand)
        except FileExistsError:
            continue
        return cand
    raise RunDirError(f"too many run folders named {base.name}* under {base.parent}")


def read_run_id(folder: str | os.PathLike) -> str | None:
    """The id in ``folder/run.json``, or None (no marker, unreadable, oversized or malformed)."""
    path = Path(folder) / MARKER
    try:
        with open(path, "rb") as f:
            raw = f.read(MARKER_MAX_BYTES + 1)
        if len(raw) > MARKER_MAX_BYTES:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return valid_run_id(data.get("run_id")) if isinstance(data, dict) else None


def write_marker(folder: str | os.PathLike, run_id: str) -> None:
    info = {"format": "yolo-hydra run", "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "pid": os.getpid()}
    atomic_write_text(Path(folder) / MARKER, json.dumps(info, indent=1) + "\n")


def is_used(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` already holds a training run's output (ours, or from before markers existed)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (MARKER, "results.csv", "weights"))


class RunHold:
    """Exclusive, non-blocking hold on a run folder for the life of this process's training."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fh: IO | None = None

    def acquire(self) -> RunHold:
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.folder / LOCK, "a+")
        if not try_lock(fh):
            fh.seek(0)
            holder = fh.read(200).strip().replace("\n", " ")
            fh.close()
            raise RunDirError(f"{self.folder} is in use by a live training run ({holder or 'unknown process'}); "
                              "wait for it to end or choose another folder")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):
                fh.close()  # closing the descriptor drops the lock

    def __enter__(self) -> RunHold:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(folder: str | os.PathLike, exist_ok: bool = False) -> None:
    """Refuse ``folder`` when a live run holds it, or when it holds an earlier run and ``exist_ok`` is false."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if (folder / LOCK).exists():
        RunHold(folder).acquire().release()  # raises while a live run holds it
    if is_used(folder) and not exist_ok:
        raise RunDirError(_USED.format(folder=folder))


_USED = ("{folder} already holds a training run; pass exist_ok=true to train into it anyway (its results are "
         "replaced) or choose another hydra.run.dir / name")


def open_run(folder: Path, run_id: str | None = None, exist_ok: bool = False) -> tuple[str, RunHold]:
    """Hold ``folder`` for a training and return ``(run id, hold)``.

    ``run_id`` given: a resume into the folder of that run (its marker must say so). Otherwise a new run: the
    folder must not hold an earlier run's output unless ``exist_ok`` (upstream's ``--exist-ok``), and gets a
    fresh marker.
    """
    hold = RunHold(folder).acquire()
    try:
        if run_id is not None:
            if read_run_id(folder) != run_id:
                raise RunDirError(f"{folder} is not the folder of run {run_id}")
            return run_id, hold
        if is_used(folder) and not exist_ok:
            raise RunDirError(_USED.format(folder=folder))
        run_id = new_run_id()
        write_marker(folder, run_id)
        return run_id, hold
    except BaseException:
        hold.release()
        raise
