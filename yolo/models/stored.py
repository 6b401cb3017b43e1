"""An architecture dict read from a file (a checkpoint's ``model_yaml``): checked before anything is built from it.

:func:`check_model_yaml` accepts upstream's layout only (``nc``, ``depth_multiple``, ``width_multiple``,
``anchors``, ``backbone``, ``head`` and the optional ``ch``, ``activation``, ``inplace``), with types and bounds
that keep a hostile file from making us build an enormous model; :func:`expected_shapes` builds the layers on the
meta device (no memory, no forward pass) to tell the tensor names and shapes the architecture implies, so that
weights can be checked against them before the real model is allocated. Failures are
:class:`~yolo.errors.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from yolo.errors import CheckpointError
from yolo.models.yolo import parse_model, to_plain

MAX_NC = 100_000
MAX_LAYERS = 1024
MAX_REPEATS = 1024
MAX_MULTIPLE = 16.0
MAX_ARG = 1 << 20  # largest number in a layer's arguments (channels, kernel sizes...)
_REQUIRED = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")
_OPTIONAL = ("ch", "activation", "inplace")


def _bad(where: Any, key: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: malformed stored model config: {key}: {why}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_anchors(anchors: Any, where: Any) -> None:
    if _is_int(anchors):
        if not 1 <= anchors <= 64:
            raise _bad(where, "anchors", f"{anchors} anchors per level is out of range")
        return
    if not (isinstance(anchors, list) and 1 <= len(anchors) <= 16):
        raise _bad(where, "anchors", "expected a count or a list of 1-16 levels")
    for i, level in enumerate(anchors):
        if not (isinstance(level, list) and 2 <= len(level) <= 128 and len(level) % 2 == 0
                and all(_is_number(a) and 0 < a <= MAX_ARG for a in level)):
            raise _bad(where, f"anchors[{i}]", "expected an even number of positive sizes")


def _check_arg(a: Any) -> bool:
    if a is None or isinstance(a, (bool, str)):
        return not isinstance(a, str) or len(a) <= 64
    if _is_number(a):
        return abs(a) <= MAX_ARG
    return isinstance(a, list) and len(a) <= 128 and all(_check_arg(x) and not isinstance(x, list) for x in a)


def _check_layer(i: int, layer: Any, n_before: int, where: Any) -> None:
    key = f"layer {i}"
    if not (isinstance(layer, list) and len(layer) == 4):
        raise _bad(where, key, "expected [from, number, module, args]")
    f, n, module, args = layer
    sources = f if isinstance(f, list) else [f]
    if not (1 <= len(sources) <= 64 and all(_is_int(x) and -n_before - 1 <= x < max(n_before, 1) for x in sources)):
        raise _bad(where, key, f"'from' {f!r} does not name earlier layers")
    if not (_is_int(n) and 1 <= n <= MAX_REPEATS):
        raise _bad(where, key, f"number {n!r} is out of range")
    if not (isinstance(module, str) and len(module) <= 64 and all(x.isidentifier() for x in module.split("."))):
        raise _bad(where, key, f"module {module!r} is not a name")
    if not (isinstance(args, list) and len(args) <= 16 and all(_check_arg(a) for a in args)):
        raise _bad(where, key, "args must be a short list of numbers, names, booleans or None")


def check_model_yaml(model_yaml: Any, where: str | os.PathLike, complete: bool = True) -> dict:
    """A plain copy of ``model_yaml`` if it is a well-formed, bounded upstream architecture dict; else raise.

    ``complete=False`` (reading a checkpoint) checks the keys present and requires ``nc`` only; building a model
    needs them all (the default)."""
    if not isinstance(model_yaml, Mapping):
        raise CheckpointError(f"{where}: malformed stored model config: expected a dict, got "
                              f"{type(model_yaml).__name__}")
    d = to_plain(model_yaml)
    missing = [k for k in (_REQUIRED if complete else ("nc",)) if k not in d]
    if missing:
        raise _bad(where, ", ".join(missing), "missing")
    unknown = sorted(str(k) for k in d if k not in _REQUIRED + _OPTIONAL)
    if unknown:
        raise _bad(where, ", ".join(unknown), "unknown key")
    if not (_is_int(d["nc"]) and 1 <= d["nc"] <= MAX_NC):
        raise _bad(where, "nc", f"expected a number of classes in 1..{MAX_NC}, got {d['nc']!r}")
    for k in ("depth_multiple", "width_multiple"):
        if k in d and not (_is_number(d[k]) and 0 < d[k] <= MAX_MULTIPLE):
            raise _bad(where, k, f"expected a number in (0, {MAX_MULTIPLE:g}], got {d[k]!r}")
    if d.get("ch") is not None and not (_is_int(d["ch"]) and 1 <= d["ch"] <= 16):
        raise _bad(where, "ch", f"expected 1..16 input channels, got {d['ch']!r}")
    if d.get("activation") is not None and not (isinstance(d["activation"], str) and len(d["activation"]) <= 64):
        raise _bad(where, "activation", "expected a short string such as 'nn.SiLU()'")
    if "inplace" in d and not isinstance(d["inplace"], bool):
        raise _bad(where, "inplace", "expected true or false")
    if "anchors" in d:
        _check_anchors(d["anchors"], where)
    _check_layers(d, where)
    return d


def _check_layers(d: dict, where: Any) -> None:
    layers = []
    for part in ("backbone", "head"):
        if part in d and not isinstance(d[part], list):
            raise _bad(where, part, "expected a list of layers")
        layers += d.get(part, [])
    if not ("backbone" in d and "head" in d):
        return  # an incomplete architecture is refused when something is built from it
    if len(layers) > MAX_LAYERS:
        raise _bad(where, "backbone/head", f"{len(layers)} layers (at most {MAX_LAYERS})")
    for i, layer in enumerate(layers):
        _check_layer(i, layer, i, where)


def expected_shapes(model_yaml: Mapping, where: str | os.PathLike, nc: int | None = None) -> dict[str, torch.Size]:
    """The state-dict names and shapes of :class:`~yolo.models.yolo.DetectionModel` built from ``model_yaml``
    (checked first), found without allocating: the layers are built on the meta device."""
    d = check_model_yaml(model_yaml, where)
    try:
        with torch.device("meta"):
            layers, _ = parse_model(d, ch=int(d.get("ch") or 3), nc=nc)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: stored model config cannot be built ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return {f"model.{k}": v.shape for k, v in layers.state_dict().items()}
