"""Where an evolution's storage is: the journal file (default: in its folder) or a database URL, and the
database driver such a URL needs."""

from __future__ import annotations

import os
from pathlib import Path

from yolo.utils.redact import redact_url  # noqa: F401  (the one redaction, re-exported for storages)

JOURNAL_NAME = "evolve_journal.log"


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


def dialect(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


