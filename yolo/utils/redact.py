"""Keeping secrets out of logs, configs and MLflow: one function for every URL we print or store."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept: it helps and is not secret).

    ``postgresql://evolve:pw@db/x`` → ``postgresql://evolve:***@db/x``; a URL without credentials, or text that is
    not a URL, comes back unchanged.
    """
    text = str(url)
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if password is None or "@" not in parts.netloc:
        return text
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{host}", parts.path, parts.query, parts.fragment))


# a URL inside free text (a command line, a log message, a config file): scheme://, then anything up to a space,
# a quote or an angle bracket
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it masked by :func:`redact_url` (the rest unchanged).

    ``run_train.py mlflow.tracking_uri=http://me:pw@host`` → ``run_train.py mlflow.tracking_uri=http://me:***@host``.
    """
    text = str(text)
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
