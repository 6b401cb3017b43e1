"""Device selection and timing helpers."""

from __future__ import annotations

import logging
import time

import torch

from yolo.errors import ConfigError

log = logging.getLogger("yolo")


def select_device(device: str | int | None = "auto", local_rank: int | None = None) -> torch.device:
    """Turn a user's device string into a ``torch.device``.

    Accepts ``auto`` (first CUDA device when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:N``
    and upstream's bare index form (``0``).  Asking for CUDA on a machine without it is an error,
    not a silent fallback.

    ``local_rank`` is given by a DDP process (one process per device, see :mod:`yolo.engine.distributed`):
    ``auto``/``cuda`` then mean CUDA device ``local_rank``, and a list of indices (``0,1,2,3``, upstream's
    multi-GPU form) gives the process the ``local_rank``-th of them.  Outside DDP a list is an error that
    says how to launch one process per device.  Every refusal is a :class:`~yolo.errors.ConfigError` (a
    ``ValueError`` too) whose message starts with ``device:``.
    """
    spec = "auto" if device is None or device == "" else str(device).strip().lower().replace(" ", "")
    indices = _index_list(spec)
    if indices is not None and (len(indices) > 1 or local_rank is not None):
        return _device_from_list(device, indices, local_rank)
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return _cuda(device, "cuda:0" if local_rank is None else f"cuda:{local_rank}")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    if spec == "cuda" and local_rank is not None:
        spec = f"cuda:{local_rank}"
    if spec.startswith("cuda"):
        return _cuda(device, spec)
    raise _unknown(device)


def _unknown(device) -> ConfigError:
    return ConfigError(f"device: {device!r} is unknown: use auto, cpu, cuda, cuda:N or a list of indices like 0,1")


def check_device(device: str | int | None, key: str = "device") -> None:
    """Raise :class:`~yolo.errors.ConfigError` unless ``device`` names a device this machine has. A list of GPUs
    (``0,1``, for one process each under torchrun) is checked index by index; :func:`select_device` then gives
    each process its own."""
    spec = "auto" if device is None or device == "" else str(device).strip().lower().replace(" ", "")
    indices = _index_list(spec)
    try:
        if indices is not None and len(indices) > 1:
            for i in indices:
                _cuda(device, f"cuda:{i}")
        else:
            select_device(device)
    except ConfigError as e:
        if key == "device":
            raise
        raise ConfigError(f"{key}: {str(e).removeprefix('device: ')}") from None


def _index_list(spec: str) -> list[int] | None:
    """``"0,1"``, ``"cuda:0,1"`` or ``"2"`` -> the CUDA indices; None for anything else."""
    body = spec[len("cuda:"):] if spec.startswith("cuda:") else spec
    parts = body.split(",")
    if not all(p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def _device_from_list(device, indices: list[int], local_rank: int | None) -> torch.device:
    if local_rank is None:
        raise ConfigError(f"device: {device!r} names {len(indices)} GPUs: a single process trains on one device. "
                          f"Start one process per GPU with torchrun --nproc_per_node={len(indices)} run_train.py "
                          f"device={device} ...")
    if local_rank >= len(indices):
        raise ConfigError(f"device: {device!r} names {len(indices)} GPU(s) but this is local process {local_rank}: "
                          f"name one GPU per process on this node (as many as --nproc_per_node), or use device=auto")
    return _cuda(device, f"cuda:{indices[local_rank]}")


def _cuda(device, spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available on this machine")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise _unknown(device) from None
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def sync_time(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` after waiting for queued CUDA work, so timings are honest."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
