"""Checkpoints: reading upstream YOLOv5 ``.pt`` files safely, and our own versioned format.

Upstream files
--------------
An upstream checkpoint is a torch zip archive whose pickle holds a dict (``epoch``, ``best_fitness``, ``model``,
``ema``, ``updates``, ``optimizer``, ...) in which ``model``/``ema`` are pickled ``models.yolo.Model`` objects.
:mod:`yolo.safe_pickle` reads it without running any of its code and with every allocation bounded by the file;
the model objects arrive as inert placeholders. The weights are then read by walking the placeholders'
``_modules``/``_parameters``/``_buffers`` into a float32 state dict with upstream's names (``model.0.conv.weight``,
...), and ``yaml``, ``names`` and ``stride`` are read from the model object. As upstream's ``attempt_load`` does,
the EMA model is preferred when the file has one. The stored architecture (``yaml``) is checked by
:func:`yolo.models.stored.check_model_yaml`: a malformed one is a :class:`CheckpointError`.

Models from checkpoints
-----------------------
:func:`checked_model` builds the checkpoint's own architecture and loads its weights strictly (every tensor present,
with its shape, finite); validation, resume and prediction use it. :func:`load_model` does the same from a path,
or, given another architecture or number of classes, transfers what fits by name and shape (fine-tuning).

Our format (``format: yolo-hydra-checkpoint``, ``version: 1``)
---------------------------------------------------------------
A plain dict saved with ``torch.save``, holding only tensors, builtin containers and scalars, so that
``torch.load(path, weights_only=True)`` reads it:

=================  =========================================================================================
key                value
=================  =========================================================================================
``format``         ``'yolo-hydra-checkpoint'``
``version``        ``1``
``model_yaml``     the architecture dict (upstream layout, ``nc`` and ``ch`` included)
``names``          class names, ``list[str]``
``stride``         ``list[float]``, e.g. ``[8.0, 16.0, 32.0]``
``state_dict``     model weights, floating tensors stored as float16 (as upstream stores them; float32 when
                   written at a ``stop_epoch`` pause, so the resume continues exactly)
``ema_state_dict`` EMA weights (float16, or float32 likewise) or ``None``
``updates``        number of EMA updates or ``None``
``optimizer``      ``optimizer.state_dict()`` or ``None``
``epoch``          last finished epoch, ``-1`` for a final/stripped checkpoint
``best_fitness``   ``float`` or ``None``
``config``         the run's resolved config as a plain dict, or ``None``
``date``           ISO-8601 time of writing
``extra``          a plain dict for anything else
=================  =========================================================================================

Files are written with :func:`yolo.utils.files.atomic_write` (a flushed temporary file renamed into place), so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import copy
import datetime as _dt
import enum
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from yolo.errors import CheckpointError
from yolo.models.stored import check_model_yaml, expected_shapes
from yolo.models.transfer import check_finite, fit_problem, load_state_strict, transfer_weights
from yolo.models.yolo import DetectionModel, load_model_yaml, unwrap_model
from yolo.safe_pickle import PickledObject, read_torch_file
from yolo.utils.files import atomic_write

LOGGER = logging.getLogger(__name__)

FORMAT_NAME = "yolo-hydra-checkpoint"
FORMAT_VERSION = 1
__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "checked_model", "load_checkpoint",
           "load_model", "save_checkpoint", "strip_optimizer"]


@dataclass
class Checkpoint:
    """What a checkpoint holds, independent of the file format it came from."""

    state_dict: dict[str, torch.Tensor]
    model_yaml: dict
    names: list[str]
    stride: list[float]
    epoch: int = -1
    best_fitness: float | None = None
    optimizer: dict | None = None
    ema_state_dict: dict[str, torch.Tensor] | None = None
    updates: int | None = None
    config: dict | None = None
    source: str = "native"  # 'upstream' | 'native'
    extra: dict = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return int(self.model_yaml["nc"])


# ----------------------------------------------------------------------------------------------------------------
# reading


class _Malformed(ValueError):
    """Something inside a checkpoint is not what its format says (the caller names the file)."""


def _float_tensor(t: Any, name: str = "?") -> torch.Tensor:
    """A stored weight as a dense tensor of its own (floats as float32); a view that would be materialised
    beyond its storage (stride 0 or overlapping) is refused."""
    if not isinstance(t, torch.Tensor):
        raise _Malformed(f"'{name}' is a {type(t).__name__}, not a tensor")
    t = t.detach()
    if t.numel() > 1 and t.numel() * t.element_size() > t.untyped_storage().nbytes():
        raise _Malformed(f"'{name}' is a stride-0 or overlapping view of {list(t.shape)} over a smaller storage "
                         f"(a corrupt or hostile file)")
    t = t.float() if t.is_floating_point() else t.clone()
    return t.contiguous()


def _float_state_dict(sd: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise _Malformed(f"'{what}' is not a dict of named tensors")
    return {k: _float_tensor(v, k) for k, v in sd.items()}


def _placeholder_state_dict(obj: Any, prefix: str = "", out: dict | None = None,
                            seen: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Walk an unpickled module tree (placeholders) and collect parameters and persistent buffers by name."""
    out, seen = ({} if out is None else out), (set() if seen is None else seen)
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(obj, PickledObject):
        raise _Malformed(f"expected a pickled module at '{where}', got {type(obj).__name__}")
    if id(obj) in seen:
        raise _Malformed(f"module '{where}' appears twice in the model tree")
    seen.add(id(obj))
    d = obj.__dict__
    parts = [d.get(k) or {} for k in ("_parameters", "_buffers", "_modules")]
    skip = d.get("_non_persistent_buffers_set") or set()
    if not all(isinstance(x, Mapping) and all(isinstance(k, str) for k in x) for x in parts) \
            or not isinstance(skip, (set, frozenset)):
        raise _Malformed(f"module '{where}' has malformed parameters, buffers or submodules")
    params, buffers, modules = parts
    for name, t in params.items():
        if t is not None:
            out[prefix + name] = _float_tensor(t, prefix + name)
    for name, t in buffers.items():
        if t is not None and name not in skip:
            out[prefix + name] = _float_tensor(t, prefix + name)
    for name, child in modules.items():
        if child is not None:
            _placeholder_state_dict(child, f"{prefix}{name}.", out, seen)
    return out


def _plain(value: Any) -> Any:
    """Builtin containers/scalars/tensors only (for configs and extras, so ``weights_only`` loading works)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (DictConfig, ListConfig)):
        return _plain(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except Exception:
            pass
    return str(value)


def _names_list(names: Any, nc: int) -> list[str]:
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def _stride_list(stride: Any) -> list[float]:
    stride = stride.tolist() if isinstance(stride, torch.Tensor) and stride.numel() <= 16 else stride
    if not (isinstance(stride, (list, tuple)) and len(stride) <= 16
            and all(isinstance(x, (int, float)) for x in stride)):
        raise _Malformed("'stride' is not a short list of numbers")
    return [float(x) for x in stride]


def _optional(value: Any, kind: type, key: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise _Malformed(f"'{key}' is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _from_upstream(ckpt: Mapping, path: Path) -> Checkpoint:
    model_obj = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model_obj, PickledObject):
        raise _Malformed(f"no model object in the checkpoint (keys: {sorted(map(str, ckpt))})")
    attrs = model_obj.__dict__
    if not isinstance(attrs.get("yaml"), Mapping):
        raise _Malformed("the pickled model has no architecture dict ('yaml')")
    model_yaml = check_model_yaml(_plain(attrs["yaml"]), path, complete=False)
    state_dict = _placeholder_state_dict(model_obj)
    ema_sd = None
    extra: dict[str, Any] = {}
    if isinstance(ckpt.get("ema"), PickledObject):
        ema_sd = state_dict
        if isinstance(ckpt.get("model"), PickledObject):  # the raw (non-EMA) weights, e.g. to resume training
            extra["model_state_dict"] = _placeholder_state_dict(ckpt["model"])
    for k in ("yaml_file", "hyp"):  # model attributes worth keeping (upstream's file name and hyperparameters)
        if attrs.get(k) is not None:
            extra[k] = _plain(attrs[k])
    consumed = {"model", "ema", "epoch", "best_fitness", "optimizer", "updates", "opt"}
    for k, v in ckpt.items():
        if k not in consumed and not isinstance(v, PickledObject):
            extra[str(k)] = _plain(v)
    best, opt, updates, epoch = (ckpt.get(k) for k in ("best_fitness", "opt", "updates", "epoch"))
    return Checkpoint(
        state_dict=state_dict,
        model_yaml=model_yaml,
        names=_names_list(attrs.get("names"), model_yaml["nc"]),
        stride=_stride_list(attrs.get("stride") if attrs.get("stride") is not None else []),
        epoch=-1 if epoch is None else int(epoch),
        best_fitness=None if best is None else float(best),
        optimizer=ckpt.get("optimizer") if isinstance(ckpt.get("optimizer"), dict) else None,
        ema_state_dict=ema_sd,
        updates=None if updates is None else int(updates),
        config=_plain(opt) if isinstance(opt, Mapping) else None,
        source="upstream",
        extra=extra,
    )


def _from_native(ckpt: Mapping, path: Path) -> Checkpoint:
    version = ckpt.get("version")
    if version != FORMAT_VERSION:
        raise _Malformed(f"unsupported {FORMAT_NAME} version {version!r} (this code reads {FORMAT_VERSION})")
    missing = [k for k in ("state_dict", "model_yaml", "names", "stride") if k not in ckpt]
    if missing:
        raise _Malformed(f"malformed {FORMAT_NAME} file (missing {', '.join(missing)})")
    extra = dict(_optional(ckpt.get("extra"), Mapping, "extra") or {})
    if ckpt.get("date") is not None:
        extra.setdefault("date", ckpt["date"])
    ema = ckpt.get("ema_state_dict")
    names = _optional(ckpt["names"], (list, tuple), "names")
    return Checkpoint(
        state_dict=_float_state_dict(ckpt["state_dict"], "state_dict"),
        model_yaml=check_model_yaml(ckpt["model_yaml"], path, complete=False),
        names=[str(n) for n in names],
        stride=_stride_list(ckpt["stride"]),
        epoch=int(ckpt.get("epoch", -1)),
        best_fitness=None if ckpt.get("best_fitness") is None else float(ckpt["best_fitness"]),
        optimizer=_optional(ckpt.get("optimizer"), Mapping, "optimizer"),
        ema_state_dict=None if ema is None else _float_state_dict(ema, "ema_state_dict"),
        updates=None if ckpt.get("updates") is None else int(ckpt["updates"]),
        config=_optional(ckpt.get("config"), Mapping, "config"),
        source="native",
        extra=extra,
    )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an upstream YOLOv5 ``.pt`` or one of ours (detected by content). Raises :class:`CheckpointError`
    (one line naming ``path``) for a missing, corrupt, hostile or malformed file."""
    path = Path(path)
    obj = read_torch_file(path)
    try:
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
            return _from_native(obj, path)
        if isinstance(obj, Mapping) and ("model" in obj or "ema" in obj):
            return _from_upstream(obj, path)
        if isinstance(obj, PickledObject):  # a bare pickled model (torch.save(model))
            return _from_upstream({"model": obj}, path)
    except (_Malformed, KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        what = str(e) if isinstance(e, _Malformed) else f"malformed checkpoint ({type(e).__name__}: {e})"
        raise CheckpointError(f"{path}: {what.strip().splitlines()[0] if what.strip() else what}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: malformed checkpoint (the model tree nests too deeply)") from None
    raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (top level is {type(obj).__name__})")


# ----------------------------------------------------------------------------------------------------------------
# writing


def _half_state_dict(sd: Mapping[str, torch.Tensor], half: bool = True) -> dict[str, torch.Tensor]:
    return {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in sd.items()}


def _model_state(obj: Any, half: bool = True) -> dict[str, torch.Tensor] | None:
    """A model, an EMA holder (``.ema`` module) or a state dict -> a half-precision (or, with ``half`` false,
    full-precision) state dict."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return _half_state_dict(obj, half)
    if isinstance(obj, nn.Module):
        return _half_state_dict(unwrap_model(obj).state_dict(), half)
    inner = getattr(obj, "ema", None)
    if isinstance(inner, nn.Module):
        return _half_state_dict(unwrap_model(inner).state_dict(), half)
    raise TypeError(f"cannot take a state dict from {type(obj).__name__}")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _native_dict(
    *,
    model_yaml: dict,
    names: list[str],
    stride: list[float],
    state_dict: dict,
    ema_state_dict: dict | None,
    updates: int | None,
    optimizer: dict | None,
    epoch: int,
    best_fitness: float | None,
    config: dict | None,
    extra: dict | None,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_yaml": _plain(model_yaml),
        "names": [str(n) for n in names],
        "stride": [float(s) for s in stride],
        "state_dict": state_dict,
        "ema_state_dict": ema_state_dict,
        "updates": None if updates is None else int(updates),
        "optimizer": optimizer,
        "epoch": int(epoch),
        "best_fitness": None if best_fitness is None else float(best_fitness),
        "config": None if config is None else _plain(config),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "extra": _plain(dict(extra or {})),
    }


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    ema: Any = None,
    optimizer: Any = None,
    epoch: int = -1,
    best_fitness: float | None = None,
    updates: int | None = None,
    config: Any = None,
    extra: Mapping | None = None,
    full_precision: bool = False,
) -> Path:
    """Write our format (see the module docstring) atomically. ``ema`` may be a model, an object with ``.ema``
    (and ``.updates``) or a state dict; ``optimizer`` an optimizer or its state dict; ``config`` a DictConfig or
    dict (stored as a plain dict). ``full_precision``: weights in float32, not float16 (a paused run's checkpoint:
    its resume then continues exactly as an uninterrupted run would)."""
    path = Path(path)
    net = unwrap_model(model)
    if updates is None and ema is not None and isinstance(getattr(ema, "updates", None), int):
        updates = ema.updates
    if optimizer is not None and not isinstance(optimizer, Mapping):
        optimizer = optimizer.state_dict()
    stride = getattr(net, "stride", None)
    stride = stride.tolist() if isinstance(stride, torch.Tensor) else list(stride or [])
    ckpt = _native_dict(
        model_yaml=copy.deepcopy(getattr(net, "yaml", {})),
        names=list(getattr(net, "names", [])),
        stride=stride,
        state_dict=_model_state(net, half=not full_precision),
        ema_state_dict=_model_state(ema, half=not full_precision),
        updates=updates,
        optimizer=None if optimizer is None else copy.deepcopy(dict(optimizer)),
        epoch=epoch,
        best_fitness=best_fitness,
        config=config,
        extra=extra,
    )
    _atomic_save(ckpt, path)
    return path


def strip_optimizer(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Make a final, inference-only checkpoint: EMA weights (if any) become the model weights; optimizer, EMA,
    updates and best fitness are dropped and epoch is set to -1. Writes our format to ``out`` (default: in
    place; an upstream file is thereby converted)."""
    path = Path(path)
    ck = load_checkpoint(path)
    weights = ck.ema_state_dict if ck.ema_state_dict is not None else ck.state_dict
    extra = {k: v for k, v in ck.extra.items() if k != "model_state_dict"}
    target = Path(out) if out is not None else path
    _atomic_save(
        _native_dict(
            model_yaml=ck.model_yaml,
            names=ck.names,
            stride=ck.stride,
            state_dict=_half_state_dict(weights),
            ema_state_dict=None,
            updates=None,
            optimizer=None,
            epoch=-1,
            best_fitness=None,
            config=ck.config,
            extra=extra,
        ),
        target,
    )
    LOGGER.info(f"Optimizer stripped from {path}{f', saved as {target}' if target != path else ''}, "
                f"{target.stat().st_size / 1e6:.1f}MB")
    return target




# ----------------------------------------------------------------------------------------------------------------
# models from checkpoints


def checked_model(
    ckpt: Checkpoint,
    path: str | os.PathLike,
    *,
    model_cfg: Any = None,
    nc: int | None = None,
    fuse: bool = False,
) -> DetectionModel:
    """The model ``ckpt`` describes, with its weights loaded strictly: float32, in eval mode.

    The architecture is the checkpoint's own unless ``model_cfg`` (dict / DictConfig / path / zoo name) is given;
    ``nc`` overrides its number of classes. Before anything is allocated, the tensor names and shapes the
    architecture implies are compared with the stored ones: a missing, unexpected or mis-shaped tensor, or a
    NaN/inf weight, is one :class:`CheckpointError` naming ``path`` (with a few names and the counts).
    """
    arch = check_model_yaml(ckpt.model_yaml, path) if model_cfg is None else load_model_yaml(model_cfg)[0]
    problem = fit_problem(expected_shapes(arch, path, nc=nc), ckpt.state_dict)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    check_finite(ckpt.state_dict, path)
    model = DetectionModel(copy.deepcopy(arch), nc=nc)
    load_state_strict(model, ckpt.state_dict, path)
    _adopt_names(model, ckpt, from_checkpoint=model_cfg is None)
    model = model.float().eval()
    return model.fuse() if fuse else model


def _adopt_names(model: DetectionModel, ckpt: Checkpoint, from_checkpoint: bool) -> None:
    if model.nc == len(ckpt.names):
        model.names = list(ckpt.names)
    if from_checkpoint and isinstance(ckpt.extra.get("yaml_file"), str):
        model.yaml_file = ckpt.extra["yaml_file"]


def load_model(
    weights: str | os.PathLike,
    model_cfg: Any = None,
    nc: int | None = None,
    fuse: bool = False,
    exclude: Iterable[str] | None = None,
):
    """Build a model and fill it from ``weights``. Returns ``(model, checkpoint)``, the model float32 in eval mode.

    With neither ``model_cfg`` nor a different ``nc`` this is :func:`checked_model` (strict). Otherwise the
    weights go into that architecture by name and shape, as fine-tuning does (``exclude`` defaults, as upstream's
    training does, to ``('anchor',)`` when ``model_cfg`` is given, so the config's anchors win); nothing
    transferring at all is an error. Class names are taken from the checkpoint when the numbers of classes agree.
    """
    ckpt = load_checkpoint(weights)
    if model_cfg is None and (nc is None or nc == ckpt.nc):
        return checked_model(ckpt, weights, fuse=fuse), ckpt
    model = DetectionModel(model_cfg if model_cfg is not None else copy.deepcopy(ckpt.model_yaml), nc=nc)
    if exclude is None:
        exclude = ("anchor",) if model_cfg is not None else ()
    transfer_weights(model, ckpt.state_dict, exclude=exclude, source=weights)
    _adopt_names(model, ckpt, from_checkpoint=model_cfg is None)
    model = model.float().eval()
    return (model.fuse() if fuse else model), ckpt
