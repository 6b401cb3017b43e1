"""Reading a PyTorch ``.pt`` file without running its code and without letting it choose what we allocate.

A torch file is a zip archive: ``<archive>/data.pkl`` (the pickle) and one member ``<archive>/data/<key>`` per
storage, the raw bytes of its elements. :func:`read_torch_file` reads it with a pickle unpickler of its own:

- Every global in the pickle resolves through an allowlist: torch's tensor rebuild functions (replaced by checked
  versions), storage types, dtypes, ``torch.Size``/``torch.device``, ``collections.OrderedDict``, ``set``,
  ``frozenset``, numeric numpy scalars and dtypes, and ``_codecs.encode`` as a latin-1 encoder. ``models.*``
  (upstream's classes) and ``torch.nn.modules.*`` become inert :class:`PickledObject` placeholders that only
  store their attributes. Anything else, ``bytearray`` and every other allocating callable included, is refused.
  Allowed constructors accept only what the pickle has already built (lists, tuples, dicts), never a tensor.
- A storage is read from its zip member, which must be stored uncompressed inside the file and hold at least
  the bytes the pickle declares (``numel * itemsize``): a storage larger than the file can hold is refused.
- A tensor is a view of a storage: size, stride and offset must be non-negative integers that stay inside the
  storage, and the bytes of all views together may not exceed twice the file's size plus 16 MiB, so a stride-0
  view of a huge shape is refused before anything is materialised.

A file that is not a zip archive is read as a plain pickle holding no tensors (torch's pre-1.6 format is refused).
Every failure is a :class:`~yolo.errors.CheckpointError` naming the file, in one line.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yolo.errors import CheckpointError

VIEW_SLACK_BYTES = 16 << 20  # views may span at most 2 x the file's size plus this (expanded anchor grids etc.)
MAX_NDIM = 16
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of torch's pre-1.6 (non-zip) format
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_NUMPY_KINDS = set("biufc")  # bool, signed, unsigned, float, complex: fixed-size numbers only


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


class Refused(pickle.UnpicklingError):
    """The pickle asks for something this reader does not allow (a global, a call, a storage, a view)."""


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """One storage of the archive: its elements as a flat tensor."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _built(value: Any, what: str) -> Any:
    """Arguments of allowed constructors: containers the pickle built already, nothing that expands."""
    if not isinstance(value, (list, tuple, dict)):
        raise Refused(f"{what} called with {type(value).__name__} (only lists, tuples and dicts are accepted)")
    return value


def _container(kind: type) -> Any:
    def make(*args: Any) -> Any:
        if len(args) > 1:
            raise Refused(f"{kind.__name__} called with {len(args)} arguments")
        return kind(_built(args[0], kind.__name__)) if args else kind()

    return make


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in {"latin1", "iso88591"}:
        raise Refused("unexpected _codecs.encode call in the pickle")
    return codecs.encode(text, "latin1")


def _torch_size(*args: Any) -> torch.Size:
    dims = _built(args[0], "torch.Size") if args else ()
    if len(args) > 1 or len(dims) > MAX_NDIM or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise Refused("torch.Size with odd dimensions")
    return torch.Size(dims)


def _numpy_dtype(spec: Any, *args: Any) -> np.dtype:
    if not isinstance(spec, str) or len(spec) > 8:
        raise Refused(f"numpy.dtype({spec!r})")
    dtype = np.dtype(spec)
    if dtype.kind not in _NUMPY_KINDS or dtype.itemsize > 16:
        raise Refused(f"numpy dtype {spec!r} (only fixed-size numbers are allowed)")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMPY_KINDS and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise Refused("numpy scalar that is not a fixed-size number")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype_class(name: str) -> Any:
    cls = getattr(np.dtypes, name, None) if hasattr(np, "dtypes") else None
    if not isinstance(cls, type):
        return None
    try:
        kind = np.dtype(cls).kind
    except TypeError:
        return None
    return cls if kind in _NUMPY_KINDS else None


_BUILTINS = {"set": _container(set), "frozenset": _container(frozenset), "dict": _container(dict),
             "list": _container(list), "tuple": _container(tuple)}


class _Unpickler(pickle.Unpickler):
    """Resolves globals through the allowlist and storages through the archive (see the module docstring)."""

    def __init__(self, data: bytes, archive: _Archive | None):
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed(module, name)
        if obj is None:
            raise Refused(f"forbidden global '{module}.{name}' in the pickle")
        return obj

    def _allowed(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles spell builtins this way
        if module == "builtins":
            return _BUILTINS.get(name)
        if (module, name) == ("collections", "OrderedDict"):
            return _container(collections.OrderedDict)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch":
            return self._torch_global(name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return _numpy_dtype
        if module == "numpy.dtypes" and name.endswith("DType"):
            return _numpy_dtype_class(name)
        if name.isidentifier() and (module == "models" or module.startswith(("models.", "torch.nn.modules."))):
            return _placeholder(module, name)
        return None

    @staticmethod
    def _torch_global(name: str) -> Any:
        if name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name == "Size":
            return _torch_size
        if name == "device":
            return torch.device
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) else None

    def persistent_load(self, pid: Any) -> _Storage:
        if self.archive is None:
            raise Refused("tensor data outside a zip archive (torch's pre-1.6 format is not supported)")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Refused("unknown persistent record in the pickle")
        _, storage_type, key, _location, numel = pid
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _KEY.match(key):
            raise Refused("malformed storage record in the pickle")
        if not isinstance(numel, int) or numel < 0:
            raise Refused(f"storage {key}: odd element count {numel!r}")
        return self.archive.storage(key, storage_type.dtype, numel)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
        if not isinstance(storage, _Storage):
            raise Refused("tensor rebuilt from something that is not a storage of this file")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
            raise Refused("tensor with malformed size or stride")
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride) or len(size) > MAX_NDIM:
            raise Refused("tensor with malformed size or stride")
        if not all(isinstance(x, int) and x >= 0 for x in (offset, *size, *stride)):
            raise Refused(f"tensor view with a negative or non-integer size/stride/offset ({size}, {stride})")
        flat = storage.flat
        numel = math.prod(size)
        if numel == 0:
            return flat.new_empty(size)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if end >= flat.numel():
            raise Refused(f"tensor view {list(size)} (stride {list(stride)}, offset {offset}) reaches past its "
                          f"storage of {flat.numel()} elements")
        self.archive.spend(numel * flat.element_size(), size, stride)
        return flat.as_strided(size, stride, offset)


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise Refused("parameter rebuilt from something that is not a tensor")
    return data  # the tensor is what we read; being a Parameter matters only to a live model


class _Archive:
    """The storages of one torch zip file, each read once and checked against its member's real size."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, file_size: int):
        self.zf, self.prefix, self.file_size = zf, prefix, file_size
        self.budget = 2 * file_size + VIEW_SLACK_BYTES
        self.storages: dict[str, _Storage] = {}

    def member(self, name: str) -> zipfile.ZipInfo:
        try:
            info = self.zf.getinfo(self.prefix + name)
        except KeyError:
            raise Refused(f"the archive has no member '{self.prefix + name}'") from None
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise Refused(f"member '{info.filename}' is compressed (torch stores its records uncompressed)")
        if info.file_size > self.file_size:
            raise Refused(f"member '{info.filename}' claims {info.file_size} bytes, more than the file holds")
        return info

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        declared = numel * torch.empty(0, dtype=dtype).element_size()
        cached = self.storages.get(key)
        if cached is not None:
            if cached.flat.dtype != dtype or cached.flat.numel() < numel:
                raise Refused(f"storage {key} is declared twice with different types or sizes")
            return cached
        info = self.member(f"data/{key}")
        if declared > info.file_size:
            raise Refused(f"storage {key} declares {declared} bytes but the file holds {info.file_size}")
        raw = bytearray(declared)  # at most the member's real size, itself at most the file's (checked above)
        with self.zf.open(info) as fh:
            if fh.readinto(raw) != declared:
                raise Refused(f"storage {key} is shorter than declared")
        flat = torch.frombuffer(raw, dtype=dtype) if declared else torch.empty(0, dtype=dtype)
        self.storages[key] = _Storage(flat)
        return self.storages[key]

    def spend(self, nbytes: int, size: tuple, stride: tuple) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise Refused(f"tensor view {list(size)} (stride {list(stride)}) spans more bytes than a file of "
                          f"{self.file_size} bytes can hold (a stride-0 or overlapping view)")


def _open_archive(path: Path, file_size: int) -> tuple[zipfile.ZipFile, str]:
    zf = zipfile.ZipFile(path)
    pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        zf.close()
        raise Refused(f"expected one data.pkl in the archive, found {len(pickles)}")
    return zf, pickles[0][: -len("data.pkl")]


def _unpickle(path: Path, file_size: int) -> Any:
    if zipfile.is_zipfile(path):
        zf, prefix = _open_archive(path, file_size)
        with zf:
            archive = _Archive(zf, prefix, file_size)
            data = zf.read(archive.member("data.pkl"))
            return _Unpickler(data, archive).load()
    obj = _Unpickler(path.read_bytes(), None).load()
    if isinstance(obj, int) and obj == _LEGACY_MAGIC:
        raise Refused("torch's pre-1.6 file format is not supported (re-save it with a newer torch)")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _what_it_is(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        return "truncated or corrupt checkpoint archive"
    if head[:1] == b"\x80":
        return "truncated or corrupt pickle"
    return "not a PyTorch checkpoint"


def read_torch_file(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file (or a plain pickle) holds, read as the module docstring describes.

    Raises :class:`~yolo.errors.CheckpointError` (one line, naming ``path``) for a missing, empty, corrupt,
    oversized or hostile file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        return _unpickle(path, size)
    except Refused as e:
        raise CheckpointError(f"{path}: refusing to load: {e} (a corrupt or hostile file; only tensors, "
                              f"containers and model classes are allowed)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: refusing to load: the pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError(f"{path}: refusing to load: out of memory while reading") from None
    except Exception as e:  # zip/pickle/EOF/OS errors all mean the same thing to the caller
        raise CheckpointError(f"{path}: {_what_it_is(path)} ({_first_line(e)})") from None
