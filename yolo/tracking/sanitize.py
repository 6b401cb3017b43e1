"""What we send to MLflow, made acceptable and safe: names MLflow accepts, values within its limits, no password.

MLflow rejects some characters in param/metric/tag names and caps value lengths; :func:`sanitize_name` and
:func:`clean_value` map anything onto what it accepts, deterministically. Every value, run name and text artifact
goes through :func:`yolo.utils.redact.redact_text` first: a ``tracking_uri`` (or any URL) with a password, given
on the command line or in the config, reaches MLflow as ``user:***@host``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from yolo.utils.files import atomic_write
from yolo.utils.redact import redact_text

# MLflow limits (mlflow.utils.validation, checked against mlflow 3.x).
MAX_PARAM_VAL_LENGTH = 6000  # longer values are truncated (MLflow raises or truncates itself)
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250  # params, metrics and tags
MAX_RUN_NAME_LENGTH = 250  # the runs table's name column
MAX_PARAMS_TAGS_PER_BATCH = 100  # params per log_batch call; tags likewise
MAX_METRICS_PER_BATCH = 1000

# MLflow accepts these in param/metric/tag names (mlflow.utils.validation); ':' not on Windows.
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]" if os.name == "nt" else r"[^/\w.\- :]")
# artifacts read as text and redacted before upload (a config, a log, a table); others are sent as they are
TEXT_SUFFIXES = frozenset({".yaml", ".yml", ".txt", ".log", ".json", ".csv", ".cfg", ".ini", ".toml", ".md"})


def flatten_dict(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings: ``{"hyp": {"lr0": 0.01}}`` -> ``{"hyp.lr0": 0.01}``.

    Non-mapping values (lists included) are kept as they are; empty mappings vanish.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, sep=sep, prefix=name))
        else:
            out[name] = value
    return out


def sanitize_name(name: str) -> str:
    """Map a metric/param/tag name onto what MLflow accepts, deterministically.

    MLflow allows letters, digits, ``_ - . / space`` and ``:`` (not on Windows): so ``metrics/mAP_0.5:0.95`` and
    ``train/box_loss`` pass unchanged. Any other character becomes ``_``; empty, ``.`` and ``..`` path segments
    (``a//b``, ``/a``, ``a/``) are dropped because MLflow rejects names that are not a normalised relative path;
    names longer than 250 characters are cut to 241 + ``_`` + 8 hex digits of their SHA-1.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "_"
    return shorten(name, MAX_KEY_LENGTH, sep="_")


def shorten(text: str, limit: int, sep: str = "~") -> str:
    """``text`` if it fits in ``limit`` characters, else its head + ``sep`` + 8 hex digits of its SHA-1 (so two
    long texts that differ only at the end still differ)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{text[: limit - len(sep) - 8]}{sep}{digest}"


def truncate(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_value(value: Any, limit: int) -> str:
    """A param/tag value as MLflow stores it: a string, passwords masked, at most ``limit`` characters."""
    return truncate(redact_text(value if isinstance(value, str) else str(value)), limit)


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters, passwords masked."""
    msg = redact_text(" ".join(str(exc).split()))
    return f"{type(exc).__name__}: {truncate(msg, limit)}" if msg else type(exc).__name__


# ---- text artifacts --------------------------------------------------------------------------------------------


def _open_text(path: Path, mode: str):
    # surrogateescape and newline="" keep every byte of a line we do not change
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")


def _has_secret(path: Path) -> bool:
    if path.suffix.lower() not in TEXT_SUFFIXES or path.is_symlink() or not path.is_file():
        return False
    with _open_text(path, "r") as f:
        return any("://" in line and redact_text(line) != line for line in f)


def _redact_in_place(path: Path) -> None:
    def write(dst) -> None:
        with _open_text(path, "r") as src:
            for line in src:
                dst.write(redact_text(line).encode("utf-8", errors="surrogateescape"))

    atomic_write(path, write)


@contextlib.contextmanager
def redacted_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The file to upload for ``path``: itself, or (when a text file holds a URL with a password) a redacted copy
    of the same name in a temporary folder that is removed afterwards."""
    path = Path(path)
    if not _has_secret(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="yolo-mlflow-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        _redact_in_place(copy)
        yield copy


@contextlib.contextmanager
def redacted_dir(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """The folder to upload for ``directory``: itself, or a temporary copy in which every text file holding a URL
    with a password is redacted."""
    directory = Path(directory)
    secret = [p.relative_to(directory) for p in sorted(directory.rglob("*")) if _has_secret(p)]
    if not secret:
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="yolo-mlflow-") as tmp:
        copy = Path(tmp) / directory.name
        shutil.copytree(directory, copy, symlinks=True)
        for rel in secret:
            _redact_in_place(copy / rel)
        yield copy
