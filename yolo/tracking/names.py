"""Run names that tell runs apart (pure functions).

MLflow would name every run itself, with a random adjective-noun-number drawn from Python's global ``random``; the
trainer seeds that generator, so every training run got the same name. Ours say what a run is:

- a training run: ``<model>-<data>-<run folder>`` (``yolov5n-coco128-2024-05-01_12-00-00_exp``);
- a sweep child: the overrides that vary across the sweep, sorted (``hyp.lr0=0.01,model=yolov5s``); the parent run
  (``sweep <folder>``) groups them;
- an evolution child: ``<name>-gen<N>`` (:func:`generation_run_name`, given as ``mlflow.run_name`` by evolution).

An explicit ``mlflow.run_name`` always wins. Names are at most :data:`MAX_NAME_LENGTH` characters; a longer one is
cut and ends with 8 hex digits of its SHA-1, so two names that differ only in their tails still differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from yolo.tracking.hydra_job import HydraJob, override_key, swept_overrides
from yolo.tracking.sanitize import shorten

MAX_NAME_LENGTH = 100
MAX_VALUE_LENGTH = 32  # one override's value inside a sweep child's name
_NO_CHOICE = ("", "null", "None", "external")  # Hydra choices that do not name the config


def _field(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, None)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".yaml", ".yml", ".pt", ".onnx"))


def path_label(value: str) -> str:
    """A file's stem for a path (``data/custom.yaml`` -> ``custom``), the text itself otherwise."""
    value = str(value).strip()
    return (PurePath(value.replace("\\", "/")).stem or value) if _looks_like_path(value) else value


def model_label(choice: str | None, model_cfg: Any, weights: str | None) -> str:
    """What model a run trains: the Hydra choice (``yolov5n``), else the weights' file stem when the architecture
    comes from them, else the architecture's multiples (``yolov5-d0.33-w0.25``)."""
    if choice and choice not in _NO_CHOICE:
        return path_label(choice)
    if _field(model_cfg, "file"):
        return path_label(str(_field(model_cfg, "file")))
    if model_cfg is None:
        return path_label(str(weights)) if weights else "model"
    depth, width = _field(model_cfg, "depth_multiple"), _field(model_cfg, "width_multiple")
    try:
        return f"yolov5-d{float(depth):g}-w{float(width):g}"
    except (TypeError, ValueError):
        return "model"


def data_label(choice: str | None, data: Any) -> str:
    """What data a run trains on: the Hydra choice (``coco128``), else the data YAML's stem, else the dataset
    folder's name."""
    if choice and choice not in _NO_CHOICE:
        return path_label(choice)
    if isinstance(data, (str, os.PathLike)):
        return path_label(os.fspath(data))
    file, path = _field(data, "file"), _field(data, "path")
    if file:
        return path_label(str(file))
    if path:
        return PurePath(str(path).replace("\\", "/")).name or "data"
    return "data"


def training_run_name(model: str, data: str, folder: str) -> str:
    """``<model>-<data>-<run folder>``."""
    return shorten("-".join(p for p in (model, data, folder) if p), MAX_NAME_LENGTH)


def _short_value(value: str) -> str:
    value = value.strip().strip("'\"")
    if _looks_like_path(value) and not value.startswith("["):
        value = PurePath(value.replace("\\", "/")).name or value
    return value if len(value) <= MAX_VALUE_LENGTH else value[: MAX_VALUE_LENGTH - 3] + "..."


def overrides_run_name(overrides: Sequence[str]) -> str:
    """A sweep child's name from its overrides: sorted by key, ``key=value`` joined by commas, each value shortened
    (a path to its file name, a long value to its head), e.g. ``hyp.lr0=0.01,model=yolov5s``."""
    parts = []
    for o in sorted(overrides, key=override_key):
        key, sep, value = o.partition("=")
        parts.append(f"{key}={_short_value(value)}" if sep else key)
    return shorten(",".join(parts), MAX_NAME_LENGTH)


def generation_run_name(name: str, number: int) -> str:
    """An evolution child's name: ``<evolution name>-gen<N>``."""
    return shorten(f"{name}-gen{int(number)}", MAX_NAME_LENGTH)


def _folder_label(save_dir: str | os.PathLike[str], job: HydraJob | None) -> str:
    name = Path(save_dir).name
    if job is not None and job.sweep_dir is not None and name.isdigit():  # Hydra's job subfolder: 0, 1, ...
        return f"{Path(job.sweep_dir).name}-job{name}"
    return name


def run_name_for_training(cfg: Any, save_dir: str | os.PathLike[str], job: HydraJob | None) -> str:
    """The name of a training run of config ``cfg`` writing into ``save_dir``, as Hydra job ``job`` (None outside
    Hydra): ``mlflow.run_name`` if set, a sweep child's varying overrides, else ``<model>-<data>-<run folder>``."""
    explicit = _field(_field(cfg, "mlflow"), "run_name")
    if explicit:
        return str(explicit)
    if job is not None and job.sweep_dir is not None:
        varying = swept_overrides(job.overrides, job.sweep_overrides)
        if varying:
            return overrides_run_name(varying)
    choices = job.choices if job is not None else {}
    model_choice = _field(cfg, "model_file") or choices.get("model")  # model=path.yaml: the file's stem
    model = model_label(model_choice, _field(cfg, "model"), _field(cfg, "weights"))
    data = data_label(choices.get("data"), _field(cfg, "data"))
    return training_run_name(model, data, _folder_label(save_dir, job))
