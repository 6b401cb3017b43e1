"""The ledger of an evolution: the Optuna storage is the record, the upstream-format files are views of it.

- :func:`open_storage`: a JournalStorage file in the evolution folder by default (safe for several processes on
  one machine), or any SQLAlchemy URL (several machines), with heartbeats for the latter.
- :func:`study_rows` / :func:`export_outputs`: ``evolve.csv`` (upstream's header, fields padded to 20 characters,
  values with 5 significant digits), ``hyp_evolve.yaml`` (the best hyps after comment lines naming the best and
  last generation and the best metrics) and ``evolve.png`` (one scatter per hyperparameter, value against
  fitness, the best marked), always regenerated from the COMPLETE trials in trial-number order.
- :func:`read_evolve_csv` / :func:`seed_study_from_csv`: an ``evolve.csv`` written by upstream (padded) or by
  anyone else (plain) seeds or resumes a search.
- :func:`recover_stale_trials`: RUNNING trials whose worker died become FAIL (with the reason) and are retried
  once per ``max_retries``, never counted as finished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import os
import random
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve import mutation
from evolve.journal import SafeJournalFile
from evolve.samplers import FULL_HYP_ATTR, HYP_ATTR, METRICS_ATTR
from evolve.space import HYP_KEYS, SearchSpace

log = logging.getLogger("yolo.evolve")

METRIC_KEYS: tuple[str, ...] = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                                "val/box_loss", "val/obj_loss", "val/cls_loss")
FIELD_WIDTH = 20
CSV_NAME, YAML_NAME, PNG_NAME = "evolve.csv", "hyp_evolve.yaml", "evolve.png"
JOURNAL_NAME = "evolve_journal.log"
OWNER_ATTR = "evolve:owner"  # system attr: which process runs a trial (host, pid, process start time)
FAIL_ATTR = "fail_reason"  # user attr of a failed trial
SURPLUS_ATTR = "evolve:surplus"  # system attr: a trial started past the budget by a cross-machine race
SOURCE_ATTR = "source"  # user attr of rows seeded from an evolve.csv


# ---------------------------------------------------------------------------------------------------------------
# rows and the upstream file formats
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One finished generation: the 7 metrics of evolve.csv and the complete hyps."""

    metrics: tuple[float, ...]
    hyp: dict[str, Any]
    number: int = -1  # Optuna trial number (-1 for rows read from a file)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fitness(self) -> float:
        return float(mutation.fitness(self.metrics[:4])[0])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def format_evolve_csv(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """evolve.csv text as upstream writes it: every field right-aligned in 20 characters, values ``%.5g``."""
    keys = list(METRIC_KEYS) + list(columns)
    lines = [",".join(f"{k:>{FIELD_WIDTH}s}" for k in keys)]
    for r in rows:
        vals = list(r.metrics[: len(METRIC_KEYS)]) + [r.hyp.get(k) for k in columns]
        lines.append(",".join(f"{_num(v):{FIELD_WIDTH}.5g}" for v in vals))
    return "\n".join(lines) + "\n"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def write_evolve_csv(path: str | os.PathLike, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    path = Path(path)
    _atomic_write(path, format_evolve_csv(rows, columns))
    return path


def read_evolve_csv(path: str | os.PathLike) -> tuple[list[str], list[Row]]:
    """Read an evolve.csv (fields padded as upstream writes them, or plain). Returns (hyp columns, rows)."""
    path = Path(path)
    text = path.read_text()
    reader = csv.reader(io.StringIO(text))
    lines = [[f.strip() for f in line] for line in reader if any(f.strip() for f in line)]
    if not lines:
        raise ValueError(f"{path}: empty evolve.csv")
    header = lines[0]
    if tuple(header[: len(METRIC_KEYS)]) != METRIC_KEYS:
        raise ValueError(f"{path}: not an evolve.csv: the first columns must be {', '.join(METRIC_KEYS)}, "
                         f"got {', '.join(header[:len(METRIC_KEYS)])}")
    columns = header[len(METRIC_KEYS):]
    unknown = [c for c in columns if c not in HYP_KEYS]
    if unknown:
        log.warning(f"WARNING: {path}: ignoring unknown hyperparameter columns {unknown}")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise ValueError(f"{path}:{i}: {len(line)} fields, header has {len(header)}")
        try:
            vals = [float(x) for x in line]
        except ValueError:
            raise ValueError(f"{path}:{i}: non-numeric field in {line}") from None
        metrics = tuple(vals[: len(METRIC_KEYS)])
        hyp = {c: v for c, v in zip(columns, vals[len(METRIC_KEYS):]) if c in HYP_KEYS}
        rows.append(Row(metrics, hyp))
    return [c for c in columns if c in HYP_KEYS], rows


def best_index(rows: Sequence[Row]) -> int:
    """Index of the best row by fitness as it reads from evolve.csv (first one on ties)."""
    f = mutation.fitness([[mutation.csv_value(m) for m in r.metrics[:4]] for r in rows])
    return int(np.argmax(f))


def format_hyp_yaml(rows: Sequence[Row], title: str = "") -> str:
    """hyp_evolve.yaml: comment lines (best and last generation, 0-based rows of evolve.csv, and the best
    metrics), then the best generation's complete hyps in training-config order."""
    import yaml

    i = best_index(rows)
    best = rows[i]
    head = [
        f"# Hyperparameter evolution results{': ' + title if title else ''}",
        f"# Best generation: {i}",
        f"# Last generation: {len(rows) - 1}",
        "# " + ", ".join(f"{k:>{FIELD_WIDTH}s}" for k in METRIC_KEYS),
        "# " + ", ".join(f"{_num(v):>{FIELD_WIDTH}.5g}" for v in best.metrics[: len(METRIC_KEYS)]),
        f"# fitness = 0.1 * mAP_0.5 + 0.9 * mAP_0.5:0.95 = {best.fitness:.5g}",
    ]
    hyp = {k: (None if best.hyp.get(k) is None else float(best.hyp[k])) for k in HYP_KEYS if k in best.hyp}
    return "\n".join(head) + "\n\n" + yaml.safe_dump(hyp, sort_keys=False)


def write_hyp_yaml(path: str | os.PathLike, rows: Sequence[Row], title: str = "") -> Path:
    path = Path(path)
    _atomic_write(path, format_hyp_yaml(rows, title))
    return path


def _density(x: np.ndarray, y: np.ndarray, bins: int = 20) -> np.ndarray:
    """How crowded each point's neighbourhood is (a 2-D histogram looked up per point), for colouring."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.ones(len(x))
    hist, xe, ye = np.histogram2d(x, y, bins=bins)
    xi = np.clip(np.digitize(x, xe) - 1, 0, hist.shape[0] - 1)
    yi = np.clip(np.digitize(y, ye) - 1, 0, hist.shape[1] - 1)
    return np.log1p(hist[xi, yi])


def plot_evolve(path: str | os.PathLike, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    """evolve.png: for each hyperparameter a scatter of value against fitness, the best generation marked '+'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fit = np.array([r.fitness for r in rows])
    j = best_index(rows)
    ncols = 5
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig = Figure(figsize=(10, 2 * nrows))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.04, top=0.96, wspace=0.12, hspace=0.5)
    for i, k in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        v = np.array([_num(r.hyp.get(k)) for r in rows])
        ax.scatter(v, fit, c=_density(v, fit), cmap="viridis", alpha=0.8, edgecolors="none", s=12)
        ax.plot(v[j], fit[j], "k+", markersize=15)
        ax.set_title(f"{k} = {v[j]:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        if i % ncols:
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("fitness", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


# ---------------------------------------------------------------------------------------------------------------
# storage <-> rows
# ---------------------------------------------------------------------------------------------------------------


def trial_row(t: FrozenTrial, base: Mapping[str, Any]) -> Row:
    hyp = {**base, **t.system_attrs.get(HYP_ATTR, {}), **t.params, **t.user_attrs.get(FULL_HYP_ATTR, {})}
    metrics = t.user_attrs.get(METRICS_ATTR)
    if metrics is None:  # not written by the driver: keep the objective value as mAP50-95 alone
        metrics = [0.0, 0.0, 0.0, float(t.value or 0.0) / 0.9, 0.0, 0.0, 0.0]
    return Row(tuple(float(m) for m in metrics), hyp, t.number)


def study_rows(trials: Iterable[FrozenTrial], base: Mapping[str, Any]) -> list[Row]:
    """The finished generations of a study (COMPLETE trials, in trial-number order)."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    return [trial_row(t, base) for t in done]


def export_outputs(rows: Sequence[Row], out_dir: str | os.PathLike, columns: Sequence[str], *, plot: bool = True,
                   title: str = "") -> dict[str, Path]:
    """Write evolve.csv, hyp_evolve.yaml and (with ``plot``) evolve.png for ``rows``; nothing without rows."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    if not rows:
        return paths
    paths["csv"] = write_evolve_csv(out_dir / CSV_NAME, rows, columns)
    paths["yaml"] = write_hyp_yaml(out_dir / YAML_NAME, rows, title)
    if plot:
        try:
            paths["png"] = plot_evolve(out_dir / PNG_NAME, rows, columns)
        except Exception as e:  # a plot must never lose an evolution
            log.warning(f"WARNING: evolve.png not written: {e}")
    return paths


def seed_study_from_csv(study: optuna.Study, path: str | os.PathLike, space: SearchSpace,
                        base: Mapping[str, Any]) -> int:
    """Add every row of an evolve.csv to the study as a finished generation (COMPLETE, fitness as value).

    Hyps missing from the file take the base values; ``anchors`` from the file is ignored when it is not searched.
    Values outside the current limits are kept for the mutation and clipped for Optuna's samplers.
    """
    columns, rows = read_evolve_csv(path)
    dists = space.distributions()
    for r in rows:
        hyp = {**base, **{k: v for k, v in r.hyp.items() if k in space.bounds or base.get(k) is not None}}
        if "anchors" not in space.bounds:
            hyp["anchors"] = base.get("anchors")
        params = {k: min(max(float(hyp[k]), d.low), d.high) for k, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=r.fitness, params=params, distributions=dists,
            user_attrs={METRICS_ATTR: list(r.metrics), FULL_HYP_ATTR: hyp, SOURCE_ATTR: str(path)},
            system_attrs={HYP_ATTR: hyp}))
    ignored = [c for c in columns if c not in space.bounds and c != "anchors"]
    log.info(f"evolve: seeded {len(rows)} generations from {path}"
             + (" (anchors column ignored: not searched)" if "anchors" in columns and "anchors" not in space.bounds
                else "") + (f"; not searched, kept from the file: {ignored}" if ignored else ""))
    return len(rows)


# ---------------------------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------------------------


def describe_storage(spec: str | None, out_dir: str | os.PathLike) -> tuple[str, str]:
    """``(kind, location)``: ('journal', file path) or ('rdb', SQLAlchemy URL)."""
    if spec is None or str(spec).strip() in ("", "journal"):
        return "journal", str((Path(out_dir) / JOURNAL_NAME).resolve())
    spec = str(spec).strip()
    if spec.startswith("journal:"):  # journal:relative/path or journal:///absolute/path
        rest = spec[len("journal:"):]
        return "journal", str(Path(rest[2:] if rest.startswith("//") else rest).resolve())
    if "://" in spec:
        return "rdb", spec
    return "journal", str(Path(spec).resolve())


DRIVER_HINTS = {"postgresql": "psycopg 3: pip install 'psycopg[binary]' (or pip install -e '.[postgres]')",
                "mysql": "PyMySQL: pip install pymysql (URL mysql+pymysql://...)"}
DRIVER_ALTERNATIVES = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("pymysql", "mysqldb"),
                       "mariadb": ("pymysql", "mysqldb")}


def with_installed_driver(url: str) -> str:
    """``url`` naming a driver that is installed: a URL without one (``postgresql://``) means SQLAlchemy's default
    driver for the database (psycopg2 before SQLAlchemy 2.1, psycopg 3 since); when that one is missing and another
    known driver is installed, the URL names that one. Any other URL is returned unchanged."""
    import sqlalchemy

    try:
        u = sqlalchemy.engine.make_url(url)
    except Exception:
        return url
    if "+" in u.drivername or u.drivername not in DRIVER_ALTERNATIVES:
        return url

    def loads(u) -> bool:
        try:  # SQLAlchemy 2.x: import_dbapi(); 1.4: dbapi()
            dialect = u.get_dialect()
            (dialect.import_dbapi if hasattr(dialect, "import_dbapi") else dialect.dbapi)()
        except (ImportError, sqlalchemy.exc.NoSuchModuleError):
            return False
        return True

    if loads(u):
        return url
    for driver in DRIVER_ALTERNATIVES[u.drivername]:
        candidate = u.set(drivername=f"{u.drivername}+{driver}")
        if loads(candidate):
            return candidate.render_as_string(hide_password=False)
    return url


def grace_period(heartbeat_s: int, grace_s: int | None) -> tuple[int, int]:
    """(heartbeat interval, grace) in seconds: the grace defaults to twice the interval, and exceeds it."""
    heartbeat_s = max(1, int(heartbeat_s))
    return heartbeat_s, (max(heartbeat_s + 1, int(grace_s)) if grace_s else 2 * heartbeat_s)


def open_storage(spec: str | None, out_dir: str | os.PathLike, *, heartbeat_s: int = 60,
                 grace_s: int | None = None, max_retries: int = 1) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the evolution's storage; see :func:`describe_storage`.

    An RDB storage records heartbeats: a RUNNING trial without one for ``grace_s`` (default twice ``heartbeat_s``)
    belongs to a dead worker (:func:`recover_stale_trials`). Workers started at the same moment against a new
    database create its tables one at a time (a lock in the database server, :class:`DatabaseLock`).
    """
    kind, where = describe_storage(spec, out_dir)
    if kind == "journal":
        return optuna.storages.JournalStorage(SafeJournalFile(where))
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if where.startswith("sqlite") else None
    if where.startswith("sqlite:///"):
        Path(where[len("sqlite:///"):].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    where = with_installed_driver(where)
    heartbeat_s, grace_s = grace_period(heartbeat_s, grace_s)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:  # when Optuna's own fail_stale_trials runs
        retry_trial(study, trial, max_retries, reason="no heartbeat")

    db_lock = None
    try:
        db_lock = database_lock(where, "schema")
        for attempt in range(4):
            try:
                with db_lock or contextlib.nullcontext(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(where, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                                      heartbeat_stale_trial_callback=on_stale)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                    optuna.exceptions.StorageInternalError) as e:  # tables created concurrently by another worker
                if attempt == 3:
                    raise
                log.debug(f"evolve: opening the storage raced with another worker ({type(e).__name__}), retrying")
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
        raise AssertionError("unreachable")
    except ModuleNotFoundError as e:
        hint = DRIVER_HINTS.get(_dialect(where), "its SQLAlchemy driver")
        raise ModuleNotFoundError(f"evolve.storage={_redact_url(where)} needs the database driver "
                                  f"{e.name!r}: install {hint}") from e
    finally:
        if db_lock is not None:
            db_lock.close()


def _dialect(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def _redact_url(url: str) -> str:
    """The URL without its password."""
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://..."


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (PostgreSQL advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(f"yolo-evolve:{name}".encode()).digest()[:8], "big", signed=True)


class DatabaseLock:
    """An exclusive lock between processes on any machines that use one database server, held in the server:
    a PostgreSQL advisory lock, or MySQL/MariaDB's ``GET_LOCK``. The server releases it when its holder's
    connection drops, so a killed worker never keeps it; a vanished machine's connection is dropped by the
    server's TCP keepalives (set to about a minute for this connection on PostgreSQL). Re-entrant within one
    process. It uses one connection of its own, kept open between acquisitions (opened again if it broke)."""

    DIALECTS = ("postgresql", "mysql", "mariadb")
    CONNECT_TRIES = 6  # a database unreachable for about a minute (1 + 2 + 4 + 8 + 16 + 30 s) stops the worker

    def __init__(self, url: str, name: str):
        self.url, self.name = with_installed_driver(url), name
        self.dialect = _dialect(url)
        if self.dialect not in self.DIALECTS:
            raise ValueError(f"no database lock for {self.dialect}")
        self.key = _lock_key(name)
        self._params = {"k": self.key, "n": f"yolo-evolve-{self.key & 0xFFFFFFFFFFFFFFFF:x}"}
        self._engine = None
        self._conn = None  # open between acquisitions
        self._depth = 0
        self._thread_lock = threading.RLock()

    def _statements(self) -> tuple[list[str], str, str]:
        """(session set-up statements, lock statement, unlock statement)."""
        if self.dialect == "postgresql":
            return (["SET tcp_keepalives_idle = 30", "SET tcp_keepalives_interval = 10",
                     "SET tcp_keepalives_count = 3"], "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)")
        return [], "SELECT GET_LOCK(:n, -1)", "SELECT RELEASE_LOCK(:n)"  # MySQL >= 5.7 / MariaDB: -1 waits forever

    def _connect(self) -> Any:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        for attempt in range(self.CONNECT_TRIES):
            try:
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                break
            except sqlalchemy.exc.OperationalError as e:
                permanent = any(m in str(e).lower() for m in ("authentication", "does not exist", "password"))
                if permanent or attempt == self.CONNECT_TRIES - 1:
                    raise
                wait = min(30, 2 ** attempt)
                log.warning(f"WARNING: evolve: database unreachable ({str(e).strip().splitlines()[0]}); "
                            f"retrying in {wait}s")
                time.sleep(wait)
        for stmt in self._statements()[0]:
            with contextlib.suppress(Exception):  # e.g. a Unix socket has no keepalives
                conn.exec_driver_sql(stmt)
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> DatabaseLock:
        import sqlalchemy

        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                lock = sqlalchemy.text(self._statements()[1])
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    self._conn.execute(lock, self._params)
                except sqlalchemy.exc.DBAPIError as e:  # the kept connection broke (server restart): a new one
                    if not e.connection_invalidated and not isinstance(e, sqlalchemy.exc.OperationalError):
                        raise
                    self._close()
                    self._conn = self._connect()
                    self._conn.execute(lock, self._params)
            self._depth += 1
        except BaseException:
            if self._depth == 0:
                self._close()  # a half-made request for the lock must not stay behind
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import sqlalchemy

        try:
            self._depth -= 1
            if self._depth == 0 and self._conn is not None:
                try:
                    self._conn.execute(sqlalchemy.text(self._statements()[2]), self._params)
                except Exception as e:  # the connection is gone: the server has released the lock with it
                    log.debug(f"evolve: releasing the database lock: {e}")
                    self._close()
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        """Close the kept connection (it also closes with the process)."""
        with self._thread_lock:
            if self._depth == 0:
                self._close()


def database_lock(url: str, name: str) -> DatabaseLock | None:
    """A :class:`DatabaseLock` named ``name`` in the database of ``url``; None where the database has none."""
    return DatabaseLock(url, name) if _dialect(url) in DatabaseLock.DIALECTS else None


class EvolutionLock:
    """The evolution's lock: the out_dir's :class:`FileLock` (processes of this machine writing its files), then
    the storage's: a :class:`DatabaseLock` for PostgreSQL/MySQL (workers on any machine), a :class:`FileLock` next
    to an SQLite file. Taken in that order by everyone; re-entrant within one process."""

    def __init__(self, *locks: Any):
        self.locks = [lock for lock in locks if lock is not None]
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> EvolutionLock:
        with contextlib.ExitStack() as stack:
            for lock in self.locks:
                stack.enter_context(lock)
            self._stacks.append(stack.pop_all())
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().close()


def evolution_lock(out_dir: str | os.PathLike, spec: str | None, study_name: str) -> EvolutionLock:
    """The lock that serializes the evolution's bookkeeping (new trials, failed workers, exported files) across
    every worker that can reach its storage."""
    kind, where = describe_storage(spec, out_dir)
    locks: list[Any] = [FileLock(Path(out_dir) / ".evolve.lock")]
    if kind == "rdb":
        db = where[len("sqlite:///"):].split("?")[0] if where.startswith("sqlite:///") else ""
        if db and db != ":memory:":
            db_path = Path(db).resolve()
            locks.append(FileLock(db_path.with_name(db_path.name + ".evolve.lock")))
        elif not db:
            locks.append(database_lock(where, f"study:{study_name}"))
    return EvolutionLock(*locks)


class FileLock:
    """An exclusive lock between processes of one machine (``flock``); released by the OS if its holder dies.
    Re-entrant within one process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    def __enter__(self) -> FileLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
            try:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except ImportError:  # Windows
                import msvcrt

                fh.seek(0)
                while True:
                    try:
                        msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                        break
                    except OSError:
                        continue
            self._fh = fh
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fh is not None:
            try:
                import fcntl

                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            except ImportError:
                import msvcrt

                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_UNLCK, 1)
            self._fh.close()
            self._fh = None
        self._thread_lock.release()


# ---------------------------------------------------------------------------------------------------------------
# owners, stale trials, retries
# ---------------------------------------------------------------------------------------------------------------


HOST_ENV = "YOLO_EVOLVE_HOST"


def host_id() -> str:
    """This machine since its last boot (a reboot makes every earlier owner dead), and the process-id namespace
    (containers sharing a kernel see different pids). ``$YOLO_EVOLVE_HOST``, when set, replaces it: processes with
    different values treat each other as being on different machines (tests of the cross-machine paths)."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    boot = ns = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return "/".join(x for x in (socket.gethostname(), boot, ns) if x)


def process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, None where that is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_info(pid: int | None = None) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    ps = process_start(pid)
    return {"host": host_id(), "pid": pid, "start": ps[1] if ps else None}


def owner_alive(owner: Mapping[str, Any] | None) -> bool | None:
    """Whether the process that owns a trial still runs: True/False on this machine, None when unknowable."""
    if not isinstance(owner, Mapping) or owner.get("host") != host_id():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return None
    ps = process_start(pid)
    if ps is None:
        return True
    state, start = ps
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    if owner.get("start") is not None and start != owner["start"]:
        return False  # the pid was reused
    return True


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retries: int, reason: str = "") -> int | None:
    """Queue a failed trial's hyps again (state WAITING) unless it was retried ``max_retries`` times already.

    Keeps Optuna's retry bookkeeping (system attrs ``failed_trial``: the first failed number, ``retry_history``:
    every failed number so far). Returns the number of the queued trial, or None when skipped.
    """
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > max_retries:
        log.warning(f"WARNING: evolve: trial {trial.number} failed{' (' + reason + ')' if reason else ''}; "
                    f"retried {len(history) - 1} times already, skipping it")
        return None
    keep = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER_ATTR, SURPLUS_ATTR)}
    keep.update({"failed_trial": history[0], "retry_history": history})
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=keep))
    log.warning(f"WARNING: evolve: trial {trial.number} failed{' (' + reason + ')' if reason else ''}; "
                f"its hyps are queued again (retry {len(history)} of {max_retries})")
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max(t.number for t in waiting) if waiting else None


def mark_failed(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Set a RUNNING trial to FAIL with ``reason``; False if it had finished meanwhile."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, FAIL_ATTR, reason)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def _rdb_backend(storage: Any) -> Any:
    """The RDBStorage behind a study's storage (Optuna wraps it in a cache), or None."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def _running_without_heartbeat(storage: Any, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials that have never recorded a heartbeat (RDB storages)."""
    backend = _rdb_backend(storage)
    if backend is None:
        return []
    try:
        from optuna.storages._rdb import models

        session = backend.scoped_session()
        try:
            rows = (session.query(models.TrialModel.trial_id)
                    .outerjoin(models.TrialHeartbeatModel,
                               models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING,
                            models.TrialHeartbeatModel.trial_id.is_(None)).all())
            session.commit()
        finally:
            session.close()
        return [int(r[0]) for r in rows]
    except Exception as e:  # Optuna's tables changed: a trial that never beat is then left to its own host
        log.debug(f"evolve: looking for trials without a heartbeat: {e}")
        return []


def describe_owner(owner: Any) -> str:
    """``worker 4242 on node07`` (the host name without its boot and namespace ids), from untrusted data."""
    if not isinstance(owner, Mapping) or not owner:
        return "no worker recorded"
    host = str(owner.get("host", "?")).split("/")[0][:64]
    return f"worker {str(owner.get('pid'))[:20]} on {host}"


def _stale_reason(trial: FrozenTrial, storage: Any) -> str:
    grace = getattr(_rdb_backend(storage), "grace_period", None)
    owner = trial.system_attrs.get(OWNER_ATTR) or {}
    who = describe_owner(owner) if owner else "its worker"
    return f"no heartbeat for {grace}s: {who} is gone" if grace else f"no heartbeat: {who} is gone"


def recover_stale_trials(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail (and retry) RUNNING trials whose worker is gone; returns their numbers.

    On this machine a trial's owner process is checked directly (it also catches a SIGKILLed worker at once); with
    an RDB storage, the heartbeat catches workers on other machines: a trial whose last heartbeat is older than
    the grace period is failed with the reason ``no heartbeat ...``. A RUNNING trial that never beat (its worker
    died between creating it and training it) gets a first heartbeat from whoever sees it, so that it too goes
    stale. Call under the evolution's lock.
    """
    failed: list[int] = []
    storage = study._storage
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(storage):
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            t = storage.get_trial(trial_id)
            reason = _stale_reason(t, storage)
            if t.state == TrialState.RUNNING and mark_failed(study, t, reason):
                failed.append(t.number)
                retry_trial(study, storage.get_trial(trial_id), max_retries, reason=reason)
        for trial_id in _running_without_heartbeat(storage, study._study_id):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner_alive(owner) is False:
            reason = f"worker process {owner.get('pid')} died"
            if mark_failed(study, t, reason):
                failed.append(t.number)
                retry_trial(study, study._storage.get_trial(t._trial_id), max_retries, reason=reason)
    return failed
