"""Hostile checkpoints: tiny hand-made torch archives that declare huge storages, views past or around their storage,
or allocating calls; and stored model configs that are not upstream's layout. Each is one CheckpointError line
naming the file, found fast and without allocating what the file asks for."""

from __future__ import annotations

import collections
import io
import pickle
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from yolo.checkpoint import FORMAT_NAME, CheckpointError, load_checkpoint, load_model
from yolo.models import build_model

MIB = 1 << 20


class Storage:
    """Stands for one storage of the archive: pickled as torch's persistent record."""

    def __init__(self, key: str, numel: int, kind=torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class View:
    """Pickled as torch pickles a tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: Storage, offset: int, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", obj.kind, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None


def write_archive(path: Path, obj, storages: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    assert path.stat().st_size < 2048  # a tiny file...
    return path


def native(state_dict, model_yaml=None) -> dict:
    """A dict in our format around ``state_dict``."""
    return {"format": FORMAT_NAME, "version": 1, "state_dict": state_dict, "names": ["a"], "stride": [8.0],
            "model_yaml": model_yaml if model_yaml is not None else {"nc": 1}}


def refused(path: Path, *needles: str) -> str:
    """...is refused in one line naming it, quickly, allocating little."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5
    assert peak < 16 * MIB, f"{peak / MIB:.0f} MiB allocated"
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_storage_larger_than_the_file(tmp_path):
    storage = Storage("0", 64 * MIB)  # 256 MB declared, 16 bytes stored
    path = write_archive(tmp_path / "huge.pt", native({"w": View(storage, 0, (4,), (1,))}), {"0": bytes(16)})
    refused(path, "storage 0 declares 268435456 bytes but the file holds 16")


def test_stride0_view_of_a_huge_shape(tmp_path):
    storage = Storage("0", 4)
    view = View(storage, 0, (1 << 13, 1 << 13), (0, 0))  # 256 MB once materialised, from 16 bytes
    path = write_archive(tmp_path / "stride0.pt", native({"w": view}), {"0": bytes(16)})
    refused(path, "stride-0 or overlapping view")


def test_small_stride0_view_is_not_materialised_as_a_weight(tmp_path):
    view = View(Storage("0", 4), 0, (1000,), (0,))  # within the reader's bound, but a weight is never a view
    path = write_archive(tmp_path / "stride0_small.pt", native({"model.0.w": view}), {"0": bytes(16)})
    refused(path, "'model.0.w' is a stride-0 or overlapping view")


@pytest.mark.parametrize("offset,size,stride,needle", [
    (0, (10,), (1,), "reaches past its storage"),
    (3, (2,), (1,), "reaches past its storage"),
    (0, (2, 2), (-1, 1), "negative or non-integer"),
    (0, (-2,), (1,), "negative or non-integer"),
])
def test_views_outside_their_storage(tmp_path, offset, size, stride, needle):
    path = write_archive(tmp_path / "view.pt", native({"w": View(Storage("0", 4), offset, size, stride)}),
                         {"0": bytes(16)})
    refused(path, needle)


def test_bytearray_and_other_allocating_calls(tmp_path):
    big = (1 << 28).to_bytes(4, "little")  # BININT 268435456: bytearray(256 MB) on a reader that allows it
    path = tmp_path / "bytearray.pt"  # {"model": bytearray(268435456)}, hand-written protocol 2
    path.write_bytes(b"\x80\x02}X\x05\x00\x00\x00modelc__builtin__\nbytearray\nJ" + big + b"\x85Rs.")
    refused(path, "forbidden global", "bytearray")
    # an allowed constructor fed a (huge, stride-0) tensor would iterate it element by element
    view = View(Storage("0", 4), 0, (1 << 12,), (0,))

    class SetOfView:
        def __reduce__(self):
            return set, (view,)

    zipped = write_archive(tmp_path / "set_of_view.pt", {"model": SetOfView()}, {"0": bytes(16)})
    refused(zipped, "set called with")


def test_storage_member_compressed_or_missing(tmp_path):
    path = write_archive(tmp_path / "missing.pt", native({"w": View(Storage("7", 4), 0, (4,), (1,))}), {})
    refused(path, "no member 'archive/data/7'")
    deflated = tmp_path / "deflated.pt"
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(native({"w": View(Storage("0", 4), 0, (4,), (1,))}))
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", bytes(16))
    refused(deflated, "compressed")


def test_well_formed_tiny_archive_reads(tmp_path):
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    path = write_archive(tmp_path / "ok.pt", native({"w": View(Storage("0", 4), 1, (3,), (1,))}), {"0": data})
    ck = load_checkpoint(path)
    assert torch.equal(ck.state_dict["w"], torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------------------------------------------------------
# stored model configs


def _save_native(path: Path, model_yaml) -> Path:
    model = build_model("yolov5n", nc=2)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(native(sd, model_yaml), path)
    return path


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(nc="eighty"), "nc: expected a number of classes"),
    (lambda d: d.update(width_multiple=[1]), "width_multiple: expected a number"),
    (lambda d: d.update(backbone="layers"), "backbone: expected a list of layers"),
    (lambda d: d["head"].append([-1, 1, "Conv"]), "expected [from, number, module, args]"),
    (lambda d: d["head"].append([99, 1, "Conv", [8]]), "does not name earlier layers"),
    (lambda d: d.update(evil="x"), "evil: unknown key"),
    (lambda d: d.pop("nc"), "nc: missing"),
])
def test_malformed_stored_model_config_is_a_checkpoint_error(tmp_path, edit, needle):
    d = build_model("yolov5n", nc=2).yaml
    edit(d)
    path = _save_native(tmp_path / "odd_yaml.pt", d)
    msg = refused(path, "malformed stored model config", needle)
    assert "Traceback" not in msg


@pytest.mark.parametrize("drop", ["backbone", "anchors"])
def test_incomplete_stored_model_config_fails_when_built(tmp_path, drop):
    d = build_model("yolov5n", nc=2).yaml
    d.pop(drop)
    path = _save_native(tmp_path / "incomplete.pt", d)
    with pytest.raises(CheckpointError, match=f"{drop}: missing"):
        load_model(path)


def test_stored_model_config_naming_a_file_is_refused(tmp_path):
    path = _save_native(tmp_path / "path_yaml.pt", "yolov5s")  # would make us read a file it names
    refused(path, "expected a dict, got str")
