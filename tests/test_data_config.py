"""Data YAML → DataConfig: name/path/mapping input, path resolution, names/nc checks, fetching missing data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from yolo.data import config as data_config
from yolo.data.config import DataConfig, DatasetError, ensure_dataset, load_data_config

SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def make_dataset(root: Path, n: int = 2) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    for i in range(n):
        (root / "images" / "train" / f"{i}.jpg").write_bytes(b"x")
    return root


def test_bundled_coco128_by_name(tmp_path):
    cfg = load_data_config("coco128", datasets_dir=tmp_path)
    assert cfg.path == (tmp_path / "coco128").resolve()
    assert cfg.train == [tmp_path.resolve() / "coco128" / "images" / "train2017"]
    assert cfg.val == cfg.train and cfg.test is None
    assert cfg.nc == 80 and len(cfg.names) == 80
    assert cfg.names[0] == "person" and cfg.names[79] == "toothbrush"
    assert cfg.download == "https://ultralytics.com/assets/coco128.zip"
    assert cfg.source.name == "coco128.yaml"
    assert load_data_config("coco128.yaml", datasets_dir=tmp_path).names == cfg.names


def test_bundled_coco128_finds_shared_copy():
    cfg = load_data_config("coco128", datasets_dir=SHARED / "datasets")
    assert ensure_dataset(cfg) is cfg  # present: nothing fetched


def test_datasets_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "dsets"))
    assert load_data_config("coco128").path == (tmp_path / "dsets" / "coco128").resolve()
    monkeypatch.delenv("DATASETS_DIR")
    monkeypatch.chdir(tmp_path)
    assert load_data_config("coco128").path == (tmp_path / "datasets" / "coco128").resolve()


def test_user_yaml_with_dict_names_and_lists(tmp_path):
    make_dataset(tmp_path / "root" / "mine")
    (tmp_path / "root" / "mine" / "val.txt").write_text("images/train/0.jpg\n")
    data = write_yaml(tmp_path / "mine.yaml", {"path": "mine", "train": ["images/train", "images/train"],
                                              "val": "val.txt", "test": "", "names": {0: "a", 1: "b"}, "nc": 2})
    cfg = load_data_config(data, datasets_dir=tmp_path / "root")
    assert cfg.path == (tmp_path / "root" / "mine").resolve()
    assert cfg.train == [cfg.path / "images" / "train"] * 2
    assert cfg.val == [cfg.path / "val.txt"]
    assert cfg.test is None and cfg.names == ["a", "b"] and cfg.nc == 2 and cfg.download is None
    assert cfg.source == data.resolve()


def test_relative_path_falls_back_to_yaml_folder(tmp_path):
    make_dataset(tmp_path / "proj" / "data" / "set")
    data = write_yaml(tmp_path / "proj" / "data.yaml", {"path": "data/set", "train": "images/train",
                                                         "val": "images/train", "names": ["x"]})
    cfg = load_data_config(data, datasets_dir=tmp_path / "elsewhere")
    assert cfg.path == (tmp_path / "proj" / "data" / "set").resolve()


def test_missing_path_key_uses_yaml_folder_and_absolute_path_kept(tmp_path):
    data = write_yaml(tmp_path / "d.yaml", {"train": "images/train", "val": "images/train", "names": ["x"]})
    assert load_data_config(data, tmp_path / "r").path == tmp_path.resolve()
    cfg = load_data_config({"path": str(tmp_path / "abs"), "train": "a", "val": "b", "names": ["x"]}, tmp_path)
    assert cfg.path == tmp_path / "abs" and cfg.train == [(tmp_path / "abs" / "a").resolve()] and cfg.source is None


def test_nc_must_agree_with_names(tmp_path):
    with pytest.raises(DatasetError, match="nc=3 but 2 names"):
        load_data_config({"train": "a", "val": "a", "names": ["x", "y"], "nc": 3}, tmp_path)


def test_names_dict_needs_contiguous_keys(tmp_path):
    with pytest.raises(DatasetError, match="keys must be 0..1"):
        load_data_config({"train": "a", "val": "a", "names": {0: "x", 2: "y"}}, tmp_path)


def test_nc_without_names_gives_placeholder_names(tmp_path):
    assert load_data_config({"train": "a", "val": "a", "nc": 2}, tmp_path).names == ["class0", "class1"]


def test_missing_train_or_val_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="lacks \\['val'\\]"):
        load_data_config({"train": "a", "names": ["x"]}, tmp_path)


def test_unknown_name_lists_bundled_configs(tmp_path):
    with pytest.raises(DatasetError, match="not found.*coco128"):
        load_data_config("no_such_dataset", tmp_path)


def test_missing_dataset_without_download_names_path(tmp_path):
    cfg = load_data_config({"path": "gone", "train": "images/train", "val": "images/train", "names": ["x"]},
                           tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path / "gone" / "images" / "train")):
        ensure_dataset(cfg)


def test_download_zip_is_extracted_into_datasets_root(tmp_path):
    src = make_dataset(tmp_path / "src" / "toy")
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
        z.writestr("__MACOSX/junk", "x")
    root = tmp_path / "datasets"
    cfg = load_data_config({"path": "toy", "train": "images/train", "val": "images/train", "names": ["x"],
                            "download": archive.as_uri()}, root)
    ensure_dataset(cfg)  # a file:// URL: same code path as http, no network
    assert (root / "toy" / "images" / "train" / "0.jpg").is_file()
    assert not (root / "__MACOSX").exists()


def test_failed_download_names_path_and_url(tmp_path):
    url = (tmp_path / "missing.zip").as_uri()
    cfg = load_data_config({"path": "toy", "train": "images/train", "val": "images/train", "names": ["x"],
                            "download": url}, tmp_path)
    with pytest.raises(DatasetError) as e:
        ensure_dataset(cfg)
    assert str(tmp_path / "toy" / "images" / "train") in str(e.value) and url in str(e.value)


def test_download_scripts_are_not_run(tmp_path):
    cfg = load_data_config({"path": "toy", "train": "t", "val": "t", "names": ["x"],
                            "download": "bash -c 'touch pwned'"}, tmp_path)
    with pytest.raises(DatasetError, match="not a .zip URL"):
        ensure_dataset(cfg)
    assert not (tmp_path / "pwned").exists()


def test_zip_slip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="unsafe path"):
        data_config.download_and_unzip(archive.as_uri(), tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists()


def test_shapes_generator(tmp_path, monkeypatch):
    calls = []

    def fake_generate(root, seed=0):
        calls.append(Path(root))
        make_dataset(Path(root))
        return Path(root)

    monkeypatch.setattr("yolo.data.shapes.generate_shapes", fake_generate)
    cfg = load_data_config({"path": "shapes", "train": "images/train", "val": "images/train",
                            "names": ["circle"], "download": "shapes"}, tmp_path)
    assert isinstance(ensure_dataset(cfg), DataConfig)
    assert calls == [tmp_path.resolve() / "shapes"]


def test_split_accessor(tmp_path):
    cfg = load_data_config({"train": "a", "val": "b", "names": ["x"]}, tmp_path)
    assert cfg.split("val") == cfg.val
    with pytest.raises(DatasetError, match="no 'test' split"):
        cfg.split("test")
