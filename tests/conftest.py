"""Shared fixtures: configs built with Hydra's compose API, a tiny generated shapes dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT, SHARED, compose, train_overrides  # noqa: F401  (tests import these from conftest too)

# test helpers (the fake trainer: ``evolve.train_fn=fake_train:fake_train``) importable by the commands tests start
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small shapes dataset (48 train / 16 val images) and its data YAML, generated once per session."""
    from yolo.data.shapes import CLASS_NAMES, generate_shapes

    root = tmp_path_factory.mktemp("datasets") / "tiny_shapes"
    generate_shapes(root, seed=0, n_train=48, n_val=16)
    yaml = root.parent / "tiny_shapes.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {list(CLASS_NAMES)}\n")
    return yaml


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    """Tests choose their own tracking store; an MLFLOW_TRACKING_URI from the environment must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    os.environ.setdefault("DATASETS_DIR", str(SHARED / "datasets"))
