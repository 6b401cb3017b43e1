"""What tests share: paths, configs composed as an entrypoint would, options of a config group, skip markers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import evolve.config  # noqa: F401  (registers evolve_schema)
import yolo.config  # noqa: F401  (registers train_schema and val_schema)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
COCO128 = SHARED / "datasets" / "coco128"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} not available")
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} not available")


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = (), *, with_hydra: bool = False):
    """The config an entrypoint would see for ``overrides`` (schema-validated by Hydra); ``with_hydra``: with
    Hydra's own settings under ``hydra`` too."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def train_overrides(data_yaml: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A fast CPU training config on a tiny dataset, writing everything under ``tmp_path``."""
    return [
        "model=yolov5n", "data=external", f"data.file={data_yaml}", "imgsz=96", "batch_size=8", "epochs=2",
        "workers=0", "device=cpu", f"project={tmp_path / 'runs' / 'train'}", "noautoanchor=true",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra,
    ]
