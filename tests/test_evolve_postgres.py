"""Evolution workers on a real PostgreSQL server: workers started independently (as on several machines) join one
study, a SIGKILLed worker's generation is failed by the survivor through the missing heartbeat and retried (or
skipped), and the study finishes with exactly the requested generations.

The server is started for this module on 127.0.0.1 (a free port) in a temporary folder, from the binaries found on
PATH, in /usr/local/bin or /usr/lib/postgresql/*/bin; as root it runs as an unprivileged user (``nobody``). Without
binaries or a way to drop privileges the module is skipped with the reason. Each test gets its own database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import ledger
from evolve.samplers import BASE_ATTR

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX server, signals and users")
sqlalchemy = pytest.importorskip("sqlalchemy")

from test_evolve_parallel import launch  # noqa: E402  (the same subprocess helper as the journal tests)

REPO = Path(__file__).resolve().parents[1]
UNPRIVILEGED = "nobody"


def find_pg_bin() -> Path | None:
    """A folder with initdb and pg_ctl (and postgres): PATH, /usr/local/bin, then the newest Debian version."""
    dirs = [Path(p).parent for p in (shutil.which("initdb"), shutil.which("pg_ctl")) if p]
    dirs += [Path("/usr/local/bin"), Path("/usr/local/pgsql/bin")]
    dirs += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                     key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()],
                                     reverse=True)]
    dirs += [Path(p) for p in sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)]  # RHEL-like
    for d in dirs:
        if all(os.access(d / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throw-away PostgreSQL cluster: trust authentication on 127.0.0.1, no fsync, user ``postgres``."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.prefix: list[str] = []
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                pw = pwd.getpwnam(UNPRIVILEGED)
            except KeyError:
                pytest.skip(f"running as root and there is no '{UNPRIVILEGED}' user to run PostgreSQL as")
            self.owner = (pw.pw_uid, pw.pw_gid)
            if shutil.which("runuser"):
                self.prefix = ["runuser", "-u", UNPRIVILEGED, "--"]
            elif shutil.which("setpriv"):
                self.prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
            else:
                pytest.skip("running as root and neither runuser nor setpriv is there to run PostgreSQL unprivileged")
        self.root = Path(tempfile.mkdtemp(prefix="yolo-pg-"))  # short: it also holds the Unix socket
        if self.owner:
            os.chown(self.root, *self.owner)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.started = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        r = self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        if r.returncode:
            raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
        for _ in range(3):  # a port taken between free_port() and the server binding it: try another
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
            r = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                          "-o", opts, "start")
            if r.returncode == 0:
                self.started = True
                return
        raise RuntimeError(f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n{self.server_log()}")

    def server_log(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.started:
                r = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                              timeout=30)
                if r.returncode:  # last resort: the postmaster's pid is the first line of postmaster.pid
                    pid_file = self.data / "postmaster.pid"
                    if pid_file.exists():
                        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        finally:
            self.started = False
            try:  # thousands of files: removed in the background, not in the test's time
                subprocess.Popen(["rm", "-rf", str(self.root)], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError:
                shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database; its URL names no driver, as a user would write it (SQLAlchemy picks the installed one)."""
        engine = sqlalchemy.create_engine(ledger.with_installed_driver(self.url()), poolclass=sqlalchemy.pool.NullPool,
                                          isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            engine.dispose()
        return self.url(name)


@pytest.fixture(scope="module")
def postgres():
    url = ledger.with_installed_driver("postgresql://")
    try:
        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except ImportError as e:
        pytest.skip(f"no PostgreSQL driver for SQLAlchemy ({e}): pip install -e '.[test]'")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, in /usr/local/bin or "
                    "/usr/lib/postgresql/*/bin; on Debian: apt-get install postgresql")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_database_lock_is_exclusive_and_freed_when_its_holder_is_killed(postgres):
    url = postgres.url()  # advisory locks need no tables: the default database
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time\nfrom evolve import ledger\n"
                                f"with ledger.DatabaseLock({url!r}, 'study:x'):\n"
                                "    print('locked', flush=True)\n    time.sleep(600)")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        got = threading.Event()
        other_name = ledger.DatabaseLock(url, "study:y")  # another study's lock is independent
        with other_name:
            pass
        other_name.close()

        def take():
            with ledger.DatabaseLock(url, "study:x"):
                got.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not got.wait(1.0)  # held by the other process
        holder.send_signal(signal.SIGKILL)
        assert got.wait(10), "the server did not release the lock of a killed holder"
        waiter.join(5)
    finally:
        holder.kill()
        holder.wait(10)


def test_database_lock_reconnects_after_its_connection_broke(postgres):
    url = postgres.url()
    lock = ledger.DatabaseLock(url, "study:x")
    with lock, lock:  # re-entrant
        pid = lock._conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    engine = sqlalchemy.create_engine(ledger.with_installed_driver(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:  # as a server restart would: the kept connection is gone
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
        with lock:
            assert lock._conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        with engine.connect() as conn:  # released: nobody holds an advisory lock any more
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").scalar() == 0
    finally:
        lock.close()
        engine.dispose()


def test_trial_that_never_beat_goes_stale(postgres):
    """A worker on another machine died between creating its trial and its first heartbeat: whoever sees the trial
    gives it a first heartbeat, so that it goes stale like any other and its hyps are queued again."""
    study = optuna.create_study(
        storage=ledger.open_storage(postgres.create_database("evolve_orphan"), ".", heartbeat_s=1, grace_s=2),
        study_name="s", direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna: heartbeats are meant for optimize()
        trial = study.ask()
    trial.suggest_float("a", 0, 1)
    study._storage.set_trial_system_attr(trial._trial_id, ledger.OWNER_ATTR, {"host": "elsewhere/x", "pid": 7})
    assert ledger.recover_stale_trials(study, max_retries=1) == []
    failed, t0 = [], time.time()
    while not failed and time.time() - t0 < 10:
        time.sleep(0.5)
        failed = ledger.recover_stale_trials(study, max_retries=1)
    assert failed == [0] and time.time() - t0 > 1.5
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING and retry.params == dead.params
    assert dead.user_attrs[ledger.FAIL_ATTR] == "no heartbeat for 2s: worker 7 on elsewhere is gone"


def test_missing_database_fails_at_once(postgres):
    t0 = time.time()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="does not exist"):
        ledger.open_storage(postgres.url("no_such_db"), ".")
    assert time.time() - t0 < 10  # not retried like an unreachable server


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="evolve", storage=ledger.open_storage(url, "."))


@pytest.mark.parametrize("max_retries", [1, 0], ids=["retried", "skipped"])
def test_workers_on_two_machines_one_killed(postgres, tmp_path, max_retries):
    """Two copies of the command, each with its own out_dir and "host" (two machines), one PostgreSQL study."""
    url = postgres.create_database(f"evolve_kill{max_retries}")
    generations, markers = 6, tmp_path / "markers"
    extra = (f"evolve.storage={url}", "evolve.heartbeat_s=1", "evolve.heartbeat_grace_s=3",
             f"evolve.max_retries={max_retries}")
    env = {"YOLO_FAKE_TRAIN_MARKERS": str(markers), "YOLO_FAKE_TRAIN_HANG_AT": "2", "YOLO_FAKE_TRAIN_SLEEP": "0.3"}
    outs = {m: tmp_path / m for m in ("machine-a", "machine-b")}
    procs = {m: launch(out, generations, *extra, **env, **{ledger.HOST_ENV: m}) for m, out in outs.items()}
    try:
        t0 = time.time()
        while not (markers / ".hanging").exists():  # one generation hangs in one of them: kill that worker
            ended = [m for m, p in procs.items() if p.poll() is not None]
            assert not ended, f"{ended} ended early:\n{procs[ended[0]].stdout.read()}"
            assert time.time() - t0 < 60, "no generation started hanging"
            time.sleep(0.05)
        time.sleep(0.1)
        pid, run_name = (markers / ".hanging").read_text().split()
        killed = next(m for m, p in procs.items() if p.pid == int(pid))
        survivor = next(m for m in procs if m != killed)
        procs[killed].send_signal(signal.SIGKILL)
        procs[killed].wait(10)
        out = procs[survivor].communicate(timeout=90)[0]
        assert procs[survivor].returncode == 0, out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)

    study = load(url)
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == generations
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(bool(t.user_attrs.get(BASE_ATTR)) for t in trials) == 1  # the study was initialized once
    assert {t.system_attrs[ledger.OWNER_ATTR]["host"] for t in trials} == set(outs)  # both machines took work

    # the killed generation: failed by the survivor because its heartbeat stopped (another "machine": no pid check)
    assert len(failed) == 1 and f"trial{failed[0].number:04d}" == run_name
    reason = failed[0].user_attrs[ledger.FAIL_ATTR]
    assert "no heartbeat for 3s" in reason and killed in reason, reason
    assert failed[0].system_attrs[ledger.OWNER_ATTR]["host"] == killed
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [failed[0].number]]
    if max_retries:
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == failed[0].params  # the lost generation is run again, not a new one
        assert retries[0].system_attrs[ledger.OWNER_ATTR]["host"] == survivor
    else:
        assert retries == [] and "skipping it" in out
    assert "no heartbeat" in out

    # every finished generation exactly once, in trial order, in the survivor's evolve.csv
    expected = ledger.study_rows(trials, {})
    _, rows = ledger.read_evolve_csv(outs[survivor] / ledger.CSV_NAME)
    as_csv = [{k: ledger.mutation.csv_value(v) for k, v in r.hyp.items() if v is not None} for r in expected]
    assert [r.hyp for r in rows] == as_csv and len(rows) == generations
    assert len({tuple(sorted(r.hyp.items())) for r in rows}) == generations
    assert failed[0].number not in [r.number for r in expected]
    # the killed machine's own evolve.csv (if it finished a generation): an earlier view of the same study
    if (outs[killed] / ledger.CSV_NAME).exists():
        _, old = ledger.read_evolve_csv(outs[killed] / ledger.CSV_NAME)
        assert all(r.hyp in as_csv for r in old)
