"""Helpers to run upstream YOLOv5 (PyPI ``yolov5==7.0.14``) side by side with this project.

Upstream lives in its own virtual environment (never a dependency of this project); point ``UPSTREAM_PYTHON`` at
its interpreter (default ``../upstream-venv/bin/python``).  Set it up once with::

    python3 -m venv ../upstream-venv
    ../upstream-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 yolov5==7.0.14 "pillow<10" "setuptools<81"

Its known needs are handled here: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, a TTF font at
``$YOLOV5_CONFIG_DIR/Arial.ttf`` (so nothing is downloaded), and ``np.trapz`` restored for numpy >= 2.4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
UPSTREAM_PYTHON = Path(os.environ.get("UPSTREAM_PYTHON", ROOT.parent / "upstream-venv" / "bin" / "python"))
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)

# prepended to every upstream snippet
PRELUDE = "import numpy as np\nif not hasattr(np, 'trapz'): np.trapz = np.trapezoid\n"


def upstream_env(workdir: Path) -> dict[str, str]:
    cfg_dir = workdir / "yolov5_config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    font = next((f for f in FONTS if Path(f).exists()), None)
    if font is None:
        raise SystemExit("no TTF font found for upstream: apt-get install -y fonts-dejavu-core")
    if not (cfg_dir / "Arial.ttf").exists():
        shutil.copy(font, cfg_dir / "Arial.ttf")
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", YOLOV5_CONFIG_DIR=str(cfg_dir),
               MPLBACKEND="Agg", WANDB_MODE="disabled", CLEARML_OFF="1", COMET_MODE="disabled")
    return env


def linked_coco128(workdir: Path) -> Path:
    """COCO128 seen through symlinks under ``workdir`` (returns its images folder): upstream writes its label
    cache next to the labels folder, which must not be the shared copy."""
    root = workdir / "coco128"
    for kind in ("images", "labels"):
        link = root / kind / "train2017"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(SHARED / "datasets" / "coco128" / kind / "train2017")
    return root / "images" / "train2017"


def coco128_yaml(workdir: Path) -> Path:
    """An upstream-format coco128.yaml for COCO128 (through :func:`linked_coco128`), with no download key."""
    import yaml

    names = yaml.safe_load((ROOT / "conf" / "data" / "coco128.yaml").read_text())["names"]
    root = linked_coco128(workdir).parents[1]
    path = workdir / "coco128.yaml"
    path.write_text(yaml.safe_dump({"path": str(root), "train": "images/train2017", "val": "images/train2017",
                                    "names": names}))
    return path


def run_upstream(code: str, workdir: Path | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    if not UPSTREAM_PYTHON.exists():
        raise SystemExit(f"upstream interpreter not found at {UPSTREAM_PYTHON} (see {__file__} docstring)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="upstream_"))
    return subprocess.run([str(UPSTREAM_PYTHON), "-c", PRELUDE + code], cwd=workdir, env=upstream_env(workdir),
                          capture_output=True, text=True, timeout=timeout)
