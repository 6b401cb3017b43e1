"""The prediction API: ``Predictor(weights, ...)(images) -> list[Detections]``, boxes in original-image pixels.

The model is reached through one seam, a *backend*: any callable ``backend(batch) -> (N, A, 5 + nc)`` taking a
float batch ``(N, 3, H, W)`` (RGB, values in [0, 1], on ``backend.device``) and returning decoded predictions
(``cx, cy, w, h`` in input pixels, objectness, class scores after sigmoid: what an eval-mode
:class:`~yolo.models.yolo.DetectionModel` returns first), with ``names`` (class names), ``stride`` (the largest
output stride; input sides are multiples of it) and ``device`` attributes. :class:`TorchBackend` wraps our model;
:func:`load_backend` is the one place that loads weights. Another runtime (an ONNX session, say) is a class with
the same four members, passed as ``Predictor(backend=...)``; one that needs a fixed input shape is used with
``rect=False``.

Pre-processing: each image is letterboxed on its own, as upstream's detect.py does for PyTorch weights: the long
side scaled to ``imgsz`` (up or down, bilinear), the short side padded (grey 114) only up to the next multiple of
the stride (``rect=True``: a 4:3 image runs at 640x480, not 640x640); ``rect=False`` pads to the square
``imgsz x imgsz``. Consecutive images of the same letterboxed shape share a forward pass, up to ``batch_size``.
Post-processing: upstream's NMS (best class per box unless ``multi_label``), boxes mapped back through the exact
letterbox ratio and padding, clipped to the image.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from yolo.boxes import scale_boxes
from yolo.config import PredictConfig, check_config
from yolo.data.augment import letterbox
from yolo.device import select_device, sync_time
from yolo.engine.precision import Precision
from yolo.engine.precision import choose as choose_precision
from yolo.engine.precision import normalise as normalise_amp
from yolo.engine.setup import check_img_size
from yolo.errors import ConfigError
from yolo.nms import non_max_suppression
from yolo.runtime import InferenceModel, load_inference_model, weights_format
from yolo.sources import Frame, SourceError, as_bgr, iter_frames, kind_of, read_image

log = logging.getLogger("yolo")

__all__ = ["Backend", "Detections", "Predictor", "TorchBackend", "load_backend"]


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class Detections:
    """What was found in one image (or video frame): boxes in the ORIGINAL image's pixels."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32 confidence (objectness x class score)
    classes: np.ndarray  # (n,) int64 class index
    names: Sequence[str] = field(repr=False)  # class index -> name
    path: str | None = None  # the image's (or video's) file; None for an array
    shape: tuple[int, int] = (0, 0)  # the original image's (height, width)
    frame: int | None = None  # 1-based frame number within a video

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def name_of(self, c: int) -> str:
        return self.names[c] if 0 <= c < len(self.names) else str(c)

    def to_dict(self) -> dict[str, Any]:
        """The ``predictions.json`` record: path, width, height (frame), detections with class, name,
        confidence and box (``xyxy`` original pixels)."""
        out: dict[str, Any] = {"path": self.path, "width": int(self.shape[1]), "height": int(self.shape[0])}
        if self.frame is not None:
            out["frame"] = self.frame
        out["detections"] = [
            {"class": int(c), "name": self.name_of(int(c)), "confidence": round(float(s), 5),
             "box": [round(float(v), 3) for v in b]}
            for b, s, c in zip(self.boxes, self.scores, self.classes)]
        return out


# ---- the model seam -----------------------------------------------------------------------------------------------
class Backend(Protocol):
    """What :class:`Predictor` needs from a model (see the module docstring)."""

    names: Sequence[str]
    stride: int
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """Our :class:`~yolo.models.yolo.DetectionModel` as a backend: eval mode, channels-last, optional autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: Precision | None = None):
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)  # NHWC: faster on CPUs
        self.names = [str(n) for n in getattr(model, "names", [])]
        self.stride = int(max(int(model.stride.max().item()), 32))
        self.device = device
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = self.precision.autocast() if self.precision is not None else contextlib.nullcontext()
        with autocast:
            out = self.model(batch)
        return (out[0] if isinstance(out, (list, tuple)) else out).float()


class ExportedBackend:
    """An exported file (``.onnx`` through onnxruntime, ``.torchscript``) as a backend. A fixed-shape export takes
    one input shape only (``input_shape``): the predictor then letterboxes every image to that square and fills
    partial batches."""

    def __init__(self, loaded: InferenceModel, device: torch.device):
        self.model, self.names, self.device = loaded.model, list(loaded.names), device
        self.stride = int(loaded.stride)
        self.input_shape = loaded.input_shape  # (b, 3, h, w) or None (dynamic)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.input_shape is not None and n < self.input_shape[0]:  # a fixed batch: pad with empty images
            batch = torch.cat([batch, batch.new_zeros((self.input_shape[0] - n, *batch.shape[1:]))])
        return self.model(batch)[0][:n].float()


def load_backend(weights: str | os.PathLike, device: str = "auto", amp: str = "off", fuse: bool = True) -> Backend:
    """The model in ``weights`` on ``device``: a PyTorch checkpoint (loaded strictly into its own architecture,
    BatchNorm fused, ``amp`` resolved for the device; off: fp32) or an exported ``.onnx``/``.torchscript`` file
    (:mod:`yolo.runtime`). Every problem with the file is one :class:`CheckpointError`."""
    dev = select_device(device)
    exported = weights_format(weights) != "pytorch"
    if exported and normalise_amp(amp) != "off":
        raise ConfigError(f"amp: {amp} applies to PyTorch checkpoints; an exported file runs as exported")
    loaded = load_inference_model(weights, dev, fuse=fuse)  # the one loader of val and predict
    if exported:
        return ExportedBackend(loaded, dev)
    precision = choose_precision(amp, dev)
    if precision.enabled:
        log.info(precision.describe())
    return TorchBackend(loaded.model, dev, precision)


# ---- the predictor -----------------------------------------------------------------------------------------------
def _check_settings(**settings: Any) -> None:
    """The settings checked by the same rules as ``python -m yolo.predict``'s (``conf_thres: must be in [0, 1]``)."""
    check_config(OmegaConf.create({k: v for k, v in settings.items() if v is not None}), PredictConfig)


class Predictor:
    """Detections for images: ``Predictor('yolov5n.pt', imgsz=640)(['a.jpg', bgr_array])``.

    ``weights`` is loaded by :func:`load_backend` (on ``device``, with ``amp``), or pass ``backend=`` (any
    :class:`Backend`) instead. ``classes`` keeps those class indices only; ``agnostic_nms`` suppresses across
    classes; ``multi_label`` keeps every class above ``conf_thres`` per box (val's NMS; off as in detect.py).
    :attr:`speed_ms` holds the mean pre-process, inference and NMS time per image so far.
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, backend: Backend | None = None,
                 imgsz: int = 640, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                 classes: int | Sequence[int] | None = None, agnostic_nms: bool = False, multi_label: bool = False,
                 batch_size: int = 1, device: str = "auto", amp: str = "off", rect: bool = True):
        if (weights is None) == (backend is None):
            raise ConfigError("weights: give the weights (weights=path/to/best.pt) or a backend, not both")
        classes = [classes] if isinstance(classes, int) else (list(classes) if classes is not None else None)
        _check_settings(imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                        classes=classes, batch_size=batch_size)
        self.backend = backend if backend is not None else load_backend(weights, device, amp)
        self.stride = int(self.backend.stride)
        self.imgsz = check_img_size(int(imgsz), self.stride)
        fixed = getattr(self.backend, "input_shape", None)
        if fixed is not None:  # a fixed-shape export: its own square size and batch
            if fixed[2] != self.imgsz or fixed[3] != self.imgsz:
                log.warning(f"WARNING: the exported model takes {fixed[2]}x{fixed[3]} input only: imgsz={imgsz} "
                            f"is replaced (export with dynamic=true for other sizes)")
            self.imgsz, rect, batch_size = int(fixed[2]), False, int(fixed[0])
        self.conf_thres, self.iou_thres, self.max_det = float(conf_thres), float(iou_thres), int(max_det)
        self.classes, self.agnostic_nms, self.multi_label = classes, bool(agnostic_nms), bool(multi_label)
        self.batch_size, self.rect = int(batch_size), bool(rect)
        self.dt = [0.0, 0.0, 0.0]  # seconds spent: pre-process, inference, NMS
        self.seen = 0

    @property
    def names(self) -> list[str]:
        return list(self.backend.names)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def speed_ms(self) -> tuple[float, float, float]:
        """Mean pre-process, inference and NMS milliseconds per image so far."""
        return tuple(t / max(self.seen, 1) * 1e3 for t in self.dt)

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple]:
        """A BGR image letterboxed for the model: ``(3, H, W)`` RGB ``uint8`` and its ``ratio_pad``
        (``((gain, gain), (pad_w, pad_h))``, what :func:`~yolo.boxes.scale_boxes` undoes)."""
        im, ratio, pad = letterbox(image, self.imgsz, auto=self.rect, stride=self.stride)
        return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1]), (ratio, pad)

    def __call__(self, images: Any) -> list[Detections]:
        """Detections for each of ``images``: BGR ``uint8`` arrays, image paths, :class:`~yolo.sources.Frame`
        objects (a list, an ``(N, H, W, 3)`` array, or one alone); a video path gives one :class:`Detections` per
        frame. An image that cannot be read is a :class:`~yolo.sources.SourceError`."""
        if isinstance(images, np.ndarray) and images.ndim == 4:  # (N, H, W, 3): N images
            images = list(images)
        single = isinstance(images, (np.ndarray, str, os.PathLike, Frame))
        return [det for _, det in self.stream(_frames_of([images] if single else list(images)))]

    def stream(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, Detections]]:
        """``(frame, detections)`` for each frame, in order, batching consecutive frames of one letterboxed
        shape; results come as soon as their batch has run (a video is never held in memory)."""
        pending: list[tuple[Frame, np.ndarray, tuple]] = []
        for frame in frames:
            t0 = sync_time(self.device)
            im, ratio_pad = self.preprocess(frame.image)
            self.dt[0] += sync_time(self.device) - t0
            if pending and im.shape != pending[0][1].shape:
                yield from self._run_batch(pending)
                pending = []
            pending.append((frame, im, ratio_pad))
            if len(pending) >= self.batch_size:
                yield from self._run_batch(pending)
                pending = []
        if pending:
            yield from self._run_batch(pending)

    def _run_batch(self, pending: list[tuple[Frame, np.ndarray, tuple]]) -> list[tuple[Frame, Detections]]:
        dev = self.device
        t0 = sync_time(dev)
        x = torch.from_numpy(np.stack([im for _, im, _ in pending])).to(dev, non_blocking=True).float() / 255
        t1 = sync_time(dev)
        pred = torch.as_tensor(self.backend(x))  # a backend may answer with a numpy array
        t2 = sync_time(dev)
        kept = non_max_suppression(pred, self.conf_thres, self.iou_thres, classes=self.classes,
                                   agnostic=self.agnostic_nms, multi_label=self.multi_label, max_det=self.max_det)
        out = [(frame, self._detections(frame, det, x.shape[2:], ratio_pad))
               for (frame, _, ratio_pad), det in zip(pending, kept)]
        t3 = sync_time(dev)
        self.dt[0] += t1 - t0
        self.dt[1] += t2 - t1
        self.dt[2] += t3 - t2
        self.seen += len(pending)
        return out

    def _detections(self, frame: Frame, det: torch.Tensor, input_hw, ratio_pad) -> Detections:
        shape = frame.image.shape[:2]
        det = det.float()
        boxes = scale_boxes(tuple(input_hw), det[:, :4].clone(), shape, ratio_pad)
        return Detections(boxes=boxes.cpu().numpy().astype(np.float32), scores=det[:, 4].cpu().numpy(),
                          classes=det[:, 5].cpu().numpy().astype(np.int64), names=self.backend.names,
                          path=frame.path, shape=(int(shape[0]), int(shape[1])), frame=frame.frame)


def _frames_of(items: Iterable[Any]) -> Iterator[Frame]:
    """The API's inputs as frames: arrays and frames as given, image paths read (an unreadable one is an error),
    video paths frame by frame."""
    for i, item in enumerate(items):
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, np.ndarray):
            yield Frame(as_bgr(item, f"image {i}"))
        elif isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if kind_of(path) == "video":
                yield from iter_frames([path])
                continue
            if not os.path.isfile(path):
                raise SourceError(f"source: {path} does not exist")
            im = read_image(path)
            if im is None:
                raise SourceError(f"source: {path}: cannot be decoded as an image (corrupt or truncated?)")
            yield Frame(im, path)
        else:
            raise SourceError(f"source: image {i} is a {type(item).__name__}: give BGR arrays or paths")
