"""Progress bars that suit both a terminal and a log file.

:func:`progress` is ``tqdm`` on a terminal. When its stream is not a TTY (``2> train.log``, a pipe, SLURM, CI) a
refreshing bar would leave every intermediate state in the file (``\\r``-separated, one per refresh); there the bar
draws nothing while it runs and, when closed, writes ONE line: its final state (none with ``leave=False``).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["FinalLineBar", "progress"]


class _Discard:
    """A stream that drops what tqdm writes while the bar runs."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class FinalLineBar(tqdm):
    """A bar that refreshes nowhere and, when closed, writes its final state as one line to ``final_file``."""

    def __init__(self, iterable: Iterable | None = None, *, final_file: Any = None, **kwargs: Any):
        self._final_file = final_file if final_file is not None else sys.stderr
        self._final_leave = kwargs.get("leave", True)
        encoding = str(getattr(self._final_file, "encoding", None) or "").lower()
        kwargs.setdefault("ascii", "utf" not in encoding)  # the blocks a terminal would show, where they print
        kwargs.update(file=_Discard(), mininterval=float("inf"), maxinterval=float("inf"))
        super().__init__(iterable, **kwargs)

    def close(self) -> None:
        if self.disable:
            return
        line = str(self) if self._final_leave else None  # before close(): then the bar disables itself
        super().close()
        if line:
            print(line.rstrip(), file=self._final_file, flush=True)


def progress(iterable: Iterable | None = None, *, file: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; a :class:`FinalLineBar` (one final line) on anything else."""
    stream = file if file is not None else sys.stderr
    if kwargs.get("disable") or is_tty(stream):
        return tqdm(iterable, file=stream, **kwargs)
    return FinalLineBar(iterable, final_file=stream, **kwargs)
