"""Run set-up shared by training and validation: seeding, image size checks, output folders."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("yolo")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("PYTHONHASHSEED", str(seed))


def check_img_size(imgsz: int, stride: int, floor: int = 0) -> int:
    """Round ``imgsz`` up to a multiple of ``stride`` (warning when it changes)."""
    new = max(int(np.ceil(imgsz / stride) * stride), floor)
    if new != imgsz:
        log.warning(f"WARNING: imgsz={imgsz} must be a multiple of max stride {stride}, updating to {new}")
    return new


def hydra_output_dir() -> Path | None:
    """The current Hydra job's output folder, or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not running under Hydra
        return None


def increment_dir(base: Path) -> Path:
    """``runs/train/exp``, then ``exp2``, ``exp3``... (for runs started outside Hydra)."""
    if not base.exists():
        return base
    for n in range(2, 10_000):
        cand = base.with_name(f"{base.name}{n}")
        if not cand.exists():
            return cand
    raise RuntimeError(f"too many runs under {base.parent}")
