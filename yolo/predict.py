"""Prediction on images, folders, globs, lists and videos: ``python -m yolo.predict weights=... source=...``.

The command-line side of :class:`yolo.predictor.Predictor` (the Python API, re-exported here): ``run(cfg)``
resolves the sources (:mod:`yolo.sources`), predicts frame by frame and writes annotated images and videos,
labels and ``predictions.json`` (:mod:`yolo.predict_writer`) into the run folder, ``runs/predict/<time>`` unless
``hydra.run.dir=`` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import OmegaConf
from tqdm import tqdm

from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main
from yolo.config import check_predict_config  # also registers the config schema that the entry composes
from yolo.engine.setup import hydra_output_dir
from yolo.predict_writer import DrawSettings, PredictionWriter
from yolo.predictor import Backend, Detections, Predictor, TorchBackend, load_backend
from yolo.sources import SourceError, count_frames, iter_frames, resolve_sources

log = logging.getLogger("yolo")

__all__ = ["Backend", "Detections", "PredictResults", "Predictor", "TorchBackend", "load_backend", "main", "run"]


@dataclass
class PredictResults:
    save_dir: Path
    images: int
    frames: int
    detections: int
    speed_ms: tuple[float, float, float]  # pre-process, inference, NMS per image


def _classes(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in (OmegaConf.to_container(value) if OmegaConf.is_list(value) else
                             value if isinstance(value, (list, tuple)) else [value])]


def predictor_from_config(cfg) -> Predictor:
    """The :class:`Predictor` a :class:`~yolo.config.PredictConfig` describes (loads the weights)."""
    return Predictor(cfg.weights, imgsz=cfg.imgsz, conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                     max_det=cfg.max_det, classes=_classes(cfg.classes), agnostic_nms=cfg.agnostic_nms,
                     batch_size=cfg.batch_size, device=cfg.device, amp=cfg.amp)


def run(cfg) -> PredictResults:
    """Predict on ``cfg.source`` with ``cfg.weights`` (a :class:`yolo.config.PredictConfig`). The settings and
    sources are checked before the weights are loaded, the weights before any image is read."""
    check_predict_config(cfg)
    source = OmegaConf.to_container(cfg.source) if OmegaConf.is_list(cfg.source) else cfg.source
    files = resolve_sources(source)
    predictor = predictor_from_config(cfg)
    save_dir = hydra_output_dir() or Path("runs/predict") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    writer = PredictionWriter(save_dir, save_img=cfg.save_img, save_txt=cfg.save_txt, save_conf=cfg.save_conf,
                              draw=DrawSettings(cfg.line_thickness, cfg.hide_labels, cfg.hide_conf))
    bar = tqdm(predictor.stream(iter_frames(files)), total=count_frames(files), desc="predict",
               bar_format="{l_bar}{bar:10}{r_bar}")
    try:
        for frame, det in bar:
            writer.add(frame, det)
    finally:
        bar.close()
        writer.close()
    if not writer.images and not writer.frames:
        raise SourceError(f"source: none of the {len(files)} file(s) could be read as an image or video")
    pre, inf, nms = predictor.speed_ms
    log.info(writer.summary())
    log.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at shape "
             f"({cfg.batch_size}, 3, {predictor.imgsz}, {predictor.imgsz})")
    if cfg.save_txt:
        log.info(f"{writer.label_files} label file{'s' * (writer.label_files != 1)} saved to {save_dir / 'labels'}")
    log.info(f"Results saved to {save_dir}")
    return PredictResults(save_dir, writer.images, writer.frames, writer.detections, predictor.speed_ms)


def main() -> None:
    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
    def _main(cfg) -> None:
        with exit_on_user_error():
            run(cfg)

    run_hydra_main(_main)


if __name__ == "__main__":
    main()
