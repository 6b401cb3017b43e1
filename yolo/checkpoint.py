"""Checkpoints: reading upstream YOLOv5 ``.pt`` files safely, and our own versioned format.

Upstream files
--------------
An upstream checkpoint is a torch zip archive whose pickle holds a dict (``epoch``, ``best_fitness``, ``model``,
``ema``, ``updates``, ``optimizer``, ...) in which ``model``/``ema`` are pickled ``models.yolo.Model`` objects.
Unpickling those normally imports and runs upstream's code, and a pickle may name any callable at all. Here a
restricted unpickler decides what every global in the pickle resolves to:

- torch's tensor/parameter rebuild functions, ``collections.OrderedDict``, a few builtin containers, torch dtypes,
  ``torch.Size``/``torch.device``, numpy scalars and dtypes: the real objects (``_codecs.encode``, which
  protocol-2 pickles use to spell bytes, only as a latin-1 encoder);
- ``models.*`` (upstream's classes) and ``torch.nn.modules.*``: inert placeholder classes that only store the
  pickled attributes (no ``__init__`` logic, no imports, no forward);
- anything else: refused, with a :class:`CheckpointError` naming the file and the global.

The weights are then read by walking the placeholders' ``_modules``/``_parameters``/``_buffers`` into a float32
state dict with upstream's names (``model.0.conv.weight``, ...), and ``yaml``, ``names`` and ``stride`` are read
from the model object. As upstream's ``attempt_load`` does, the EMA model is preferred when the file has one.

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
``state_dict``     model weights, floating tensors stored as float16 (as upstream stores them)
``ema_state_dict`` EMA weights (float16) or ``None``
``updates``        number of EMA updates or ``None``
``optimizer``      ``optimizer.state_dict()`` or ``None``
``epoch``          last finished epoch, ``-1`` for a final/stripped checkpoint
``best_fitness``   ``float`` or ``None``
``config``         the run's resolved config as a plain dict, or ``None``
``date``           ISO-8601 time of writing
``extra``          a plain dict for anything else
=================  =========================================================================================

Files are written to a temporary file next to the target and moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import collections
import copy
import datetime as _dt
import enum
import io
import logging
import os
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from yolo.errors import UserError
from yolo.models.yolo import unwrap_model

LOGGER = logging.getLogger(__name__)

FORMAT_NAME = "yolo-hydra-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint could not be read (missing, corrupt, unsupported or unsafe)."""


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
# restricted unpickling


class PickledObject:
    """Inert stand-in for a class in an upstream pickle: it stores the pickled attributes and does nothing else."""

    _pickled_class: str = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # only reached through REDUCE; keep the arguments
        self._pickled_args = args
        self._pickled_kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickled_state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self._pickled_class}>"


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name, (PickledObject,), {"_pickled_class": key, "__module__": __name__})
    return _PLACEHOLDERS[key]


def _torch_dtype(name: str) -> Any:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in {"latin1", "iso88591"}:
        raise pickle.UnpicklingError("unexpected _codecs.encode call in the pickle")
    return text.encode("latin1")


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle global resolves to, or ``None`` when it is not allowed."""
    if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
        module = "builtins"
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "builtins" and name in {"set", "frozenset", "dict", "list", "tuple", "bytearray"}:
        return {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple,
                "bytearray": bytearray}[name]
    if module == "_codecs" and name == "encode":  # how protocol-2 pickles spell bytes (e.g. in numpy scalars)
        return _latin1_encode
    if module == "torch._utils" and name in {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    }:
        return getattr(torch._utils, name)
    if module == "torch":
        if name in {"Size", "device"}:
            return getattr(torch, name)
        return _torch_dtype(name)
    if module in {"numpy.core.multiarray", "numpy._core.multiarray"} and name == "scalar":
        import numpy as np

        return np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    if module == "numpy" and name == "dtype":
        import numpy as np

        return np.dtype
    if module == "numpy.dtypes" and name.endswith("DType"):
        import numpy.dtypes

        value = getattr(numpy.dtypes, name, None)
        return value if isinstance(value, type) else None
    if name.isidentifier() and (
        module == "models" or module.startswith("models.") or module.startswith("torch.nn.modules.")
    ):
        return _placeholder(module, name)
    return None


class ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"forbidden global '{module}.{name}' in the pickle")
        self.global_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals through an allowlist (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise ForbiddenGlobal(module, name)
        return obj


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# A module-like object for torch.load(pickle_module=...): torch subclasses ``Unpickler`` (its own find_class then
# calls ours through super()) and uses ``load`` for the few plain records of the legacy format.
restricted_pickle = types.ModuleType("yolo_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads
restricted_pickle.UnpicklingError = pickle.UnpicklingError
restricted_pickle.__version__ = "1"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_pickle(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except ForbiddenGlobal as e:
        raise CheckpointError(
            f"{path}: refusing to load: {e} (only tensors, containers and model classes are allowed)"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # zip/pickle/EOF/OS errors all mean the same thing to the caller
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(b"PK"):
            what = "truncated or corrupt checkpoint archive"
        elif head[:1] == b"\x80":
            what = "truncated or corrupt pickle"
        else:
            what = "not a PyTorch checkpoint"
        raise CheckpointError(f"{path}: {what} ({_first_line(e)})") from None


# ----------------------------------------------------------------------------------------------------------------
# reading


def _float_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    t = t.float() if t.is_floating_point() else t.clone()
    return t.contiguous()


def _placeholder_state_dict(obj: Any, prefix: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    """Walk an unpickled module tree (placeholders) and collect parameters and persistent buffers by name."""
    out = {} if out is None else out
    if not isinstance(obj, PickledObject):
        raise CheckpointError(f"expected a pickled module at '{prefix.rstrip('.') or '<root>'}', got {type(obj)}")
    d = obj.__dict__
    for name, t in (d.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = _float_tensor(t)
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, t in (d.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = _float_tensor(t)
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            _placeholder_state_dict(child, f"{prefix}{name}.", out)
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


def _from_upstream(ckpt: Mapping, path: Path) -> Checkpoint:
    model_obj = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model_obj, PickledObject):
        raise CheckpointError(f"{path}: no model object in the checkpoint (keys: {sorted(ckpt)})")
    attrs = model_obj.__dict__
    model_yaml = attrs.get("yaml")
    if not isinstance(model_yaml, dict):
        raise CheckpointError(f"{path}: the pickled model has no architecture dict ('yaml')")
    model_yaml = _plain(copy.deepcopy(model_yaml))
    try:
        state_dict = _placeholder_state_dict(model_obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    stride = attrs.get("stride")
    stride = [float(s) for s in stride.tolist()] if isinstance(stride, torch.Tensor) else list(stride or [])
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
            extra[k] = _plain(v)
    best = ckpt.get("best_fitness")
    opt = ckpt.get("opt")
    updates = ckpt.get("updates")
    return Checkpoint(
        state_dict=state_dict,
        model_yaml=model_yaml,
        names=_names_list(attrs.get("names"), int(model_yaml.get("nc", 0))),
        stride=stride,
        epoch=int(ckpt.get("epoch", -1) if ckpt.get("epoch") is not None else -1),
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
        raise CheckpointError(f"{path}: unsupported {FORMAT_NAME} version {version!r} (this code reads {FORMAT_VERSION})")
    try:
        def floats(sd: Mapping | None) -> dict | None:
            return None if sd is None else {k: _float_tensor(v) for k, v in sd.items()}

        extra = dict(ckpt.get("extra") or {})
        if ckpt.get("date") is not None:
            extra.setdefault("date", ckpt["date"])
        return Checkpoint(
            state_dict=floats(ckpt["state_dict"]),
            model_yaml=dict(ckpt["model_yaml"]),
            names=[str(n) for n in ckpt["names"]],
            stride=[float(s) for s in ckpt["stride"]],
            epoch=int(ckpt.get("epoch", -1)),
            best_fitness=None if ckpt.get("best_fitness") is None else float(ckpt["best_fitness"]),
            optimizer=ckpt.get("optimizer"),
            ema_state_dict=floats(ckpt.get("ema_state_dict")),
            updates=None if ckpt.get("updates") is None else int(ckpt["updates"]),
            config=ckpt.get("config"),
            source="native",
            extra=extra,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed {FORMAT_NAME} file ({_first_line(e)})") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an upstream YOLOv5 ``.pt`` or one of ours (detected by content). Raises :class:`CheckpointError`."""
    path = Path(path)
    obj = _read_pickle(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        return _from_native(obj, path)
    if isinstance(obj, Mapping) and ("model" in obj or "ema" in obj):
        return _from_upstream(obj, path)
    if isinstance(obj, PickledObject):  # a bare pickled model (torch.save(model))
        return _from_upstream({"model": obj}, path)
    raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (top level is {type(obj).__name__})")


# ----------------------------------------------------------------------------------------------------------------
# writing


def _half_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in sd.items()}


def _model_state(obj: Any) -> dict[str, torch.Tensor] | None:
    """A model, an EMA holder (``.ema`` module) or a state dict -> a half-precision state dict."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return _half_state_dict(obj)
    if isinstance(obj, nn.Module):
        return _half_state_dict(unwrap_model(obj).state_dict())
    inner = getattr(obj, "ema", None)
    if isinstance(inner, nn.Module):
        return _half_state_dict(unwrap_model(inner).state_dict())
    raise TypeError(f"cannot take a state dict from {type(obj).__name__}")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
) -> Path:
    """Write our format (see the module docstring) atomically. ``ema`` may be a model, an object with ``.ema``
    (and ``.updates``) or a state dict; ``optimizer`` an optimizer or its state dict; ``config`` a DictConfig or
    dict (stored as a plain dict)."""
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
        state_dict=_model_state(net),
        ema_state_dict=_model_state(ema),
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
# transfer into a model


def transfer_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    exclude: Iterable[str] = (),
    source: str | os.PathLike | None = None,
) -> tuple[int, int]:
    """Copy every tensor of ``state_dict`` whose name and shape match the model's (names containing any of the
    ``exclude`` substrings are skipped). Returns ``(transferred, total items in the model's state dict)``."""
    exclude = tuple(exclude)
    own = model.state_dict()
    matched = {
        k: v
        for k, v in state_dict.items()
        if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)
    }
    model.load_state_dict(matched, strict=False)
    n, total = len(matched), len(own)
    LOGGER.info(f"Transferred {n}/{total} items from {source if source is not None else 'state dict'}")
    return n, total


def load_model(
    weights: str | os.PathLike,
    model_cfg: Any = None,
    nc: int | None = None,
    fuse: bool = False,
    exclude: Iterable[str] | None = None,
):
    """Build a model and fill it from ``weights``. Returns ``(model, checkpoint)``, the model float32 in eval mode.

    The architecture is ``model_cfg`` when given (dict / DictConfig / path / zoo name), else the checkpoint's own.
    ``nc`` overrides the number of classes (the checkpoint's, or ``model_cfg``'s); class names are taken from the
    checkpoint when the numbers of classes agree. ``exclude`` defaults, as upstream's training does, to
    ``('anchor',)`` when ``model_cfg`` is given (the config's anchors win) and to nothing otherwise.
    """
    from yolo.models.yolo import DetectionModel

    ckpt = load_checkpoint(weights)
    if model_cfg is not None:
        model = DetectionModel(model_cfg, nc=nc)
    else:
        model = DetectionModel(copy.deepcopy(ckpt.model_yaml), nc=nc)
    if exclude is None:
        exclude = ("anchor",) if model_cfg is not None else ()
    transfer_weights(model, ckpt.state_dict, exclude=exclude, source=weights)
    if model.nc == len(ckpt.names):
        model.names = list(ckpt.names)
    if model_cfg is None and isinstance(ckpt.extra.get("yaml_file"), str):
        model.yaml_file = ckpt.extra["yaml_file"]
    model = model.float().eval()
    if fuse:
        model.fuse()
    return model, ckpt
