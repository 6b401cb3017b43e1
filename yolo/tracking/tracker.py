"""The run's tracker: an MLflow observer that never kills a run.

Every MLflow call made here is wrapped: the first exception (unreachable server, bad URI, locked database,
rejected value, ...) logs ONE warning, e.g.::

    MLflow tracking disabled: cannot reach http://127.0.0.1:9/ (ConnectionError: ...)

disables the :class:`Tracker`, and every later call becomes a no-op, so training goes on. ``mlflow`` itself is
imported lazily, on the first :meth:`Tracker.start`, so importing this module is cheap and a disabled tracker costs
nothing (``import mlflow`` takes ~1.5 s, opening an existing SQLite store another ~0.7 s, creating a fresh one
~2 s because of the schema migrations).

We use :class:`mlflow.tracking.MlflowClient` only, never the fluent API (``mlflow.start_run``), whose active-run
stack is process-global state; a run is always addressed by its id, so one process can drive a parent run and many
child runs, one after another. Every run gets a name (ours, or the caller's): MLflow's own random names come from
Python's global ``random``, which training has just seeded, so they would repeat from run to run.

The settings are :class:`yolo.config.MlflowConfig` (``mlflow:`` in the Hydra config); the parent id of child runs
comes from ``MlflowConfig.parent_run_id`` (the evolution driver creates the parent and hands its id to every
worker), from :meth:`Tracker.start_parent`, or from :meth:`Tracker.get_or_create_parent` (see
:mod:`yolo.tracking.parents`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from yolo.config import MlflowConfig
from yolo.errors import ConfigError
from yolo.tracking.parents import (
    PARENT_KEY_RAW_TAG,
    PARENT_KEY_TAG,
    PARENT_RUN_ID_TAG,
    list_children,
    claim_parent,
    find_parents,
    parent_key,
)
from yolo.tracking.sanitize import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_RUN_NAME_LENGTH,
    MAX_TAG_VAL_LENGTH,
    clean_value,
    describe,
    flatten_dict,
    redacted_dir,
    redacted_file,
    sanitize_name,
    shorten,
)
from yolo.tracking.source import source_tags
from yolo.tracking.uri import (
    artifact_location_for,
    is_http,
    mlflow_http_env,
    probe_http,
    resolve_tracking_uri,
    sqlite_path,
)
from yolo.utils.files import FileLock
from yolo.utils.redact import redact_text, redact_url

LOGGER = logging.getLogger("yolo.tracking")  # the package's one logger, whatever module logs

RUN_NAME_TAG = "mlflow.runName"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def mlflow_config(cfg: Any = None) -> MlflowConfig:
    """``cfg`` as a new :class:`yolo.config.MlflowConfig`: a copy of the object, or a mapping/DictConfig of its fields
    checked against the schema (an unknown key or a wrong type is a :class:`yolo.errors.ConfigError`)."""
    if cfg is None:
        return MlflowConfig()
    if isinstance(cfg, MlflowConfig):
        return dataclasses.replace(cfg)  # a copy: what a caller changes later is not ours
    try:
        node = OmegaConf.merge(OmegaConf.structured(MlflowConfig),
                               cfg if isinstance(cfg, DictConfig) else dict(cfg))
        return OmegaConf.to_object(node)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"mlflow: {first}") from None


def run_name_or_fallback(name: str | None) -> str:
    """A run name MLflow stores as given: ``name`` with passwords masked and cut to fit, or, with no name, one of
    our own (``run-<8 hex>``, from the OS's randomness, never from the seeded global ``random``)."""
    if not name:
        return f"run-{secrets.token_hex(4)}"
    return shorten(redact_text(str(name)), MAX_RUN_NAME_LENGTH)


def _check_status(status: str) -> str:
    status = status.upper()
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    return status


class _Disabled(Exception):
    """Raised inside Tracker to abandon an operation once tracking is disabled."""


class Tracker:
    """Logs one run at a time (params, metrics per step, artifacts, tags) to MLflow.

    ::

        tracker = Tracker(cfg.mlflow, default_dir=store_dir(cfg))
        with tracker:
            tracker.start(flatten_dict(cfg_dict), tags={"task": "train"}, run_name="yolov5s-coco128-exp")
            for epoch in ...:
                tracker.log_metrics({"train/box_loss": 0.05, "metrics/mAP_0.5:0.95": 0.3}, epoch)
            tracker.log_artifact(weights / "best.pt")
        # leaving the block ends the run: FINISHED, or FAILED on an exception (KILLED on Ctrl-C)

    ``cfg`` is an :class:`yolo.config.MlflowConfig` or a mapping/DictConfig of its fields. A tracker may run several
    runs one after the other (start ... end, start ... end); each is a child of ``parent_run_id`` when that is set.
    Every method is safe to call when the tracker is disabled (``cfg.enabled`` false, or after a failure): it does
    nothing and returns None. No password of a URL reaches MLflow (params, tags, names, text artifacts) or the log.
    """

    def __init__(self, cfg: Any = None, default_dir: str | os.PathLike[str] = "runs"):
        self.cfg = mlflow_config(cfg)
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

    # ---- state -----------------------------------------------------------------------------------------------
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

    @property
    def safe_uri(self) -> str:
        """The tracking URI as it may be printed (password masked)."""
        return redact_url(self.tracking_uri)

    def disable(self, reason: str, exc: BaseException | None = None) -> None:
        """Turn tracking off, logging one warning (only the first time)."""
        if not self._enabled:
            return
        self._enabled = False
        detail = f" ({describe(exc)})" if exc is not None else ""
        LOGGER.warning("MLflow tracking disabled: %s%s", redact_text(reason), detail)

    # ---- plumbing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, what: str, *, long: bool = False) -> Iterator[None]:
        """Run MLflow calls; any exception disables the tracker (and is swallowed)."""
        if not self._enabled:
            raise _Disabled
        timeout = self.cfg.timeout_s if not long else max(60.0, 2 * float(self.cfg.timeout_s))
        try:
            with mlflow_http_env(timeout):
                yield
        except _Disabled:
            raise
        except Exception as exc:  # noqa: BLE001 - by design: tracking must never kill a run
            self.disable(f"{what} failed on {self.safe_uri}", exc)
            raise _Disabled from None

    def _connect(self) -> bool:
        """Create the client on first use (probing HTTP servers first). False when disabled."""
        if not self._enabled:
            return False
        if self._client is not None:
            return True
        if is_http(self.tracking_uri):
            try:
                probe_http(self.tracking_uri, self.cfg.timeout_s)
            except Exception as exc:  # noqa: BLE001
                self.disable(f"cannot reach {self.safe_uri}", exc)
                return False
        db = sqlite_path(self.tracking_uri)
        # Creating a fresh SQLite store runs MLflow's schema migrations, which fail when two processes do it at once
        # ("Online migration expected to match one row ..."): serialise the first connection (and experiment
        # lookup/creation) with a lock file beside the DB.
        lock = FileLock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()
        try:
            with self._guard("connecting"), lock:
                from mlflow.tracking import MlflowClient  # deferred: `import mlflow` costs ~1.5 s

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
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

    def _log_params(self, run_id: str, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param  # deferred with mlflow

        flat = flatten_dict(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
        todo: dict[str, str] = {}
        changed: list[str] = []
        for k, v in flat.items():
            key, value = sanitize_name(k), clean_value(v, MAX_PARAM_VAL_LENGTH)
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
        from mlflow.entities import RunTag  # deferred with mlflow

        items = [RunTag(sanitize_name(k), clean_value(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
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

    # ---- runs ------------------------------------------------------------------------------------------------
    def start(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_run_id: str | None = None,
        run_name: str | None = None,
    ) -> str | None:
        """Start a run (or continue ``resume_run_id``) and log ``params`` and ``tags``.

        ``params`` may be nested (flattened with ``.``); values are stringified and cut to 6000 characters; on
        resume, params the run already has are not logged again (MLflow params are immutable; a changed value keeps
        the old one, with an info message) and the run keeps its name. A new run is named ``cfg.run_name`` when set
        (an explicit name wins), else ``run_name``, else a ``mlflow.runName`` tag, else ``run-<8 hex>``; it is a
        child of ``parent_run_id`` when that is set. Returns the run id, or None if tracking is disabled.
        """
        if self.active:
            self.end()
        if not self._connect():
            return None
        try:
            with self._guard("starting a run"):
                client = self._client
                all_tags = {**source_tags(), **dict(tags or {})}
                tag_name = all_tags.pop(RUN_NAME_TAG, None)
                if resume_run_id:
                    run = client.get_run(resume_run_id)
                    if run.info.lifecycle_stage == "deleted":
                        client.restore_run(resume_run_id)
                    client.update_run(resume_run_id, status="RUNNING")
                    run_id, existing = resume_run_id, dict(run.data.params)
                else:
                    exp_id = self._experiment_id(self.cfg.experiment)
                    name = run_name_or_fallback(self.cfg.run_name or run_name or tag_name)
                    parent = {PARENT_RUN_ID_TAG: self.parent_run_id} if self.parent_run_id else None
                    run = client.create_run(exp_id, tags=parent, run_name=name)
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

    def metric_steps(self, key: str) -> set[int]:
        """The steps at which this run has logged ``key``."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one point per metric at ``step``. Names are passed through :func:`sanitize_name`
        (``train/box_loss``, ``metrics/mAP_0.5:0.95`` stay as they are); values go through ``float()`` (tensors,
        numpy scalars); values that cannot are skipped."""
        if not self.active:
            return
        from mlflow.entities import Metric  # deferred with mlflow

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
        """Copy/upload one file into the run's artifacts (under ``artifact_path`` if given); a text file holding a
        URL with a password is uploaded redacted."""
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard(f"logging artifact {path}", long=True):
            with redacted_file(path) as upload:
                self._client.log_artifact(self._run_id, os.fspath(upload), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy/upload a directory's contents into the run's artifacts (text files with passwords redacted)."""
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard(f"logging artifacts {directory}", long=True):
            with redacted_dir(directory) as upload:
                self._client.log_artifacts(self._run_id, os.fspath(upload), artifact_path)

    def log_model(self, weights: str | os.PathLike[str], imgsz: int, register_name: str | None = None) -> Any:
        """Log ``weights`` as the run's MLflow pyfunc model (``runs:/<id>/model``, :mod:`yolo.tracking.pyfunc`) and,
        with ``register_name``, register it as a new version of that model, tagged with the run's latest metrics.
        Returns the ``ModelVersion`` (or the model URI when not registering; None when inactive).

        Unlike the other methods this one RAISES on failure and leaves the tracker enabled: a model that cannot be
        saved or registered is the caller's one warning, and the run still ends with its real status."""
        if not self.active:
            return None
        from yolo.tracking import pyfunc  # deferred: imports mlflow.pyfunc and pandas (seconds), only when logging

        with mlflow_http_env(max(60.0, 2 * float(self.cfg.timeout_s))):
            uri = pyfunc.log_model(self._client, self._run_id, weights, imgsz)
            if register_name:
                return pyfunc.register_model(self._client, register_name, self._run_id)
        return uri

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        with contextlib.suppress(_Disabled), self._guard("setting tags"):
            self._set_tags(self._run_id, tags)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the current run terminated (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        status = _check_status(status)
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

    # ---- parents (see yolo.tracking.parents) -----------------------------------------------------------------
    def start_parent(self, name: str | None = None, tags: Mapping[str, Any] | None = None) -> str | None:
        """Create a new parent run (left RUNNING) in ``cfg.experiment``; later :meth:`start` calls create its
        children. Returns its id (also stored in ``parent_run_id``)."""
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
        run = self._client.create_run(exp_id, run_name=run_name_or_fallback(name))
        self._set_tags(run.info.run_id, {**source_tags(), **tags})
        return run.info.run_id

    def get_or_create_parent(
        self,
        experiment: str | None,
        name: str | None,
        key_tag: str,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """The id of the RUNNING parent run of ``experiment`` (default ``cfg.experiment``) tagged with ``key_tag``
        (e.g. the Hydra sweep dir), created if there is none yet.

        Safe to call from many processes at once: the lookup-or-create is done under a file lock in
        ``default_dir``; and (for processes on different machines sharing a server) after creating, the earliest
        parent with that key wins and a duplicate we made is deleted. The key is stored hashed in tag
        ``yolo.parent_key`` (raw in ``yolo.parent_key_raw``). Sets ``parent_run_id``; later :meth:`start` calls
        create children of it.
        """
        if not self._connect():
            return None
        experiment = experiment or self.cfg.experiment
        key = parent_key(key_tag)
        all_tags = {**dict(tags or {}), PARENT_KEY_TAG: key, PARENT_KEY_RAW_TAG: str(key_tag)}
        try:
            with self._guard("finding the parent run"), FileLock(self.default_dir / ".mlflow_parent.lock"):
                exp_id = self._experiment_id(experiment)
                run_id = claim_parent(self._client, exp_id, key,
                                              lambda: self._create_parent(experiment, name, all_tags))
        except _Disabled:
            return None
        self.parent_run_id = run_id
        return run_id

    def find_parent(self, key_tag: str, experiment: str | None = None) -> str | None:
        """The id of the RUNNING parent tagged with ``key_tag`` (see :meth:`get_or_create_parent`), or None: never
        creates one."""
        if not self._connect():
            return None
        try:
            with self._guard("finding the parent run"):
                exp_id = self._experiment_id(experiment or self.cfg.experiment)
                found = find_parents(self._client, exp_id, parent_key(key_tag))
        except _Disabled:
            return None
        return found[0].info.run_id if found else None

    def child_runs(self, parent_id: str) -> list[Any]:
        """The child runs of ``parent_id`` (MLflow ``Run`` objects; [] when disabled)."""
        if not self._connect():
            return []
        try:
            with self._guard("listing child runs"):
                exp_id = self._client.get_run(parent_id).info.experiment_id
                return list_children(self._client, exp_id, parent_id)
        except _Disabled:
            return []

    def finish_parent(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        """Terminate a parent run (default: this tracker's ``parent_run_id``)."""
        status = _check_status(status)
        run_id = run_id or self.parent_run_id
        if not run_id or not self._connect():
            return
        with contextlib.suppress(_Disabled), self._guard("finishing the parent run"):
            self._client.set_terminated(run_id, status=status)
