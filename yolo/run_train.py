"""``yolo-train`` (``python run_train.py``): train a YOLOv5 detector,
``yolo-train model=yolov5s data=coco128 hyp.lr0=0.01`` (``-m`` for sweeps; ``--help`` for the settings).

The module's name is Hydra's job name (``run_train``: the run folder's ``run_train.log``), however it is started."""

from __future__ import annotations

import hydra

import yolo.config  # noqa: F401  (registers the config schema)
from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _train(cfg) -> float:
    from yolo.train import train  # deferred: torch and the trainer load once the config is composed (--help stays fast)

    with exit_on_user_error():
        return train(cfg).fitness


def main() -> None:
    """The console script's entry: Hydra reads the command line (``sys.argv``)."""
    run_hydra_main(_train)


if __name__ == "__main__":
    main()
