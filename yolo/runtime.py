"""Inference backends: one way to run a detector whatever file holds it.

:func:`load_inference_model` takes a PyTorch checkpoint (``.pt``, loaded strictly by :mod:`yolo.checkpoint`), an
ONNX file (``.onnx``, run by onnxruntime) or a TorchScript file (``.torchscript``) and returns an
:class:`InferenceModel`: ``model(images)`` takes a ``(b, 3, h, w)`` float tensor in [0, 1] and returns
``(decoded (b, N, 5 + nc), raw)`` like our model in eval mode (``raw`` is ``None`` for an exported file), with the
class ``names``, the largest ``stride`` and whether it takes any input shape (``dynamic``) or one fixed shape.

Exported files carry what val and prediction need in their metadata (written by :mod:`yolo.export`): the ONNX
model's ``metadata_props`` and a TorchScript file's ``config.txt`` extra file hold the same keys
(:func:`export_metadata`). ``onnx``/``onnxruntime`` are an optional extra (``pip install -e ".[export]"``); without
them an ``.onnx`` file is one :class:`~yolo.errors.UserError` saying so.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yolo.checkpoint import checked_model, load_checkpoint
from yolo.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger("yolo")

METADATA_FORMAT = "yolo-hydra-export"
INSTALL_HINT = 'pip install -e ".[export]"'
EXPORTED_SUFFIXES = {".onnx": "onnx", ".torchscript": "torchscript"}


class MissingDependency(UserError):
    """An optional package that the asked-for format needs is not installed."""


def require_onnx(what: str) -> Any:
    """The ``onnxruntime`` module, or one :class:`MissingDependency` naming ``what`` needed it."""
    try:
        import onnx  # noqa: F401  optional dependency: only exports and .onnx weights need it
        import onnxruntime
    except ImportError as e:
        raise MissingDependency(f"{what} needs the onnx and onnxruntime packages ({e.name} is not installed): "
                                f"{INSTALL_HINT}") from None
    return onnxruntime


# ---- metadata stored in exported files ---------------------------------------------------------------------------
def export_metadata(names, stride: int, imgsz: tuple[int, int], batch: int, dynamic: bool,
                    source: str) -> dict[str, str]:
    """The string key/value pairs an exported file carries (ONNX ``metadata_props``, TorchScript config.txt)."""
    return {
        "format": METADATA_FORMAT,
        "names": json.dumps(list(names)),
        "stride": str(int(stride)),
        "imgsz": json.dumps([int(imgsz[0]), int(imgsz[1])]),
        "batch": str(int(batch)),
        "dynamic": json.dumps(bool(dynamic)),
        "source": str(source),
    }


def parse_metadata(meta: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """``names``, ``stride``, ``imgsz``, ``batch``, ``dynamic`` from an exported file's metadata (checked)."""
    try:
        names = json.loads(meta["names"])
        out = {"names": [str(n) for n in names], "stride": int(meta["stride"]),
               "imgsz": tuple(int(x) for x in json.loads(meta["imgsz"])), "batch": int(meta.get("batch", 1)),
               "dynamic": bool(json.loads(meta.get("dynamic", "false")))}
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: no usable yolo-hydra metadata ({type(e).__name__}: {e}): export it with "
                              f"python -m yolo.export") from None
    if not isinstance(names, list) or out["stride"] < 1 or len(out["imgsz"]) != 2:
        raise CheckpointError(f"{path}: malformed yolo-hydra metadata {meta}")
    return out


# ---- backends ----------------------------------------------------------------------------------------------------
class ExportedModel(nn.Module):
    """Base of the exported-file backends: eval-mode output ``(decoded, None)``; a fixed batch is padded."""

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = meta
        self.names, self.dynamic = meta["names"], meta["dynamic"]
        self.fixed_batch = None if self.dynamic else meta["batch"]
        self.register_buffer("_device", torch.zeros(0), persistent=False)  # follows .to(), names the device

    def run(self, images: torch.Tensor) -> torch.Tensor:  # (b, 3, h, w) -> (b, N, 5 + nc)
        raise NotImplementedError

    def forward(self, images: torch.Tensor):
        b = images.shape[0]
        if self.fixed_batch is not None and b < self.fixed_batch:  # a short last batch of a fixed-batch model
            pad = images.new_zeros((self.fixed_batch - b, *images.shape[1:]))
            images = torch.cat((images, pad), 0)
        return self.run(images)[:b], None


class OnnxModel(ExportedModel):
    """An ONNX file run by onnxruntime (CPU, or CUDA when asked for and available)."""

    def __init__(self, path: Path, device: torch.device, threads: int | None = None):
        ort = require_onnx(f"weights={path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a corrupt or unsupported file
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {str(e).strip().splitlines()[0]}") from None
        super().__init__(parse_metadata(session.get_modelmeta().custom_metadata_map, path))
        self.session = session
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.providers = self.session.get_providers()

    def run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", memory_format=torch.contiguous_format).numpy().astype(self.input_dtype,
                                                                                          copy=False)
        y = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
        return torch.from_numpy(y).to(images.device).float()


class TorchScriptModel(ExportedModel):
    """A traced TorchScript file (``torch.jit.load``) with our ``config.txt`` extra file."""

    def __init__(self, path: Path, device: torch.device):
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as e:  # torch raises RuntimeError and others for a file that is not TorchScript
            raise CheckpointError(f"{path}: not a TorchScript file ({str(e).strip().splitlines()[0]})") from None
        try:
            meta = json.loads(extra["config.txt"] or "{}")
        except ValueError:
            meta = {}
        super().__init__(parse_metadata(meta, path))
        self.module = module.eval()
        self.fp16 = any(p.dtype == torch.float16 for p in module.parameters())

    def run(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(images.half() if self.fp16 else images.float()).float()


@dataclass
class InferenceModel:
    """What :func:`load_inference_model` returns: ``model(images) -> (decoded, raw or None)`` and its facts."""

    model: nn.Module
    names: list[str]
    stride: int  # the largest output stride (at least 32): input sizes are multiples of it
    dynamic: bool  # takes any batch and any (stride-multiple) height and width
    input_shape: tuple[int, int, int, int] | None  # (b, 3, h, w) of a fixed-shape model, else None
    backend: str  # 'pytorch' | 'onnx' | 'torchscript'


def load_exported(path: Path, kind: str, device: torch.device, threads: int | None = None) -> ExportedModel:
    """The backend for an exported file of format ``kind`` (``onnx``/``torchscript``), whatever its name;
    ``threads``: onnxruntime's intra-op threads (default: its own choice; TorchScript uses torch's)."""
    return OnnxModel(path, device, threads) if kind == "onnx" else TorchScriptModel(path, device)


def weights_format(weights: str | os.PathLike) -> str:
    """``pytorch``, ``onnx`` or ``torchscript`` by the file's suffix (anything else is a PyTorch checkpoint)."""
    return EXPORTED_SUFFIXES.get(Path(weights).suffix.lower(), "pytorch")


def load_inference_model(weights: str | os.PathLike, device: torch.device | str = "cpu", *, model_cfg: Any = None,
                         nc: int | None = None, fuse: bool = True, threads: int | None = None) -> InferenceModel:
    """The detector ``weights`` holds, ready for inference on ``device`` (a PyTorch model is left on the CPU for
    the caller to move, as validation does). ``model_cfg``/``nc`` apply to PyTorch checkpoints only."""
    device = torch.device(device)
    kind = weights_format(weights)
    if kind == "pytorch":
        model = checked_model(load_checkpoint(weights), weights, model_cfg=model_cfg, nc=nc, fuse=fuse)
        return InferenceModel(model, list(model.names), int(max(model.stride.max().item(), 32)), True, None,
                              "pytorch")
    if model_cfg is not None or nc is not None:
        raise ConfigError(f"model: an exported file ({weights}) has its architecture fixed; drop model= and nc=")
    path = Path(weights)
    if kind == "onnx":
        require_onnx(f"weights={path}")  # before the file: a missing package is the first thing to fix
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    model = load_exported(path, kind, device, threads)
    meta = model.meta
    shape = None if meta["dynamic"] else (meta["batch"], 3, *meta["imgsz"])
    return InferenceModel(model.to(device), model.names, meta["stride"], meta["dynamic"], shape, kind)
