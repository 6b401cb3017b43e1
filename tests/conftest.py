"""Shared fixtures: configs built with Hydra's compose API, a tiny generated shapes dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# test helpers (the fake trainer: ``evolve.train_fn=fake_train:fake_train``) importable by the commands tests start
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)


def compose(config_name: str, overrides: list[str]):
    """The config an entrypoint would see for ``overrides`` (schema-validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import yolo.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name, overrides=overrides)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small shapes dataset (48 train / 16 val images) and its data YAML, generated once per session."""
    from yolo.data.shapes import CLASS_NAMES, generate_shapes

    root = tmp_path_factory.mktemp("datasets") / "tiny_shapes"
    generate_shapes(root, seed=0, n_train=48, n_val=16)
    yaml = root.parent / "tiny_shapes.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {list(CLASS_NAMES)}\n")
    return yaml


def train_overrides(data_yaml: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A fast CPU training config on a tiny dataset, writing everything under ``tmp_path``."""
    return [
        "model=yolov5n", "data=external", f"data.file={data_yaml}", "imgsz=96", "batch_size=8", "epochs=2",
        "workers=0", "device=cpu", f"project={tmp_path / 'runs' / 'train'}", "noautoanchor=true",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra,
    ]


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    """Tests choose their own tracking store; an MLFLOW_TRACKING_URI from the environment must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    os.environ.setdefault("DATASETS_DIR", str(SHARED / "datasets"))
