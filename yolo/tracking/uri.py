"""Where MLflow data goes: the tracking URI, the local store beside the runs folder, and bounded HTTP.

Unless told otherwise we use a SQLite database ``<store dir>/mlflow.db`` and put artifacts in
``<store dir>/mlartifacts`` (experiments we create get ``artifact_location=file:///...`` there), both as absolute
paths, so a Hydra job that changes its working directory still writes to the same store. For a training config
the store dir is the parent of ``project`` (``runs/`` for ``runs/train``, see :func:`store_dir`). Browse it with::

    mlflow ui --backend-store-uri sqlite:///<store dir>/mlflow.db
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HTTP_SCHEMES = ("http", "https")


def store_dir(cfg: Any) -> Path:
    """Where a training config's local MLflow store lives: the parent of ``project`` (``runs/`` for ``runs/train``).

    ``cfg`` is a training config (``TrainConfig``, a DictConfig or a mapping with ``project``)."""
    project = cfg["project"] if isinstance(cfg, Mapping) else cfg.project
    return Path(str(project)).expanduser().resolve().parent


def _configured_uri(cfg: Any) -> str | None:
    if cfg is None:
        return None
    uri = cfg.get("tracking_uri") if isinstance(cfg, Mapping) else getattr(cfg, "tracking_uri", None)
    return str(uri) if uri else None


def resolve_tracking_uri(cfg: Any, default_dir: str | os.PathLike[str]) -> str:
    """Pick the tracking URI: env ``MLFLOW_TRACKING_URI`` wins, then ``cfg.tracking_uri`` (``cfg``: an
    :class:`yolo.config.MlflowConfig`, a mapping or DictConfig of it, or None), else
    ``sqlite:///<default_dir>/mlflow.db`` (absolute).

    Why this default: mlflow 3 itself falls back to ``sqlite:///mlflow.db`` in the *current working directory*,
    with artifacts in ``./mlruns`` of whatever the cwd was when the database was created, and Hydra jobs may change
    their cwd. We pin both to ``default_dir`` (the project's ``runs/`` folder): the DB at
    ``<default_dir>/mlflow.db`` and, for experiments we create, ``artifact_location=file://<default_dir>/mlartifacts``
    (see :func:`artifact_location_for`); mlflow then puts each run's artifacts in
    ``<artifact_location>/<run_id>/artifacts``.

    Several processes (evolution workers, a parallel Hydra sweep) may share that SQLite file: MLflow opens every
    SQLite session with ``PRAGMA busy_timeout = 20000``, so concurrent writers wait for the lock (up to 20 s per
    statement) instead of failing; with per-epoch logging that is ample for a handful of workers on one machine
    (tested with 4 concurrent processes). It is not for many busy writers, nor for a DB on a network filesystem
    (NFS locking): there, run ``mlflow server`` and point ``MLFLOW_TRACKING_URI``/``tracking_uri`` at it.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    configured = _configured_uri(cfg)
    if configured:
        return configured
    db = Path(default_dir).expanduser().resolve() / "mlflow.db"
    return "sqlite:///" + db.as_posix()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs or in-memory DBs)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def artifact_location_for(tracking_uri: str) -> str | None:
    """Artifact root for experiments we create: ``<dir of the SQLite DB>/mlartifacts`` as a ``file:`` URI for
    SQLite stores, None (the server's or store's own default) otherwise."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def is_http(uri: str) -> bool:
    try:
        return urlsplit(uri).scheme.lower() in HTTP_SCHEMES
    except ValueError:
        return False


def probe_http(uri: str, timeout_s: float) -> None:
    """Raise (ConnectionError, Timeout, ...) if nothing answers HTTP at ``uri`` within ``timeout_s``. Any HTTP
    response, even an error status, counts as reachable: the probe only catches dead hosts/ports quickly; proxies
    from the environment are honoured."""
    import requests  # deferred: only HTTP stores need it (it comes with mlflow)

    url = uri.rstrip("/") + "/health"
    timeout = max(0.1, float(timeout_s))
    with requests.Session() as session:
        session.get(url, timeout=(timeout, timeout), allow_redirects=False).close()


@contextlib.contextmanager
def mlflow_http_env(timeout_s: float) -> Iterator[None]:
    """Bound MLflow's HTTP retries for the calls made inside this block.

    MLflow retries failed requests with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
    BACKOFF_FACTOR=2, TIMEOUT=120 s by default: minutes against a dead server). Unless the user has set them, we
    use 1 retry without backoff and a per-request timeout of ceil(timeout_s / 2) (MLflow reads it as an integer, at
    least 1), so a call gives up after about ``timeout_s``. urllib3's own "Retrying ..." warnings are silenced
    meanwhile (the tracker logs one warning itself).
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(float(timeout_s) / 2))),
    }
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    urllib3_logger = logging.getLogger("urllib3.connectionpool")
    quiet = logging.Filter("\0never")  # a name no record has: drops every record
    urllib3_logger.addFilter(quiet)
    try:
        yield
    finally:
        urllib3_logger.removeFilter(quiet)
        for k in added:
            if os.environ.get(k) == wanted[k]:
                del os.environ[k]
