"""A dataset's ``download``: only http/https/file URLs, unpacked only under the datasets root, hostile archives
refused with one line and nothing written. Every archive is a local ``file://`` zip built here."""

from __future__ import annotations

import shutil
import stat
import sys
import urllib.error
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from yolo.data.config import DatasetError, ensure_dataset, load_data_config

DATA = {"path": "toy", "train": "images/train", "val": "images/train", "names": ["x"]}


def build_zip(path: Path, members: dict[str, bytes | str], links: dict[str, str] | None = None,
              compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip of ``members`` (name → content) and symbolic-link entries ``links`` (name → target)."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, content in members.items():
            z.writestr(zipfile.ZipInfo(name), content, compress_type=compression)  # a ZipInfo keeps names as given
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix: the mode in the high 16 bits of external_attr
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return path


def toy_members(prefix: str = "toy/") -> dict[str, bytes]:
    return {f"{prefix}images/train/0.jpg": b"x", f"{prefix}labels/train/0.txt": b"0 0.5 0.5 0.1 0.1\n"}


def fetch(tmp_path: Path, url: str, **data) -> tuple[Path, BaseException | None]:
    """Run ensure_dataset for a config under ``tmp_path/datasets``; (root, the DatasetError or None)."""
    root = tmp_path / "datasets"
    cfg = load_data_config({**DATA, **data, "download": url}, root)
    try:
        ensure_dataset(cfg)
    except DatasetError as e:
        return root, e
    return root, None


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_good_zip_is_unpacked_under_the_root(tmp_path):
    root, err = fetch(tmp_path, build_zip(tmp_path / "toy.zip", toy_members()).as_uri())
    assert err is None and (root / "toy" / "labels" / "train" / "0.txt").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".download-")]  # temporary folder removed


@pytest.mark.parametrize("bad", ["/abs/evil.txt", "C:/evil.txt", "../evil.txt", "toy/../../evil.txt",
                                 "toy\\..\\..\\evil.txt"])
def test_member_with_absolute_path_or_dotdot_is_refused(tmp_path, bad):
    archive = build_zip(tmp_path / "evil.zip", {**toy_members(), bad: "pwned"})
    root, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "unsafe path" in str(err) and "\n" not in str(err)
    assert files_under(root) == set()  # nothing written, not even the good members
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/abs/evil.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = build_zip(tmp_path / "link.zip", toy_members(), links={"toy/escape": str(outside)})
    root, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "symbolic link" in str(err) and "toy/escape" in str(err)
    assert files_under(root) == set() and files_under(outside) == set()


def test_member_resolving_through_an_existing_link_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "toy").symlink_to(outside, target_is_directory=True)  # e.g. left by an earlier archive or a user
    archive = build_zip(tmp_path / "toy.zip", toy_members())
    _, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "outside" in str(err)
    assert files_under(outside) == set()


def test_target_outside_the_datasets_root_is_refused(tmp_path):
    archive = build_zip(tmp_path / "toy.zip", toy_members())
    elsewhere = tmp_path / "elsewhere" / "toy"
    root, err = fetch(tmp_path, archive.as_uri(), path=str(elsewhere))
    assert isinstance(err, DatasetError) and "\n" not in str(err)
    assert "outside the datasets root" in str(err) and "by hand" in str(err) and "DATASETS_DIR" in str(err)
    assert not (tmp_path / "elsewhere").exists() and files_under(root) == set()


def test_relative_path_climbing_out_of_the_root_is_refused(tmp_path):
    archive = build_zip(tmp_path / "toy.zip", toy_members())
    root, err = fetch(tmp_path, archive.as_uri(), path="../toy")
    assert isinstance(err, DatasetError) and "outside the datasets root" in str(err)
    assert not (tmp_path / "toy").exists()


def test_zip_bomb_over_the_free_space_is_refused(tmp_path, monkeypatch):
    zeros = b"\0" * (16 << 20)  # 16 MiB of zeros: about 16 KiB compressed
    archive = build_zip(tmp_path / "bomb.zip", {**toy_members(), "toy/zeros.bin": zeros})
    assert archive.stat().st_size < 100_000
    usage = shutil.disk_usage(tmp_path)
    Usage = namedtuple("Usage", "total used free")
    margin = getattr(sys.modules.get("yolo.data.download"), "FREE_SPACE_MARGIN", 0)  # kept free, if any
    free = (8 << 20) + margin  # 8 MiB that an archive may fill
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(usage.total, usage.used, free))
    root, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "16.0 MiB" in str(err) and "free" in str(err)
    assert not (root / "toy" / "zeros.bin").exists()


def test_archive_over_the_size_or_member_limit_is_refused(tmp_path, monkeypatch):
    from yolo.data import download

    archive = build_zip(tmp_path / "toy.zip", {**toy_members(), "toy/big.bin": b"\0" * 4096})
    monkeypatch.setattr(download, "MAX_ARCHIVE_BYTES", 4000)
    _, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "more than the limit" in str(err)
    monkeypatch.setattr(download, "MAX_ARCHIVE_BYTES", 1 << 40)
    monkeypatch.setattr(download, "MAX_ARCHIVE_MEMBERS", 2)
    root, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError) and "3 members" in str(err) and files_under(root) == set()


def test_member_longer_than_declared_is_not_written_beyond_it(tmp_path):
    archive = build_zip(tmp_path / "toy.zip", {**toy_members(), "toy/data.bin": b"A" * 50_000},
                        compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        declared = z.getinfo("toy/data.bin").file_size
    entry = raw.rindex(b"toy/data.bin") - 46  # its central directory entry (the local header comes earlier)
    assert raw[entry: entry + 4] == b"PK\x01\x02" and int.from_bytes(raw[entry + 24: entry + 28], "little") == declared
    raw[entry + 24: entry + 28] = (10).to_bytes(4, "little")  # declare 10 bytes for 50,000
    archive.write_bytes(bytes(raw))
    root, err = fetch(tmp_path, archive.as_uri())
    assert isinstance(err, DatasetError)
    data = root / "toy" / "data.bin"
    assert not data.exists() or data.stat().st_size <= 10


@pytest.mark.parametrize("url", ["ftp://example.com/toy.zip", "data:application/zip;base64,UEsFBgAAAAA=.zip",
                                 "jar:file:///x.zip!/toy.zip", "gopher://example.com/toy.zip"])
def test_only_http_https_and_file_urls(tmp_path, url):
    root, err = fetch(tmp_path, url)
    assert isinstance(err, DatasetError) and "http" in str(err) and "file" in str(err)
    assert files_under(root) == set()


def test_offline_download_is_one_clear_line_without_the_password(tmp_path):
    url = "http://user:s3cret@127.0.0.1:9/toy.zip"  # the discard port: connection refused, no network needed
    root, err = fetch(tmp_path, url)
    assert isinstance(err, DatasetError) and "\n" not in str(err)
    assert "offline" in str(err) and "by hand" in str(err) and "s3cret" not in str(err)
    assert "user:***@127.0.0.1" in str(err)


def test_redirect_to_another_scheme_is_refused():
    from yolo.data.download import _HttpRedirectsOnly

    with pytest.raises(urllib.error.URLError, match="refused"):
        _HttpRedirectsOnly().redirect_request(None, None, 302, "Found", {}, "ftp://example.com/toy.zip")
    with pytest.raises(urllib.error.URLError, match="refused"):
        _HttpRedirectsOnly().redirect_request(None, None, 302, "Found", {}, "file:///etc/passwd")
