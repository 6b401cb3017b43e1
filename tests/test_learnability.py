"""From scratch on the embedded shapes dataset: yolov5n learns it on a CPU in minutes (slow: about 4 min)."""

from __future__ import annotations

import pytest
from conftest import compose


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_yolov5n_learns_shapes_from_scratch(tmp_path):
    from yolo.train import train

    cfg = compose("train", [
        "model=yolov5n", "data=shapes", "hyp=shapes-scratch", "imgsz=128", "epochs=10", "batch_size=16",
        "workers=2", "device=cpu", "noplots=true", "mlflow.enabled=false",
        f"datasets_dir={tmp_path / 'datasets'}", f"project={tmp_path / 'runs' / 'train'}",
    ])
    res = train(cfg)
    assert res.epochs_completed == 10
    assert max(h["metrics/mAP_0.5"] for h in res.history) >= 0.5, res.history[-1]
