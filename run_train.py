"""Train a YOLOv5 detector: ``python run_train.py model=yolov5s data=coco128 hyp.lr0=0.01`` (``-m`` for sweeps)."""

import hydra

import yolo.config  # noqa: F401  (registers the config schema)
from yolo.cli import exit_on_user_error, run_hydra_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float:
    from yolo.train import train

    with exit_on_user_error():
        return train(cfg).fitness


if __name__ == "__main__":
    run_hydra_main(main)
