"""Structured config schema, registered in Hydra's ConfigStore.

Every entrypoint's primary YAML (``conf/val.yaml``, ``conf/train.yaml``, ...) lists its schema first in its
defaults list, so Hydra validates the composed config before any code runs: a mistyped key
(``hyp.lr00=0.1``) or a value of the wrong type fails at once with a message naming the key.

``data`` is a config group (``conf/data/*.yaml``, upstream's dataset format: ``data=coco128``).  A user's own
dataset YAML works without copying it into ``conf/``: ``data=path/to/custom.yaml`` is rewritten by the
entrypoints (:func:`yolo.group_files.rewrite_path_overrides`) to ``data=external data.file=path/to/custom.yaml``.
``hyp=path/to/hyp.yaml`` and ``model=path/to/model.yaml`` are read and checked against :class:`HypConfig` and
:class:`ModelConfig` there, and become options of their group (:mod:`yolo.group_files`); the values land in
``hyp`` / ``model`` and the file's path in ``hyp_file`` / ``model_file``.

Hydra checks keys and types while composing; what a value may be (``epochs >= 1``, a probability in [0, 1], one
of a few words, a device this machine has) is declared on the schema's fields too (:func:`num`, :func:`choice`,
:func:`checked`) and checked by :func:`check_train_config` / :func:`check_val_config` / :func:`check_predict_config`
before any data is read.
They also refuse keys the schema does not know: Hydra lets ``+hyp.lr00=1`` add one to a structured config.
Each failure is a :class:`~yolo.errors.ConfigError` whose message starts with the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import typing
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from yolo.errors import ConfigError

DATASETS_DIR = "${oc.env:DATASETS_DIR,datasets}"
CACHE_VALUES = ("auto", "ram", "disk", "none", "false")


# ---- what a value may be: rules attached to schema fields ------------------------------------------------------
Rule = Callable[[str, Any], None]  # (key, value) -> None, or raise ConfigError naming the key


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _number_rule(ge=None, gt=None, le=None, lt=None) -> Rule:
    bounds = [(op, b) for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
    lo, hi = [(op, b) for op, b in bounds if op[0] == ">"], [(op, b) for op, b in bounds if op[0] == "<"]
    if lo and hi:  # an interval: [0, 1], [0, 1), (0, 1]
        (lo_op, a), (hi_op, b) = lo[0], hi[0]
        wanted = f"in {'[' if lo_op == '>=' else '('}{a}, {b}{']' if hi_op == '<=' else ')'}"
    else:
        wanted = " and ".join(f"{op} {b}" for op, b in bounds)

    def rule(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if not all(_COMPARE[op](value, b) for op, b in bounds):
            raise ConfigError(f"{key}: must be {wanted}, got {value}")
    return rule


def checked(rule: Rule, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A schema field whose value (when not null) must pass ``rule``."""
    return field(default=default, metadata={"rule": rule}, **kwargs)


def num(default: Any, *, ge=None, gt=None, le=None, lt=None) -> Any:
    """A finite number within the bounds given (``gt=0``: positive; ``ge=0, le=1``: a probability)."""
    return checked(_number_rule(ge, gt, le, lt), default)


def choice(default: Any, *options: str) -> Any:
    """A word among ``options`` (case-insensitive)."""
    def rule(key: str, value: Any) -> None:
        if str(value).lower() not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {value!r}")
    return checked(rule, default)


def device_rule(key: str, value: Any) -> None:
    """A device this machine has (``auto``, ``cpu``, ``cuda:N``, ``0,1``...)."""
    from yolo.device import check_device  # deferred: torch; light modules import this schema without it

    check_device(value, key)


def source_rule(key: str, value: Any) -> None:
    """Paths that name at least one image or video each (files, folders, globs, ``.txt`` lists, videos that
    open): checked before a run folder is made."""
    from yolo.sources import resolve_sources  # deferred: OpenCV; light modules import this schema without it

    resolve_sources(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def file_rule(key: str, value: Any) -> None:
    """The path of an existing file."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be the path of a file, got {value!r}")
    if not os.path.isfile(os.path.expanduser(value)):
        raise ConfigError(f"{key}: {value}: no such file")


def classes_rule(key: str, value: Any) -> None:
    """A class index >= 0 or a list of them (``classes=0``, ``classes=[0,2]``)."""
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConfigError(f"{key}: must be a class index >= 0 or a list of them, e.g. [0,2], got {value!r}")


def each(rule: Rule) -> Rule:
    """``rule`` for every item of a list (keys ``key[0]``, ``key[1]``...)."""
    def rule_each(key: str, values: Any) -> None:
        for i, v in enumerate(values):
            rule(f"{key}[{i}]", v)
    return rule_each



@dataclass
class ModelConfig:
    """An architecture in upstream's YAML layout (``conf/model/*.yaml``)."""

    nc: int = num(80, ge=1)
    depth_multiple: float = num(1.0, gt=0)
    width_multiple: float = num(1.0, gt=0)
    anchors: Any = 3
    backbone: List[Any] = field(default_factory=list)
    head: List[Any] = field(default_factory=list)
    activation: Optional[str] = None
    ch: int = num(3, ge=1)


@dataclass
class DataSpec:
    """A dataset in upstream's YAML format (``conf/data/*.yaml``), or ``file`` pointing at one."""

    path: Optional[str] = None
    train: Any = None
    val: Any = None
    test: Any = None
    names: Any = None
    nc: Optional[int] = num(None, ge=1)
    download: Optional[str] = None
    file: Optional[str] = None  # a dataset YAML outside conf/ (wins over the fields above)


def data_source(data: Any) -> Any:
    """What :func:`yolo.data.config.load_data_config` takes: the external YAML path, or the mapping itself."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(data, (str, bytes)):
        return data
    d = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    file = d.pop("file", None)
    return file if file else {k: v for k, v in d.items() if v is not None}


@dataclass
class ValConfig:
    """``python -m yolo.val``: score a checkpoint on a dataset split."""

    weights: str = MISSING
    data: DataSpec = field(default_factory=DataSpec)
    datasets_dir: str = DATASETS_DIR
    split: str = choice("val", "train", "val", "test")
    model: Optional[ModelConfig] = None
    model_file: Optional[str] = None  # set by model=path/to/model.yaml: the file `model` was read from
    nc: Optional[int] = num(None, ge=1)
    imgsz: int = num(640, ge=32)
    batch_size: int = num(32, ge=1)
    conf_thres: float = num(0.001, ge=0, le=1)
    iou_thres: float = num(0.6, ge=0, le=1)
    max_det: int = num(300, ge=1)
    device: str = checked(device_rule, "auto")
    workers: int = num(2, ge=0)
    single_cls: bool = False
    half: bool = False
    # mixed precision for the forward pass; off by default: exact parity with upstream's fp32 figures
    amp: str = choice("off", "auto", "off", "bf16", "fp16", "true", "false")
    fuse: bool = True
    verbose: bool = False
    plots: bool = True
    save_json: bool = False


@dataclass
class ExportConfig:
    """``python -m yolo.export``: a checkpoint as an ONNX or TorchScript file, checked against PyTorch."""

    weights: str = MISSING
    format: str = choice("onnx", "onnx", "torchscript")
    imgsz: int = num(640, ge=32)  # square input; a non-multiple of the model's stride is rounded up with a warning
    batch_size: int = num(1, ge=1)  # the fixed batch of a static export (and of the check's input)
    dynamic: bool = False  # batch, height and width dynamic
    opset: int = num(17, ge=11, le=20)  # ONNX opset (the TorchScript-based exporter's range)
    half: bool = False  # fp16 weights and input: needs a CUDA device, as upstream
    device: str = checked(device_rule, "cpu")
    output: Optional[str] = None  # default: beside the weights (best.onnx), or the run folder if not writable


@dataclass
class PredictConfig:
    """``python -m yolo.predict``: detections on images, folders, globs, lists and videos (upstream's detect.py)."""

    weights: str = checked(file_rule, MISSING)
    source: Any = checked(source_rule, MISSING)  # a path, folder, glob, .txt list or video, or a list of these
    imgsz: int = num(640, ge=32)  # long side; a non-multiple of the model's stride is rounded up with a warning
    conf_thres: float = num(0.25, ge=0, le=1)
    iou_thres: float = num(0.45, ge=0, le=1)
    max_det: int = num(1000, ge=1)
    classes: Any = checked(classes_rule, None)  # keep only these classes: 0 or [0,2]; null keeps all
    agnostic_nms: bool = False
    batch_size: int = num(1, ge=1)  # images of the same letterboxed shape per forward pass
    device: str = checked(device_rule, "auto")
    amp: str = choice("off", "auto", "off", "bf16", "fp16", "true", "false")  # as val's; off: fp32
    save_img: bool = True  # annotated images, and an annotated .mp4 per video
    save_txt: bool = False  # labels/<stem>.txt: class cx cy w h, normalised (upstream's format)
    save_conf: bool = False  # with save_txt: the confidence as a sixth column
    line_thickness: int = num(3, ge=1)
    hide_labels: bool = False
    hide_conf: bool = False


@dataclass
class HypConfig:
    """Training hyperparameters, upstream's keys and meanings (``conf/hyp/*.yaml``).

    What each may be: upstream's evolution table (``conf/evolve_space/default.yaml``) puts every key's lower limit
    at 0 or above, so every value is finite and non-negative; learning rates are positive, probabilities and
    fractions of the image or colour range lie in [0, 1], and momentum (SGD momentum or Adam beta1) and the scale
    gain lie in [0, 1). ``tests/test_config.py`` checks that the evolution table stays inside these domains.
    """

    lr0: float = num(0.01, gt=0)
    lrf: float = num(0.01, gt=0)
    momentum: float = num(0.937, ge=0, lt=1)
    weight_decay: float = num(0.0005, ge=0)
    warmup_epochs: float = num(3.0, ge=0)
    warmup_momentum: float = num(0.8, ge=0, lt=1)
    warmup_bias_lr: float = num(0.1, ge=0)
    box: float = num(0.05, ge=0)
    cls: float = num(0.5, ge=0)
    cls_pw: float = num(1.0, ge=0)
    obj: float = num(1.0, ge=0)
    obj_pw: float = num(1.0, ge=0)
    iou_t: float = num(0.20, ge=0, le=1)
    anchor_t: float = num(4.0, ge=0)
    fl_gamma: float = num(0.0, ge=0)
    hsv_h: float = num(0.015, ge=0, le=1)
    hsv_s: float = num(0.7, ge=0, le=1)
    hsv_v: float = num(0.4, ge=0, le=1)
    degrees: float = num(0.0, ge=0)
    translate: float = num(0.1, ge=0, le=1)
    scale: float = num(0.5, ge=0, lt=1)
    shear: float = num(0.0, ge=0)
    perspective: float = num(0.0, ge=0, le=1)
    flipud: float = num(0.0, ge=0, le=1)
    fliplr: float = num(0.5, ge=0, le=1)
    mosaic: float = num(1.0, ge=0, le=1)
    mixup: float = num(0.0, ge=0, le=1)
    copy_paste: float = num(0.0, ge=0, le=1)
    anchors: Optional[float] = num(None, ge=0)


HYP_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HypConfig))  # upstream's order (evolve.csv)


@dataclass
class OptimizerConfig:
    """``conf/optimizer``: SGD (Nesterov), Adam or AdamW; ``hyp.momentum`` is SGD momentum or Adam beta1."""

    name: str = "SGD"
    nesterov: bool = True


@dataclass
class MlflowConfig:
    """Experiment tracking; ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = "yolo"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None
    timeout_s: float = num(5.0, gt=0)
    log_weights: bool = True  # upload best.pt as an artifact (evolution turns this off: one per generation)
    log_model: bool = True  # best.pt as an MLflow pyfunc model (artifact folder "model"; yolo.tracking.pyfunc)
    register_model: Optional[str] = None  # NAME: register that model as a new version of NAME (logs it too)


@dataclass
class TrainConfig:
    """``run_train.py``: one training run."""

    model: Optional[ModelConfig] = None
    hyp: HypConfig = field(default_factory=HypConfig)
    model_file: Optional[str] = None  # set by model=path/to/model.yaml: the file `model` was read from
    hyp_file: Optional[str] = None  # set by hyp=path/to/hyp.yaml: the file `hyp` was read from
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataSpec = field(default_factory=DataSpec)
    datasets_dir: str = DATASETS_DIR
    weights: Optional[str] = None
    epochs: int = num(100, ge=1)
    # train only up to this epoch of the `epochs` schedule, then validate, save a resumable last.pt and stop;
    # resume=last.pt (with a later stop_epoch, or none) continues the same schedule (evolution's asha fidelity)
    stop_epoch: Optional[int] = num(None, ge=1)
    batch_size: int = num(16, ge=1)
    imgsz: int = num(640, ge=32)  # a non-multiple of the model's stride is rounded up with a warning
    device: str = checked(device_rule, "auto")
    workers: int = num(8, ge=0)
    seed: int = 0
    deterministic: bool = True
    resume: Any = False  # false, true (latest run) or a path to last.pt
    # auto: ram when the resized images fit a small share of the memory (yolo.data.dataset.AUTO_CACHE_*), else none
    cache: Optional[str] = choice("auto", *CACHE_VALUES)  # auto | ram | disk | none (false, null: no cache)
    rect: bool = False
    multi_scale: bool = False
    single_cls: bool = False
    freeze: List[int] = field(default_factory=list)  # [10] freezes layers 0-9; [0, 1, 2] freezes those layers
    image_weights: bool = False
    sync_bn: bool = False  # DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    label_smoothing: float = num(0.0, ge=0, lt=1)
    cos_lr: bool = False
    patience: int = num(100, ge=0)  # 0: never stop early
    save_period: int = -1
    noval: bool = False
    nosave: bool = False
    noautoanchor: bool = False
    noplots: bool = False
    amp: str = choice("auto", "auto", "off", "bf16", "fp16", "true", "false")  # mixed precision (true: auto)
    conf_thres: float = num(0.001, ge=0, le=1)
    iou_thres: float = num(0.6, ge=0, le=1)
    max_det: int = num(300, ge=1)
    project: str = "runs/train"  # where run folders go (Hydra's run dir is built from it)
    name: str = "exp"
    exist_ok: bool = False  # train into a folder that already holds a run (upstream's --exist-ok)


# ---- checks run by the entrypoints and train()/val before anything is loaded -------------------------------------
def _nested_schema(tp: Any) -> type | None:
    """The dataclass behind a field's type (``ModelConfig``, ``Optional[ModelConfig]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


def _as_config(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.create(dict(cfg)) if isinstance(cfg, Mapping) else OmegaConf.structured(cfg)


def check_config(cfg: Any, schema: type, prefix: str = "") -> None:
    """Check ``cfg`` against the dataclass ``schema``: no key it does not declare (Hydra's ``+key=value`` adds
    any), no mandatory key left ``???``, every value passing its field's rule. Raises :class:`ConfigError`."""
    cfg = _as_config(cfg)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    present = list(cfg.keys())  # `name in cfg` is False for a ??? value
    for key in present:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: not a setting of {schema.__name__}{hint}")
    hints = typing.get_type_hints(schema)
    for name, f in fields.items():
        key = prefix + name
        if name not in present:
            continue  # a config built without this key gets the schema's default when merged
        if OmegaConf.is_missing(cfg, name):
            raise ConfigError(f"{key}: required: give {key}=...")
        nested, rule = _nested_schema(hints[name]), f.metadata.get("rule")
        if nested is None and rule is None:
            continue
        value = cfg[name]
        if value is None:
            continue
        if nested is not None:
            check_config(value, nested, prefix=f"{key}.")
        else:
            rule(key, value)


def model_layers(model: Any) -> int | None:
    """How many layers an architecture in upstream's YAML layout has (its backbone and head rows), or None."""
    if model is None or "backbone" not in model or "head" not in model:
        return None
    return len(model["backbone"]) + len(model["head"]) or None


def _check_freeze(freeze: Any, model: Any) -> None:
    values = list(freeze or [])
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConfigError(f"freeze: must be layer indices >= 0, got {values}")
    n = model_layers(model)
    if n is None or not values:
        return  # the architecture comes from weights=: not known before the checkpoint is read
    if len(values) == 1 and values[0] > n:
        raise ConfigError(f"freeze: [{values[0]}] freezes the first {values[0]} layers but the model has {n}")
    beyond = [v for v in values if v >= n] if len(values) > 1 else []
    if beyond:
        raise ConfigError(f"freeze: layers {beyond} do not exist: the model has {n} (0-{n - 1})")


def _check_data(data: Any) -> None:
    """A dataset is named: a ``data.file`` (``data=path/to/custom.yaml``) or a mapping with its splits."""
    if isinstance(data, (str, bytes)) or data is None:
        return
    if not data.get("file") and not data.get("train") and not data.get("val"):
        raise ConfigError("data: required: choose data=coco128|shapes (conf/data) or data=path/to/custom.yaml")


def check_train_config(cfg: Any, schema: type | None = None) -> None:
    """Everything a training can check before reading data: the schema's keys and rules, a dataset and a model
    named, ``freeze`` within that model. ``cache=none|false`` becomes null here. Raises :class:`ConfigError`."""
    conf = _as_config(cfg)
    check_config(conf, schema or TrainConfig)
    _check_data(conf.get("data"))
    if conf.get("model") is None and not conf.get("weights") and not conf.get("resume"):
        raise ConfigError("model: required: choose model=yolov5n|s|m|l|x or give weights=path/to/checkpoint.pt")
    _check_freeze(conf.get("freeze"), conf.get("model"))
    if isinstance(conf.get("cache"), str) and conf.cache.lower() in ("none", "false"):
        conf.cache = None
        if isinstance(cfg, MutableMapping) and conf is not cfg:
            cfg["cache"] = None


def check_val_config(cfg: Any) -> None:
    """What ``python -m yolo.val`` can check before loading weights or data. Raises :class:`ConfigError`."""
    conf = _as_config(cfg)
    check_config(conf, ValConfig)
    _check_data(conf.get("data"))


def check_export_config(cfg: Any) -> None:
    """What ``python -m yolo.export`` can check before loading weights. Raises :class:`ConfigError`."""
    conf = _as_config(cfg)
    check_config(conf, ExportConfig)
    weights = conf.get("weights")
    if isinstance(weights, str) and weights.lower().endswith((".onnx", ".torchscript")):
        raise ConfigError(f"weights: export takes a PyTorch checkpoint (.pt), got {weights}")


def check_predict_config(cfg: Any) -> None:
    """What ``python -m yolo.predict`` can check before loading weights or reading images: the settings, the
    weights file, that every ``source`` entry names images or videos, and ``amp`` on that device. Raises a
    one-line user error."""
    conf = _as_config(cfg)
    check_config(conf, PredictConfig)
    if "amp" in conf and "device" in conf:  # amp=fp16 on a CPU, bf16 on a GPU without it: refused here, not later
        from yolo.device import select_device  # deferred: torch; light modules import this schema without it
        from yolo.engine.precision import choose  # deferred: torch

        choose(conf.amp, select_device(conf.device))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="export_schema", node=ExportConfig)


    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="val_schema", node=ValConfig)
    cs.store(name="train_schema", node=TrainConfig)


register_configs()
