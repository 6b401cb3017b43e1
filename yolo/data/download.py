"""Fetching a dataset's ``download`` archive and unpacking it without letting the archive choose where we write.

Only ``http://``, ``https://`` and ``file://`` URLs are fetched (an HTTP redirect to any other scheme is refused),
into a temporary file beside the destination, no larger than the free space there. A ``.zip`` is then checked as a
whole before anything is written, and refused (:class:`ArchiveError`, one line) when a member

* has an absolute name (``/x``, ``\\x``, ``C:x``), a ``..`` component, or a NUL byte;
* is a symbolic link or another special file (its Unix mode in the external attributes), or
* would resolve outside the destination (through a symbolic link already there, say),

or when the archive holds more than :data:`MAX_ARCHIVE_MEMBERS` members or would unpack more than
:data:`MAX_ARCHIVE_BYTES`, or more than the free space at the destination (a zip bomb). While unpacking, no member
may produce more bytes than its header declares. ``__MACOSX/`` resource forks are skipped.

Where the destination may be (under the datasets root) is the caller's decision
(:func:`yolo.data.config.ensure_dataset`).
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from yolo.errors import UserError
from yolo.utils.redact import redact_url

__all__ = ["ALLOWED_SCHEMES", "ArchiveError", "download_and_unzip", "safe_extract", "url_scheme"]

ALLOWED_SCHEMES = ("http", "https", "file")
MAX_ARCHIVE_MEMBERS = 2_000_000  # COCO 2017 (images + labels) has about 250,000
MAX_ARCHIVE_BYTES = 1 << 40  # 1 TiB unpacked: far above any detection dataset (COCO 2017 is about 20 GB)
FREE_SPACE_MARGIN = 64 << 20  # keep this much free beyond what an archive declares
CHUNK = 1 << 20
TIMEOUT_S = 30
_ABSOLUTE = re.compile(r"^([\\/]|[A-Za-z]:)")


class ArchiveError(UserError, ValueError):
    """A download or archive we refuse to write: unsafe member names or types, or too large."""


def url_scheme(url: str) -> str:
    return urlsplit(str(url)).scheme.lower()


def download_and_unzip(url: str, dest: str | Path) -> None:
    """Download ``url`` (with a progress bar) into a temporary file inside ``dest`` and unpack it into ``dest``."""
    if url_scheme(url) not in ALLOWED_SCHEMES:
        raise ArchiveError(f"{redact_url(url)}: only {', '.join(ALLOWED_SCHEMES)} URLs are downloaded")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive = Path(tmp) / "download.zip"
        _download(url, archive, limit=_free_bytes(dest) - FREE_SPACE_MARGIN, where=dest)
        safe_extract(archive, dest)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib alone would follow one to ``ftp://``)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if url_scheme(newurl) not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to {redact_url(newurl)} refused (http and https only)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, target: Path, limit: int, where: Path) -> None:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes (announced or received): the free
    space at ``where``."""
    opener = urllib.request.build_opener(_HttpRedirectsOnly())
    with opener.open(url, timeout=TIMEOUT_S) as r, open(target, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        if total is not None and total > limit:
            raise ArchiveError(f"{redact_url(url)} is {_size(total)}, more than the {_size(max(limit, 0))} free "
                               f"at {where}")
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {redact_url(url)}") as bar:
            while chunk := r.read(CHUNK):
                received += len(chunk)
                if received > limit:
                    raise ArchiveError(f"{redact_url(url)} sent more than the {_size(max(limit, 0))} free "
                                       f"at {where}")
                f.write(chunk)
                bar.update(len(chunk))


def safe_extract(archive: str | Path, dest: str | Path) -> list[Path]:
    """Unpack the zip ``archive`` into ``dest`` after checking every member (see the module's docstring);
    nothing is written when a check fails. Returns the files written."""
    archive, dest = Path(archive), Path(dest).resolve()
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise ArchiveError(f"archive {archive.name} has {len(infos):,} members, over the limit of "
                               f"{MAX_ARCHIVE_MEMBERS:,}")
        members = [m for m in infos if not m.filename.startswith("__MACOSX/")]
        for member in members:
            _check_member(member, dest)
        total = sum(m.file_size for m in members)
        free = _free_bytes(dest) - FREE_SPACE_MARGIN
        if total > min(MAX_ARCHIVE_BYTES, free):
            where = f"the limit of {_size(MAX_ARCHIVE_BYTES)}" if total > MAX_ARCHIVE_BYTES else \
                f"the {_size(max(free, 0))} free at {dest}"
            raise ArchiveError(f"archive {archive.name} would unpack {_size(total)}, more than {where}")
        return [p for m in members if (p := _extract_member(z, m, dest)) is not None]


def _check_member(member: zipfile.ZipInfo, dest: Path) -> None:
    name = member.filename
    if not name or "\x00" in name or _ABSOLUTE.match(name):
        raise ArchiveError(f"unsafe path in archive: member {name!r} is an absolute path")
    if ".." in re.split(r"[\\/]", name):
        raise ArchiveError(f"unsafe path in archive: member {name!r} has a '..' component")
    kind = stat.S_IFMT(member.external_attr >> 16)  # the Unix mode, when the archiver recorded one
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ArchiveError(f"unsafe member in archive: {name!r} is a symbolic link")
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"unsafe member in archive: {name!r} is not a regular file or folder")
    if not (dest / name).resolve().is_relative_to(dest):
        raise ArchiveError(f"unsafe path in archive: member {name!r} resolves outside {dest}")


def _extract_member(z: zipfile.ZipFile, member: zipfile.ZipInfo, dest: Path) -> Path | None:
    target = dest / member.filename
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with z.open(member) as src, open(target, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > member.file_size:  # zipfile stops at the declared size; this guard costs nothing
                raise ArchiveError(f"archive member {member.filename!r} holds more than its declared size")
            out.write(chunk)
    return target


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
