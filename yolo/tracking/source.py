"""Where a run comes from: the command line, the git commit and the user, as MLflow's source tags."""

from __future__ import annotations

import getpass
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from yolo.utils.redact import redact_text


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The HEAD commit of the git work tree holding ``path`` (default: this package), else None.

    Never raises: no git, no repository, no commit yet, a timeout all give None.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def command_line() -> str:
    """The command line of this process, shell-quoted (``python run_train.py epochs=3``), passwords masked."""
    argv = list(sys.argv) if sys.argv and sys.argv[0] else []
    return redact_text(shlex.join(["python", *argv])) if argv else "python"


def source_tags() -> dict[str, str]:
    """MLflow's source tags for a run started by this process (the command, the commit, the user)."""
    tags = {
        "mlflow.source.name": redact_text(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
        "yolo.command": command_line(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers (KeyError, OSError...)
        pass
    return tags
