"""Mixed precision: one setting, ``amp=auto|off|bf16|fp16``, resolved once per run into a :class:`Precision`.

* ``auto``: bf16 autocast on a CPU with fast bf16 (``amx_bf16`` or ``avx512_bf16``), fp16 autocast with a
  GradScaler on CUDA, fp32 elsewhere;
* ``bf16``: bf16 autocast (no scaler: bf16 has fp32's range), on a CPU or a GPU that supports it;
* ``fp16``: fp16 autocast with a GradScaler, CUDA only;
* ``off``: fp32.

Only the forward pass (and the loss inside it) runs under autocast; the weights, the optimizer, the EMA and the
loss reductions stay fp32, as upstream's AMP. :func:`check_amp` is upstream's guard against broken AMP: the model's
outputs with and without autocast on a fixed input must agree, else AMP is turned off with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from yolo.errors import ConfigError

log = logging.getLogger("yolo")

MODES = ("auto", "off", "bf16", "fp16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
SCORE_TOL = 0.05  # largest difference of any objectness or class probability
BOX_TOL = 0.02  # 99th percentile of box coordinate differences, as a fraction of the input size


@dataclass(frozen=True)
class Precision:
    mode: str  # "off" | "bf16" | "fp16"
    device_type: str
    reason: str

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode, torch.float32)

    @property
    def scaler(self) -> bool:
        """A GradScaler is needed: fp16 gradients underflow without one."""
        return self.mode == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        return f"AMP: {self.mode if self.enabled else 'off (fp32)'} ({self.reason})"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")[:1_000_000]
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[-1].split())
    return set()


def cpu_fast_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in CPU_BF16_FLAGS)


def normalise(setting) -> str:
    """``true``/``false`` (the old boolean setting) mean ``auto``/``off``."""
    if isinstance(setting, bool):
        return "auto" if setting else "off"
    mode = str(setting).strip().lower()
    if mode in ("true", "1", "yes"):
        return "auto"
    if mode in ("false", "0", "no", "none", ""):
        return "off"
    if mode not in MODES:
        raise ConfigError(f"amp: must be one of {', '.join(MODES)}, got {setting!r}")
    return mode


def choose(setting, device: torch.device, flags: set[str] | None = None) -> Precision:
    """What ``amp=setting`` means on ``device``, and why."""
    mode, kind = normalise(setting), device.type
    if mode == "off":
        return Precision("off", kind, "amp=off")
    if kind == "cuda":
        if mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("amp: bf16 is not supported by this GPU; use amp=fp16 or amp=auto")
        if mode == "auto":
            return Precision("fp16", kind, "CUDA: fp16 autocast with a gradient scaler")
        return Precision(mode, kind, f"amp={mode} on CUDA")
    if kind == "cpu":
        if mode == "fp16":
            raise ConfigError("amp: fp16 needs a CUDA device; on a CPU use amp=bf16, amp=auto or amp=off")
        if mode == "auto":
            if cpu_fast_bf16(flags):
                return Precision("bf16", kind, "CPU with fast bf16 (amx_bf16/avx512_bf16)")
            return Precision("off", kind, "this CPU has no fast bf16")
        return Precision("bf16", kind, "amp=bf16 on CPU")
    if mode == "auto":
        return Precision("off", kind, f"no AMP on {kind}")
    raise ConfigError(f"amp: {mode} is not available on device {kind}; use amp=off")


def fixed_input(imgsz: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """A deterministic image-like batch of one: smooth gradients and blocks, values in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=g)
    img = nn.functional.interpolate(coarse, size=(imgsz, imgsz), mode="bilinear", align_corners=False)
    ramp = torch.linspace(0, 1, imgsz).view(1, 1, 1, imgsz)
    return ((img + 0.3 * ramp) / 1.3).clamp(0, 1).to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def amp_disagreement(model: nn.Module, precision: Precision, imgsz: int = 256) -> tuple[float, float]:
    """``(largest score difference, 99th-percentile box difference / imgsz)`` between fp32 and autocast
    outputs of ``model`` (eval mode) on :func:`fixed_input`."""
    was_training = model.training
    device = next(model.parameters()).device
    x = fixed_input(imgsz, device)
    model.eval()
    try:
        ref = model(x)[0].float()
        with precision.autocast():
            out = model(x)[0].float()
    finally:
        model.train(was_training)
    score = float((ref[..., 4:] - out[..., 4:]).abs().max())
    box = float(torch.quantile((ref[..., :4] - out[..., :4]).abs().flatten().float(), 0.99)) / imgsz
    return score, box


def check_amp(model: nn.Module, precision: Precision, imgsz: int = 256) -> Precision:
    """Upstream's AMP check: keep AMP only when autocast outputs agree with fp32 ones within :data:`SCORE_TOL`
    (scores) and :data:`BOX_TOL` (boxes); otherwise warn and train in fp32."""
    if not precision.enabled:
        return precision
    try:
        score, box = amp_disagreement(model, precision, imgsz)
    except Exception as e:  # an AMP that cannot even run is an AMP to turn off
        score, box, why = float("inf"), float("inf"), f"{type(e).__name__}: {e}"
    else:
        why = (f"scores differ by {score:.3g} (tolerance {SCORE_TOL}), boxes by {box:.3g} of the input "
               f"(tolerance {BOX_TOL})")
    if score <= SCORE_TOL and box <= BOX_TOL:
        log.info(f"AMP checks passed ✅ ({precision.mode}: {why})")
        return precision
    log.warning(f"WARNING: AMP checks failed ❌, training in fp32 instead: {why}")
    return replace(precision, mode="off", reason=f"AMP check failed: {why}")
