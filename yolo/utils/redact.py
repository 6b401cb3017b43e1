"""Keeping secrets out of logs, configs and MLflow: one function for every URL we print or store."""

from __future__ import annotations

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
