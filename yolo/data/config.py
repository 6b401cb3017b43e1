"""Dataset YAML (upstream YOLOv5's format) → :class:`DataConfig`, and making sure the data is on disk.

A data YAML looks like upstream's::

    path: coco128            # dataset root; relative → under the datasets root (see below)
    train: images/train2017  # relative to `path`: a folder, a .txt list of images, or a list of either
    val: images/train2017
    test:                    # optional
    names: {0: person, 1: bicycle, ...}   # or a plain list
    nc: 80                   # optional, must agree with `names`
    download: https://...zip # optional: a .zip URL, or `shapes` for the embedded synthetic dataset

Where relative things are looked up:

* the datasets root is the ``datasets_dir`` argument, else ``$DATASETS_DIR``, else ``./datasets`` (one log line
  says so when neither is set; the config's default ``datasets_dir: datasets`` counts as not set);
* a relative ``path`` is taken under the datasets root; when it is not there but exists relative to the YAML's
  own folder (or, for an in-memory mapping, the working directory) that one is used instead;
  a YAML without ``path`` uses its own folder;
* ``train``/``val``/``test`` entries are relative to ``path``.

``download: shapes`` (no URL) asks :func:`ensure_dataset` to *generate* the embedded synthetic shapes dataset
into ``path`` with :func:`yolo.data.shapes.generate_shapes` instead of downloading anything.
A ``.zip`` URL (``http``, ``https`` or ``file``) is fetched and unpacked into the parent of ``path`` (as upstream
does) only when that folder is under the datasets root; the archive is checked by :mod:`yolo.data.download`.
Download scripts (upstream allows shell or Python snippets here) are never executed.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from yolo.data import shapes
from yolo.data.download import ALLOWED_SCHEMES, ArchiveError, download_and_unzip, url_scheme
from yolo.errors import UserError
from yolo.utils.redact import redact_url

log = logging.getLogger("yolo")

SHAPES_GENERATOR = "shapes"
DEFAULT_DATASETS_DIR = "datasets"  # relative to the working directory; the config schema's default too
_announced_roots: set[Path] = set()


class DatasetError(UserError):
    """A dataset the user pointed at cannot be used: missing, malformed, or inconsistent."""


@dataclass
class DataConfig:
    path: Path
    train: list[Path]
    val: list[Path]
    test: list[Path] | None
    names: list[str]
    nc: int
    download: str | None
    source: Path | None  # the YAML this came from (None for an in-memory mapping)
    root: Path | None = None  # the datasets root: downloads unpack only under it

    def split(self, name: str) -> list[Path]:
        """The image sources of split ``name`` ('train', 'val' or 'test')."""
        paths = getattr(self, name, None) if name in ("train", "val", "test") else None
        if not paths:
            raise DatasetError(f"data config {self.source or self.path} has no '{name}' split")
        return paths


def conf_dir() -> Path:
    """The repository's ``conf/`` folder (next to the ``yolo`` package)."""
    return Path(__file__).resolve().parents[2] / "conf"


def datasets_root(datasets_dir: str | Path | None = None) -> Path:
    """Argument, else ``$DATASETS_DIR``, else ``./datasets`` (not required to exist)."""
    root = datasets_dir if datasets_dir not in (None, "") else os.environ.get("DATASETS_DIR") or DEFAULT_DATASETS_DIR
    return Path(root).expanduser().resolve()


def announce_default_root(datasets_dir: str | Path | None, root: Path) -> None:
    """One log line per process and root when the user chose no datasets root: which folder is used, and how to
    choose another. ``datasets_dir`` equal to the schema's default (``datasets``) counts as not chosen."""
    chosen = datasets_dir not in (None, "") and str(datasets_dir) != DEFAULT_DATASETS_DIR
    if chosen or os.environ.get("DATASETS_DIR") or root in _announced_roots:
        return
    _announced_roots.add(root)
    log.info(f"Datasets root not set (neither datasets_dir= nor $DATASETS_DIR): using {root}")


def load_data_config(data: str | Path | Mapping, datasets_dir: str | Path | None = None) -> DataConfig:
    """Read a data YAML given by conf name (``"coco128"``), by path, or already loaded as a mapping."""
    if isinstance(data, Mapping):
        raw, source = dict(data), None
    else:
        source = find_data_yaml(data)
        raw = _read_yaml(source)
    root = datasets_root(datasets_dir)
    announce_default_root(datasets_dir, root)
    return parse_data_config(raw, source, root)


def find_data_yaml(data: str | Path) -> Path:
    """A user's YAML path, or the name of a file in ``conf/data/`` (with or without ``.yaml``)."""
    p = Path(data).expanduser()
    if p.is_file():
        return p.resolve()
    bundled = conf_dir() / "data"
    if p.parent == Path("."):  # a bare name: look in conf/data/
        for candidate in (bundled / p.name, bundled / f"{p.name}.yaml", bundled / f"{p.name}.yml"):
            if candidate.is_file():
                return candidate
    known = sorted(x.stem for x in bundled.glob("*.yaml"))
    raise DatasetError(f"data config {str(data)!r} not found: not a file, nor one of conf/data/: {known}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"cannot read data config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"data config {path} must be a mapping with 'train', 'val' and 'names'")
    return raw


def parse_data_config(raw: Mapping, source: Path | None, root: Path) -> DataConfig:
    where = source or "<mapping>"
    missing = [k for k in ("train", "val") if not raw.get(k)]
    if missing:
        raise DatasetError(f"data config {where} lacks {missing}")
    names = parse_names(raw.get("names"), raw.get("nc"), where)
    base = source.parent if source else Path.cwd()
    path = resolve_dataset_path(raw.get("path"), root, base)
    test = _split_paths(raw.get("test"), path)
    download = raw.get("download") or None
    return DataConfig(path=path, train=_split_paths(raw["train"], path), val=_split_paths(raw["val"], path),
                      test=test or None, names=names, nc=len(names),
                      download=str(download).strip() if download else None, source=source, root=root)


def parse_names(names: Any, nc: Any, where: Any) -> list[str]:
    """``names`` as a list or an ``{index: name}`` dict (indices 0..n-1); ``nc`` must agree."""
    if names is None:
        if nc is None:
            raise DatasetError(f"data config {where} has neither 'names' nor 'nc'")
        names = [f"class{i}" for i in range(int(nc))]
    elif isinstance(names, Mapping):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise DatasetError(f"data config {where}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    elif not isinstance(names, (list, tuple)):
        raise DatasetError(f"data config {where}: 'names' must be a list or an {{index: name}} mapping")
    names = [str(n) for n in names]
    if nc is not None and int(nc) != len(names):
        raise DatasetError(f"data config {where}: nc={nc} but {len(names)} names are given")
    return names


def resolve_dataset_path(path: Any, root: Path, base: Path) -> Path:
    """Absolute as given; relative under the datasets root, else next to the YAML (``base``) if it exists there."""
    if not path:
        return base.resolve()
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    under_root = (root / p).resolve()
    if under_root.exists():
        return under_root
    near_yaml = (base / p).resolve()
    return near_yaml if near_yaml.exists() else under_root


def _split_paths(value: Any, path: Path) -> list[Path]:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [(path / str(x)).resolve() for x in items]


# ---------------------------------------------------------------- making sure the data is there
def missing_paths(cfg: DataConfig) -> list[Path]:
    return [p for p in (*cfg.train, *cfg.val, *(cfg.test or ())) if not p.exists()]


def ensure_dataset(cfg: DataConfig) -> DataConfig:
    """Check every split exists; otherwise download (``.zip`` URL) or generate (``shapes``) it, then recheck."""
    missing = missing_paths(cfg)
    if not missing:
        return cfg
    if not cfg.download:
        raise DatasetError(f"dataset not found: {missing[0]} (data config {cfg.source or cfg.path} has no "
                           f"'download' to fetch it; set DATASETS_DIR or fix 'path')")
    if cfg.download == SHAPES_GENERATOR:
        shapes.generate_shapes(cfg.path)
    else:
        fetch_archive(cfg, missing[0])
    still = missing_paths(cfg)
    if still:
        raise DatasetError(f"dataset still missing after fetching {redact_url(cfg.download)}: {still[0]}")
    return cfg


def fetch_archive(cfg: DataConfig, missing: Path) -> None:
    """Download ``cfg.download`` (a ``.zip`` URL) and unpack it into the parent of ``cfg.path``, which must lie
    under the datasets root; every failure is one :class:`DatasetError` line."""
    url, shown = cfg.download, redact_url(cfg.download)
    if url_scheme(url) not in ALLOWED_SCHEMES or not urlsplit(url).path.lower().endswith(".zip"):
        raise DatasetError(f"dataset not found: {missing}; its 'download' is not a .zip URL "
                           f"({', '.join(ALLOWED_SCHEMES)}; scripts are not run): {shown[:80]!r}")
    target = cfg.path.parent.resolve()
    root = cfg.root.resolve() if cfg.root is not None else None
    if root is None or not target.is_relative_to(root):
        raise DatasetError(f"dataset not found: {missing}; not downloading {shown}: it would unpack into {target}, "
                           f"outside the datasets root {root}. Download and unzip it by hand, or set DATASETS_DIR "
                           f"(or datasets_dir=) to the folder that should hold {cfg.path.name}/")
    try:
        download_and_unzip(url, target)
    except ArchiveError as e:
        raise DatasetError(f"dataset not found: {missing}; refusing {shown}: {e}") from e
    except (OSError, urllib.error.URLError, zipfile.BadZipFile, ValueError) as e:
        unreachable = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
        hint = " (offline, or the server is unreachable?)" if unreachable else ""
        reason = " ".join(str(e).split())
        raise DatasetError(f"dataset not found: {missing}; downloading {shown} failed{hint}: {reason}. Fetch "
                           f"and unzip it into {target} by hand.") from e
