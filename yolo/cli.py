"""Shared behaviour of the command-line entrypoints."""

from __future__ import annotations

import contextlib
import sys

from yolo.errors import UserError


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (bad path, bad file, bad dataset): one line, no traceback."""
    return UserError, FileNotFoundError


@contextlib.contextmanager
def exit_on_user_error(code: int = 1):
    """Turn a user-input error into one clear ``ERROR: ...`` line on stderr and a non-zero exit."""
    try:
        yield
    except user_error_types() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
        sys.exit(code)


def rewrite_data_override(argv: list[str]) -> list[str]:
    """``data=path/to/custom.yaml`` → ``data=external data.file=/abs/path/to/custom.yaml``.

    ``data`` is a Hydra config group (``conf/data``); upstream users pass a dataset YAML path instead
    (``--data path``).  A value that names a group option (``data=coco128``) is left alone.
    """
    from pathlib import Path

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in ("data", "+data") and value.endswith((".yaml", ".yml")) and "," not in value:
            out += ["data=external", f"data.file={Path(value).expanduser().resolve()}"]
        else:
            out.append(arg)
    return out
