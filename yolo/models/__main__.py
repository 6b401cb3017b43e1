"""``python -m yolo.models model=yolov5s imgsz=640 [verbose=true]``: print the summary line of an architecture
(a zoo name or ``model=path/to/model.yaml``); ``verbose=true`` prints upstream's per-layer table before it."""

from __future__ import annotations

import contextlib
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main
from yolo.models.summary import model_summary
from yolo.models.yolo import LOGGER, build_model


@contextlib.contextmanager
def layer_table(enabled: bool):
    """While building a model, print the rows ``parse_model`` logs at debug level (upstream's table:
    ``from  n  params  module  arguments``) to stdout."""
    if not enabled:
        yield
        return
    logger = LOGGER
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="summary")
def _summary(cfg: DictConfig) -> None:
    with exit_on_user_error(), layer_table(bool(cfg.verbose)):
        model = build_model(cfg.model, nc=cfg.nc)
    choice = cfg.get("model_file") or HydraConfig.get().runtime.choices.get("model")
    if choice:
        model.yaml_file = choice if str(choice).endswith((".yaml", ".yml")) else f"{choice}.yaml"
    print(model_summary(model, imgsz=cfg.imgsz))


def main() -> None:
    run_hydra_main(_summary)  # model=path/to/model.yaml as for training


if __name__ == "__main__":
    main()
