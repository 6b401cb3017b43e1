"""What ``python -m yolo.predict`` writes into its run folder.

* ``<name>``: each image with its detections drawn (``save_img``), same name and format as the source where
  OpenCV can write that format (else ``.jpg``);
* ``<stem>.mp4``: each video annotated frame by frame (mp4v, the source's frame rate and size), written under
  a hidden temporary name and renamed when complete;
* ``labels/<stem>.txt`` (``save_txt``): ``class cx cy w h [conf]`` per detection, normalised to the original
  image, in upstream detect.py's format; ``labels/<stem>_<frame>.txt`` for a video frame (frames count from 1).
  No file for an image without detections, as upstream;
* ``predictions.json``: every image and frame (path, width, height, frame, detections with class, name,
  confidence and ``xyxy`` box in original pixels), written when the run ends.

Two sources with the same file name (``a/x.jpg``, ``b/x.jpg``) get ``x.jpg`` and ``x_2.jpg`` (and their labels
``x.txt``, ``x_2.txt``): nothing is overwritten. Images, labels and the JSON are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
import cv2
import numpy as np

from yolo.annotate import draw_detections, label_lines
from yolo.predictor import Detections
from yolo.sources import Frame
from yolo.utils.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger("yolo")

WRITABLE = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # formats written back as they came


@dataclass
class DrawSettings:
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False


class _Video:
    """One annotated video being written: frames go to a temporary file renamed into place by :meth:`close`."""

    def __init__(self, path: Path, fps: float, size_wh: tuple[int, int]):
        self.path, self.tmp = path, path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh)
        self.ok = self.writer.isOpened()

    def write(self, im: np.ndarray) -> None:
        self.writer.write(im)

    def close(self) -> None:
        self.writer.release()
        if self.ok and self.tmp.exists():
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class PredictionWriter:
    """Collects each (frame, detections) of a run and writes the outputs above into ``save_dir``."""

    def __init__(self, save_dir: str | os.PathLike, *, save_img: bool = True, save_txt: bool = False,
                 save_conf: bool = False, draw: DrawSettings | None = None):
        self.save_dir = Path(save_dir)
        self.save_img, self.save_txt, self.save_conf = save_img, save_txt, save_conf
        self.draw = draw or DrawSettings()
        self.records: list[dict] = []
        self.images = self.frames = self.detections = self.label_files = 0
        self._stems: dict[str, str] = {}  # source path -> the stem its outputs use
        self._videos: dict[str, _Video] = {}
        self.save_dir.mkdir(parents=True, exist_ok=True)

    def stem(self, path: str | None) -> str:
        """The output stem of ``path``: its own, or ``<stem>_<n>`` when another source already took it."""
        key = path if path is not None else f"<array {len(self._stems)}>"
        if key not in self._stems:
            base = Path(path).stem if path is not None else "image"
            taken = set(self._stems.values())
            name, n = base, 2
            while name in taken:
                name, n = f"{base}_{n}", n + 1
            self._stems[key] = name
        return self._stems[key]

    def add(self, frame: Frame, det: Detections) -> None:
        stem = self.stem(frame.path)
        self.records.append(det.to_dict())
        self.detections += len(det)
        if frame.is_video:
            self.frames += 1
        else:
            self.images += 1
        if self.save_txt and len(det):
            name = f"{stem}_{frame.frame}.txt" if frame.is_video else f"{stem}.txt"
            lines = label_lines(det.boxes, det.scores, det.classes, det.shape, self.save_conf)
            atomic_write_text(self.save_dir / "labels" / name, "\n".join(lines) + "\n")
            self.label_files += 1
        if self.save_img:
            self._save_image(frame, det, stem)

    def _save_image(self, frame: Frame, det: Detections, stem: str) -> None:
        d = self.draw
        im = draw_detections(frame.image, det.boxes, det.scores, det.classes, det.names, d.line_thickness,
                             d.hide_labels, d.hide_conf)
        if frame.is_video:
            video = self._videos.get(frame.path)
            if video is None:
                video = self._videos[frame.path] = _Video(self.save_dir / f"{stem}.mp4", frame.fps or 30.0,
                                                          (im.shape[1], im.shape[0]))
                if not video.ok:
                    log.warning(f"WARNING: {frame.path}: OpenCV cannot write an mp4v video here; "
                                f"its annotated video is not saved")
            if video.ok:
                video.write(im)
            return
        suffix = Path(frame.path).suffix.lower() if frame.path else ".jpg"
        suffix = suffix if suffix in WRITABLE else ".jpg"
        ok, buf = cv2.imencode(suffix, im)
        if not ok:
            suffix, (ok, buf) = ".jpg", cv2.imencode(".jpg", im)
        atomic_write_bytes(self.save_dir / f"{stem}{suffix}", buf.tobytes())

    def close(self) -> None:
        """Finish the videos and write ``predictions.json``."""
        for video in self._videos.values():
            video.close()
        self._videos.clear()
        atomic_write_text(self.save_dir / "predictions.json", json.dumps(self.records))

    def summary(self) -> str:
        what = [f"{self.images} image{'s' * (self.images != 1)}"] if self.images or not self.frames else []
        if self.frames:
            what.append(f"{self.frames} video frame{'s' * (self.frames != 1)}")
        return f"{', '.join(what)}: {self.detections} detection{'s' * (self.detections != 1)}"

