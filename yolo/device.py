"""Device selection and timing helpers."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("yolo")


def select_device(device: str | int | None = "auto") -> torch.device:
    """Turn a user's device string into a ``torch.device``.

    Accepts ``auto`` (first CUDA device when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:N``
    and upstream's bare index form (``0``).  Asking for CUDA on a machine without it is an error,
    not a silent fallback.
    """
    spec = "auto" if device is None or device == "" else str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def sync_time(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` after waiting for queued CUDA work, so timings are honest."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
