"""MLflow tracking for training and evolution runs: an observer that never kills a run.

Every MLflow call made here is wrapped: the first exception (unreachable server, bad URI, locked
database, rejected value, ...) logs ONE warning, e.g.::

    MLflow tracking disabled: cannot reach http://127.0.0.1:9/ (ConnectionError: ...)

disables the :class:`Tracker`, and every later call becomes a no-op, so training goes on.
``mlflow`` itself is imported lazily, on the first :meth:`Tracker.start`, so importing this module
is cheap and a disabled tracker costs nothing (``import mlflow`` takes ~1.5 s, opening an existing
SQLite store another ~0.7 s, creating a fresh one ~2 s because of the schema migrations).

We use :class:`mlflow.tracking.MlflowClient` only, never the fluent API (``mlflow.start_run``),
whose active-run stack is process-global state; a run is always addressed by its id, so one
process can drive a parent run and many child runs, one after another.

Storage (see :func:`resolve_tracking_uri`)
------------------------------------------
Unless told otherwise we use a SQLite database ``<default_dir>/mlflow.db`` and put artifacts in
``<default_dir>/mlartifacts`` (experiments we create get ``artifact_location=file:///...`` there),
both as absolute paths, so a Hydra job that changes its working directory still writes to the same
store. Browse it with::

    mlflow ui --backend-store-uri sqlite:///<default_dir>/mlflow.db

Parent / child runs
-------------------
A child run carries the tag ``mlflow.parentRunId`` (what the fluent API's ``nested=True`` sets,
and what the UI groups by). The parent id comes from ``TrackingConfig.parent_run_id`` (the
evolution driver creates the parent and hands its id to every worker), from
:meth:`Tracker.start_parent`, or from :meth:`Tracker.get_or_create_parent`, which finds the active
(RUNNING) parent whose ``yolo.parent_key`` tag matches a key (e.g. the Hydra sweep dir) or creates
it: so N jobs of a sweep, in N processes, end up under one parent. Creation is serialised by a
file lock in ``default_dir`` (same machine); across machines a deterministic tie-break (earliest
``start_time``, then run id) makes losers delete their duplicate.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LOGGER = logging.getLogger(__name__)

# MLflow limits (mlflow.utils.validation, checked against mlflow 3.x).
MAX_PARAM_VAL_LENGTH = 6000  # longer values are truncated (MLflow raises or truncates itself)
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250  # params, metrics and tags
MAX_PARAMS_TAGS_PER_BATCH = 100  # params per log_batch call; tags likewise
MAX_METRICS_PER_BATCH = 1000

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
PARENT_KEY_TAG = "yolo.parent_key"  # sha1 of the key given to get_or_create_parent
PARENT_KEY_RAW_TAG = "yolo.parent_key_raw"  # the key itself, for humans
RUN_NAME_TAG = "mlflow.runName"

_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_HTTP_SCHEMES = ("http", "https")
# MLflow accepts these in param/metric/tag names (mlflow.utils.validation); ':' not on Windows.
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]" if os.name == "nt" else r"[^/\w.\- :]")


@dataclass
class TrackingConfig:
    """MLflow settings (``mlflow:`` in the Hydra config, :class:`yolo.config.MlflowConfig`)."""

    enabled: bool = True
    tracking_uri: str | None = None  # None: env MLFLOW_TRACKING_URI, else <default_dir>/mlflow.db
    experiment: str = "yolo"
    run_name: str | None = None
    parent_run_id: str | None = None  # make every run of this tracker a child of this run
    timeout_s: float = 5.0  # how long an unreachable tracking server may delay us, per call
    log_weights: bool = True  # read by the trainer: upload best.pt as an artifact


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


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
    """The command line of this process, shell-quoted (``python run_train.py epochs=3``)."""
    argv = list(sys.argv) if sys.argv and sys.argv[0] else []
    return shlex.join(["python", *argv]) if argv else "python"


def sanitize_name(name: str) -> str:
    """Map a metric/param/tag name onto what MLflow accepts, deterministically.

    MLflow allows letters, digits, ``_ - . / space`` and ``:`` (not on Windows): so
    ``metrics/mAP_0.5:0.95`` and ``train/box_loss`` pass unchanged. Any other character becomes
    ``_``; empty, ``.`` and ``..`` path segments (``a//b``, ``/a``, ``a/``) are dropped because
    MLflow rejects names that are not a normalised relative path; names longer than 250 characters
    are cut to 241 + ``_`` + 8 hex digits of their SHA-1.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "_"
    if len(name) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_KEY_LENGTH - 9]}_{digest}"
    return name


def _truncate(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redact(uri: str) -> str:
    """Drop user:password from a URI before it is printed."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _describe(exc: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {_truncate(msg, limit)}" if msg else type(exc).__name__


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs or in-memory DBs)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def resolve_tracking_uri(cfg: TrackingConfig, default_dir: str | os.PathLike[str]) -> str:
    """Pick the tracking URI: env ``MLFLOW_TRACKING_URI`` wins, then ``cfg.tracking_uri``, else
    ``sqlite:///<default_dir>/mlflow.db`` (absolute).

    Why this default: mlflow 3 itself falls back to ``sqlite:///mlflow.db`` in the *current working
    directory*, with artifacts in ``./mlruns`` of whatever the cwd was when the database was
    created, and Hydra jobs may change their cwd. We pin both to ``default_dir`` (the project's
    ``runs/`` folder): the DB at ``<default_dir>/mlflow.db`` and, for experiments we create,
    ``artifact_location=file://<default_dir>/mlartifacts`` (see :func:`artifact_location_for`);
    mlflow then puts each run's artifacts in ``<artifact_location>/<run_id>/artifacts``.

    Several processes (evolution workers, a parallel Hydra sweep) may share that SQLite file:
    MLflow opens every SQLite session with ``PRAGMA busy_timeout = 20000``, so concurrent writers
    wait for the lock (up to 20 s per statement) instead of failing; with per-epoch logging that is
    ample for a handful of workers on one machine (tested with 4 concurrent processes). It is not
    for many busy writers, nor for a DB on a network filesystem (NFS locking): there, run
    ``mlflow server`` and point ``MLFLOW_TRACKING_URI``/``tracking_uri`` at it.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg.tracking_uri:
        return str(cfg.tracking_uri)
    db = Path(default_dir).expanduser().resolve() / "mlflow.db"
    return "sqlite:///" + db.as_posix()


def artifact_location_for(tracking_uri: str) -> str | None:
    """Artifact root for experiments we create: ``<dir of the SQLite DB>/mlartifacts`` as a
    ``file:`` URI for SQLite stores, None (the server's or store's own default) otherwise."""
    db = _sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def probe_http(uri: str, timeout_s: float) -> None:
    """Raise (ConnectionError, Timeout, ...) if nothing answers HTTP at ``uri`` within
    ``timeout_s``. Any HTTP response, even an error status, counts as reachable: the probe only
    catches dead hosts/ports quickly; proxies from the environment are honoured."""
    import requests

    url = uri.rstrip("/") + "/health"
    timeout = max(0.1, float(timeout_s))
    with requests.Session() as session:
        session.get(url, timeout=(timeout, timeout), allow_redirects=False).close()


@contextlib.contextmanager
def _mlflow_http_env(timeout_s: float) -> Iterator[None]:
    """Bound MLflow's HTTP retries for the calls made inside this block.

    MLflow retries failed requests with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
    BACKOFF_FACTOR=2, TIMEOUT=120 s by default: minutes against a dead server). Unless the user has
    set them, we use 1 retry without backoff and a per-request timeout of ceil(timeout_s / 2)
    (MLflow reads it as an integer, at least 1), so a call gives up after about ``timeout_s``.
    urllib3's own "Retrying ..." warnings are silenced meanwhile (we log one warning ourselves).
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the tie-break in get_or_create_parent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _Disabled(Exception):
    """Raised inside Tracker to abandon an operation once tracking is disabled."""


# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """Logs one run at a time (params, metrics per step, artifacts, tags) to MLflow.

    ::

        tracker = Tracker(cfg.tracking, default_dir=project_root / "runs")
        with tracker:
            tracker.start(flatten_dict(cfg_dict), tags={"task": "train"})
            for epoch in ...:
                tracker.log_metrics({"train/box_loss": 0.05, "metrics/mAP_0.5:0.95": 0.3}, epoch)
            tracker.log_artifact(weights / "best.pt")
        # leaving the block ends the run: FINISHED, or FAILED on an exception (KILLED on Ctrl-C)

    A tracker may run several runs one after the other (start ... end, start ... end); each is a
    child of ``parent_run_id`` when that is set. Every method is safe to call when the tracker is
    disabled (``cfg.enabled`` false, or after a failure): it does nothing and returns None.
    """

    def __init__(self, cfg: TrackingConfig | None = None, default_dir: str | os.PathLike[str] = "runs"):
        self.cfg = cfg if cfg is not None else TrackingConfig()
        self.default_dir = Path(default_dir).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(self.cfg, self.default_dir)
        self.parent_run_id: str | None = self.cfg.parent_run_id or None
        self._enabled = bool(self.cfg.enabled)
        self._client: Any = None
        self._experiment_ids: dict[str, str] = {}
        self._run_id: str | None = None
        self._active = False
        self._atexit_registered = False
        self._pid = os.getpid()

    # ---- state ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def run_id(self) -> str | None:
        """Id of the current (or last) run, None if none was started."""
        return self._run_id

    @property
    def active(self) -> bool:
        return self._enabled and self._active

    @property
    def client(self) -> Any:
        """The underlying ``MlflowClient`` (None until the first successful connection)."""
        return self._client

    def disable(self, reason: str, exc: BaseException | None = None) -> None:
        """Turn tracking off, logging one warning (only the first time)."""
        if not self._enabled:
            return
        self._enabled = False
        detail = f" ({_describe(exc)})" if exc is not None else ""
        LOGGER.warning("MLflow tracking disabled: %s%s", reason, detail)

    # ---- plumbing --------------------------------------------------------------------------
    @property
    def _safe_uri(self) -> str:
        return _redact(self.tracking_uri)

    @property
    def _is_http(self) -> bool:
        return urlsplit(self.tracking_uri).scheme.lower() in _HTTP_SCHEMES

    @contextlib.contextmanager
    def _guard(self, what: str, *, long: bool = False) -> Iterator[None]:
        """Run MLflow calls; any exception disables the tracker (and is swallowed)."""
        if not self._enabled:
            raise _Disabled
        timeout = self.cfg.timeout_s if not long else max(60.0, 2 * float(self.cfg.timeout_s))
        try:
            with _mlflow_http_env(timeout):
                yield
        except _Disabled:
            raise
        except Exception as exc:  # noqa: BLE001 - by design: tracking must never kill a run
            self.disable(f"{what} failed on {self._safe_uri}", exc)
            raise _Disabled from None

    def _connect(self) -> bool:
        """Create the client on first use (probing HTTP servers first). False when disabled."""
        if not self._enabled:
            return False
        if self._client is not None:
            return True
        if self._is_http:
            try:
                probe_http(self.tracking_uri, self.cfg.timeout_s)
            except Exception as exc:  # noqa: BLE001
                self.disable(f"cannot reach {self._safe_uri}", exc)
                return False
        db = _sqlite_path(self.tracking_uri)
        # Creating a fresh SQLite store runs MLflow's schema migrations, which fail when two
        # processes do it at once ("Online migration expected to match one row ..."): serialise
        # the first connection (and experiment lookup/creation) with a lock file beside the DB.
        lock = _file_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()
        try:
            with self._guard("connecting"), lock:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                self._client = client
                self._experiment_id(self.cfg.experiment)  # touches the store: creates/migrates it
        except _Disabled:
            self._client = None
            return False
        return True

    def _experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created (with our artifact location) if missing."""
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        client = self._client
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=artifact_location_for(self.tracking_uri))
            except Exception:  # another process may have created it just now
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            exp_id = exp.experiment_id
        self._experiment_ids[name] = exp_id
        return exp_id

    def _default_tags(self) -> dict[str, str]:
        tags = {
            "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
            "mlflow.source.type": "LOCAL",
            "yolo.command": command_line(),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        try:
            import getpass

            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            pass
        return tags

    @staticmethod
    def _tag_list(tags: Mapping[str, Any]) -> list[Any]:
        from mlflow.entities import RunTag

        return [RunTag(sanitize_name(k), _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]

    def _log_params(self, run_id: str, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = flatten_dict(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
        todo: dict[str, str] = {}
        changed: list[str] = []
        for k, v in flat.items():
            key, value = sanitize_name(k), _truncate(v, MAX_PARAM_VAL_LENGTH)
            if key in existing:
                if existing[key] != value:
                    changed.append(key)  # MLflow params are immutable: keep the first value
                continue
            todo[key] = value  # a later duplicate (after sanitising) wins
        if changed:
            LOGGER.info(
                "MLflow: run %s already has different values for %d param(s) (%s); kept the old ones",
                run_id, len(changed), ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
            )
        items = [Param(k, v) for k, v in todo.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def _set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = self._tag_list(tags)
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def _register_atexit(self) -> None:
        self._pid = os.getpid()
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False

    def _atexit(self) -> None:
        # the process exits without end(): not a clean finish (ignored in forked children)
        if self.active and os.getpid() == self._pid:
            self.end("FAILED")

    # ---- runs ------------------------------------------------------------------------------
    def start(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Start a run (or continue ``resume_run_id``) and log ``params`` and ``tags``.

        ``params`` may be nested (flattened with ``.``); values are stringified and cut to 6000
        characters; on resume, params the run already has are not logged again (MLflow params are
        immutable; a changed value keeps the old one, with an info message). New runs are children
        of ``parent_run_id`` when it is set. Returns the run id, or None if tracking is disabled.
        """
        if self.active:
            self.end()
        if not self._connect():
            return None
        try:
            with self._guard("starting a run"):
                client = self._client
                all_tags = {**self._default_tags(), **dict(tags or {})}
                if resume_run_id:
                    run = client.get_run(resume_run_id)
                    if run.info.lifecycle_stage == "deleted":
                        client.restore_run(resume_run_id)
                    client.update_run(resume_run_id, status="RUNNING")
                    run_id, existing = resume_run_id, dict(run.data.params)
                    all_tags.pop(RUN_NAME_TAG, None)
                else:
                    exp_id = self._experiment_id(self.cfg.experiment)
                    run_name = self.cfg.run_name or all_tags.pop(RUN_NAME_TAG, None)
                    parent = {PARENT_RUN_ID_TAG: self.parent_run_id} if self.parent_run_id else None
                    run = client.create_run(exp_id, tags=parent, run_name=run_name)
                    run_id, existing = run.info.run_id, {}
                self._run_id, self._active = run_id, True
                self._register_atexit()
                self._set_tags(run_id, all_tags)
                self._log_params(run_id, params or {}, existing)
        except _Disabled:
            self._active = False
            return None
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log more params to the current run (nested mappings are flattened)."""
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard("logging params"):
            existing = dict(self._client.get_run(self._run_id).data.params)
            self._log_params(self._run_id, params, existing)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one point per metric at ``step``. Names are passed through :func:`sanitize_name`
        (``train/box_loss``, ``metrics/mAP_0.5:0.95`` stay as they are); values go through
        ``float()`` (tensors, numpy scalars); values that cannot are skipped."""
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except Exception:  # noqa: BLE001 - e.g. a multi-element tensor: skip, never raise
                continue
            items.append(Metric(sanitize_name(k), value, ts, int(step)))
        if not items:
            return
        with contextlib.suppress(_Disabled), self._guard("logging metrics"):
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy/upload one file into the run's artifacts (under ``artifact_path`` if given)."""
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard(f"logging artifact {path}", long=True):
            self._client.log_artifact(self._run_id, os.fspath(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy/upload a directory's contents into the run's artifacts."""
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard(f"logging artifacts {directory}", long=True):
            self._client.log_artifacts(self._run_id, os.fspath(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard("setting tags"):
            self._set_tags(self._run_id, tags)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the current run terminated (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        status = status.upper()
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        was_active, self._active = self._active, False
        self._unregister_atexit()
        if not (was_active and self._enabled):
            return
        with contextlib.suppress(_Disabled), self._guard("ending the run"):
            self._client.set_terminated(self._run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # ---- parents ---------------------------------------------------------------------------
    def start_parent(self, name: str | None = None, tags: Mapping[str, Any] | None = None) -> str | None:
        """Create a new parent run (left RUNNING) in ``cfg.experiment``; later :meth:`start` calls
        create its children. Returns its id (also stored in ``parent_run_id``)."""
        if not self._connect():
            return None
        try:
            with self._guard("creating a parent run"):
                run_id = self._create_parent(self.cfg.experiment, name, dict(tags or {}))
        except _Disabled:
            return None
        self.parent_run_id = run_id
        return run_id

    def _create_parent(self, experiment: str, name: str | None, tags: dict[str, Any]) -> str:
        exp_id = self._experiment_id(experiment)
        run = self._client.create_run(exp_id, run_name=name)
        self._set_tags(run.info.run_id, {**self._default_tags(), **tags})
        return run.info.run_id

    def get_or_create_parent(
        self,
        experiment: str | None,
        name: str | None,
        key_tag: str,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """The id of the RUNNING parent run of ``experiment`` (default ``cfg.experiment``) tagged
        with ``key_tag`` (e.g. the Hydra sweep dir), created if there is none yet.

        Safe to call from many processes at once: the lookup-or-create is done under a file lock
        in ``default_dir``; and (for processes on different machines sharing a server) after
        creating, the earliest parent with that key wins and a duplicate we made is deleted.
        The key is stored hashed in tag ``yolo.parent_key`` (raw in ``yolo.parent_key_raw``).
        Sets ``parent_run_id``; later :meth:`start` calls create children of it.
        """
        if not self._connect():
            return None
        experiment = experiment or self.cfg.experiment
        key = hashlib.sha1(str(key_tag).encode()).hexdigest()
        try:
            with self._guard("finding the parent run"), _file_lock(self.default_dir / ".mlflow_parent.lock"):
                exp_id = self._experiment_id(experiment)
                found = self._find_parents(exp_id, key)
                if found:
                    run_id = found[0].info.run_id
                else:
                    mine = self._create_parent(
                        experiment,
                        name,
                        {**dict(tags or {}), PARENT_KEY_TAG: key, PARENT_KEY_RAW_TAG: str(key_tag)},
                    )
                    found = self._find_parents(exp_id, key)
                    run_id = found[0].info.run_id if found else mine
                    if run_id != mine:  # lost a cross-machine race: drop our duplicate
                        self._client.delete_run(mine)
        except _Disabled:
            return None
        self.parent_run_id = run_id
        return run_id

    def _find_parents(self, exp_id: str, key: str) -> list[Any]:
        runs = self._client.search_runs(
            [exp_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'", max_results=100
        )
        runs = [r for r in runs if r.info.status == "RUNNING"]
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def finish_parent(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        """Terminate a parent run (default: this tracker's ``parent_run_id``)."""
        status = status.upper()
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        run_id = run_id or self.parent_run_id
        if not run_id or not self._connect():
            return
        with contextlib.suppress(_Disabled), self._guard("finishing the parent run"):
            self._client.set_terminated(run_id, status=status)
