"""``python -m yolo.models model=yolov5s imgsz=640``: print the summary line of a zoo architecture."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from yolo.models.summary import model_summary
from yolo.models.yolo import build_model


@hydra.main(version_base="1.3", config_path="../../conf", config_name="summary")
def main(cfg: DictConfig) -> None:
    model = build_model(cfg.model, nc=cfg.nc)
    choice = HydraConfig.get().runtime.choices.get("model")
    if choice:
        model.yaml_file = f"{choice}.yaml"
    print(model_summary(model, imgsz=cfg.imgsz))


if __name__ == "__main__":
    main()
