"""Export: a checkpoint as an ONNX or TorchScript file that gives the same detections as PyTorch.

The exported model takes a ``(b, 3, h, w)`` float image in [0, 1] and returns the Detect head's decoded output
``(b, N, 5 + nc)``: boxes ``cx, cy, w, h`` in input pixels, then objectness and class scores after the sigmoid (the
first element of our eval-mode output). Class names, stride, input size, batch and whether the shape is dynamic
travel in the file (:func:`yolo.runtime.export_metadata`), so ``python -m yolo.val weights=best.onnx`` needs
nothing else. Before the file gets its name it is run through the backend val uses (:mod:`yolo.runtime`) on a
fixed input and compared with PyTorch: boxes within 1e-3 px and scores within 1e-4, or nothing is written.

``python -m yolo.export weights=path/best.pt format=onnx|torchscript imgsz=640 dynamic=false output=null``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from torch import nn

from yolo.checkpoint import checked_model, load_checkpoint
from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main
from yolo.config import check_export_config  # also registers the config schema that the entry composes
from yolo.device import select_device
from yolo.engine.setup import check_img_size, hydra_output_dir
from yolo.errors import ConfigError, UserError
from yolo.runtime import export_metadata, load_exported, require_onnx
from yolo.utils.files import atomic_write

log = logging.getLogger("yolo")

PREFIX = {"onnx": "ONNX:", "torchscript": "TorchScript:"}
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}
RUNNER = {"onnx": "onnxruntime", "torchscript": "torch.jit.load"}
# (box px, box relative, scores): a box coordinate may differ by px + relative * |its value|, as numpy's allclose.
# 1e-3 px alone is below float32's reach for large boxes: yolov5n at 640 differs by up to 1.7e-3 px on ~250 px
# values (about 50 float32 steps, from the convolutions' summation order in onnxruntime's kernels).
TOLERANCE = {False: (1e-3, 1e-5, 1e-4), True: (0.5, 2e-3, 5e-3)}  # fp32, and fp16 (half=true)


class ExportCheckFailed(UserError):
    """The exported file does not reproduce PyTorch's output within the tolerances (nothing was written)."""


class DecodedOutput(nn.Module):
    """The model with only its decoded output, what an exported file returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]


@dataclass
class ExportResult:
    """Where the file went and how it compared with PyTorch."""

    path: Path
    seconds: float
    megabytes: float
    box_diff: float
    score_diff: float
    box_ratio: float  # the largest box difference as a fraction of its tolerance (<= 1)
    shapes: list[tuple[int, ...]]


# ---- where the file goes -----------------------------------------------------------------------------------------
def writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".yolo-export-probe-"):
            return True
    except OSError:
        return False


def output_path(weights: str | os.PathLike, fmt: str, output: str | None, run_dir: Path | None) -> Path:
    """``output`` when given (a folder gets ``<stem><suffix>`` inside), else beside the weights, else (that folder
    not writable) in the run folder, said in a log line."""
    name = Path(weights).with_suffix(SUFFIX[fmt]).name
    if output:
        out = Path(output).expanduser()
        return out / name if out.is_dir() else out
    beside = Path(weights).with_suffix(SUFFIX[fmt])
    if writable(beside.parent):
        return beside
    fallback = (run_dir or Path("runs/export")) / name
    log.warning(f"{PREFIX[fmt]} {beside.parent} is not writable: saving into the run folder {fallback.parent}")
    return fallback


# ---- the two formats ---------------------------------------------------------------------------------------------
def onnx_bytes(model: nn.Module, im: torch.Tensor, meta: dict[str, str], dynamic: bool, opset: int) -> bytes:
    """The ONNX model (TorchScript-based exporter, no extra dependency) with ``meta`` in its metadata_props."""
    import onnx  # optional dependency: checked by require_onnx before the weights are read

    buf = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and the tracer's shape warnings
        torch.onnx.export(model, (im,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes if dynamic else None)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def torchscript_bytes(model: nn.Module, im: torch.Tensor, meta: dict[str, str]) -> bytes:
    """The traced model with ``meta`` as its ``config.txt`` extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's shape warnings
        traced = torch.jit.trace(model, im, strict=False, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"config.txt": json.dumps(meta)})  # (its deprecation notice too)
    return buf.getvalue()


# ---- the check ---------------------------------------------------------------------------------------------------
def check_inputs(im: torch.Tensor, stride: int, dynamic: bool) -> list[torch.Tensor]:
    """Fixed, seeded inputs: the exported shape, and for a dynamic file another batch, height and width too."""
    b, _, h, w = im.shape
    shapes = [(b, 3, h, w)]
    if dynamic:
        shapes.append((b + 1, 3, max(stride, (h // 2) // stride * stride), w))
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(s, generator=gen).to(im.device, im.dtype) for s in shapes]


@torch.inference_mode()
def compare(path: Path, fmt: str, model: nn.Module, inputs: list[torch.Tensor],
            half: bool) -> tuple[float, float, float]:
    """``(box |diff| max, score |diff| max, box diff / tolerance max)`` between the file at ``path`` and ``model``;
    raises :class:`ExportCheckFailed` beyond the tolerances (:data:`TOLERANCE`)."""
    exported = load_exported(path, fmt, inputs[0].device)
    box_atol, box_rtol, score_tol = TOLERANCE[half]
    box_diff = score_diff = box_ratio = 0.0
    for im in inputs:
        want = model(im).float()
        got = exported(im)[0].float()
        if got.shape != want.shape:
            raise ExportCheckFailed(f"{PREFIX[fmt]} check failed: output {tuple(got.shape)} for input "
                                    f"{tuple(im.shape)}, PyTorch gives {tuple(want.shape)}; nothing written")
        diff = (got - want).abs()
        box_diff = max(box_diff, diff[..., :4].max().item())
        box_ratio = max(box_ratio, (diff[..., :4] / (box_atol + box_rtol * want[..., :4].abs())).max().item())
        score_diff = max(score_diff, diff[..., 4:].max().item())
    if not (box_ratio <= 1 and score_diff <= score_tol):  # NaN fails too
        raise ExportCheckFailed(f"{PREFIX[fmt]} check failed: {RUNNER[fmt]} differs from PyTorch by {box_diff:.3g} "
                                f"px in boxes ({box_ratio:.2f} of the tolerance {box_atol:g} px + {box_rtol:g} x "
                                f"|value|) and {score_diff:.3g} in scores (tolerance {score_tol:g}); nothing written")
    return box_diff, score_diff, box_ratio


# ---- the command -------------------------------------------------------------------------------------------------
def export(cfg) -> ExportResult:
    """Export ``cfg.weights`` (a :class:`yolo.config.ExportConfig`), check it and save it atomically."""
    check_export_config(cfg)
    fmt = cfg.format.lower()
    if fmt == "onnx":
        require_onnx("format=onnx")
    device = select_device(cfg.device)
    if cfg.half and device.type != "cuda":
        raise ConfigError(f"half: an fp16 export needs a CUDA device (device=cuda:0), got device={cfg.device}")
    model = checked_model(load_checkpoint(cfg.weights), cfg.weights, fuse=True)
    stride = int(max(model.stride.max().item(), 32))
    imgsz = check_img_size(cfg.imgsz, stride)
    model = DecodedOutput(model.to(device).half() if cfg.half else model.to(device)).eval()
    im = torch.zeros(cfg.batch_size, 3, imgsz, imgsz, device=device, dtype=torch.float16 if cfg.half else None)
    meta = export_metadata(model.model.names, stride, (imgsz, imgsz), cfg.batch_size, cfg.dynamic,
                           Path(cfg.weights).name)
    path = output_path(cfg.weights, fmt, cfg.output, hydra_output_dir())
    log.info(f"{PREFIX[fmt]} starting export of {cfg.weights} at {tuple(im.shape)} with {_tool(fmt, cfg.opset)}...")
    t0 = time.perf_counter()
    if fmt == "onnx":
        data = onnx_bytes(model, im, meta, cfg.dynamic, cfg.opset)
    else:
        data = torchscript_bytes(model, im, meta)
    seconds = time.perf_counter() - t0
    inputs = check_inputs(im, stride, cfg.dynamic)
    diffs: list[float] = []

    def write_and_check(f) -> None:
        f.write(data)
        f.flush()
        diffs.extend(compare(Path(f.name), fmt, model, inputs, cfg.half))

    try:
        atomic_write(path, write_and_check)
    except OSError as e:
        raise UserError(f"output: cannot write {path}: {e.strerror or e}") from None
    res = ExportResult(path, seconds, len(data) / 2**20, *diffs, [tuple(x.shape) for x in inputs])
    log.info(f"{PREFIX[fmt]} export success ✅ {res.seconds:.1f}s, saved as {res.path} ({res.megabytes:.1f} MB)")
    box_atol, box_rtol, score_tol = TOLERANCE[bool(cfg.half)]
    log.info(f"{PREFIX[fmt]} check ✅ {RUNNER[fmt]} vs PyTorch on {', '.join(map(str, res.shapes))}: max |diff| "
             f"boxes {res.box_diff:.2e} px ({res.box_ratio:.2f} of the tolerance {box_atol:g} px + {box_rtol:g} x "
             f"|value|), scores {res.score_diff:.2e} (tolerance {score_tol:g})")
    log.info(f"Validate: python -m yolo.val weights={res.path} data=... imgsz={imgsz}"
             + ("" if cfg.dynamic else f" (fixed input {tuple(im.shape)})"))
    return res


def _tool(fmt: str, opset: int) -> str:
    if fmt == "torchscript":
        return f"torch {torch.__version__}"
    import onnx  # optional dependency: present (require_onnx passed)

    return f"onnx {onnx.__version__} opset {opset}"


def main() -> None:
    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
    def _main(cfg) -> None:
        with exit_on_user_error():
            export(cfg)

    run_hydra_main(_main)


if __name__ == "__main__":
    main()
