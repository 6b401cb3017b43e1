"""Structured config schema, registered in Hydra's ConfigStore.

Every entrypoint's primary YAML (``conf/val.yaml``, ``conf/train.yaml``, ...) lists its schema first in its
defaults list, so Hydra validates the composed config before any code runs: a mistyped key
(``hyp.lr00=0.1``) or a value of the wrong type fails at once with a message naming the key.

``data`` is a config group (``conf/data/*.yaml``, upstream's dataset format: ``data=coco128``).  A user's own
dataset YAML works without copying it into ``conf/``: ``data=path/to/custom.yaml`` is rewritten by the
entrypoints (:func:`yolo.cli.rewrite_data_override`) to ``data=external data.file=path/to/custom.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DATASETS_DIR = "${oc.env:DATASETS_DIR,datasets}"


@dataclass
class ModelConfig:
    """An architecture in upstream's YAML layout (``conf/model/*.yaml``)."""

    nc: int = 80
    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    anchors: Any = 3
    backbone: List[Any] = field(default_factory=list)
    head: List[Any] = field(default_factory=list)
    activation: Optional[str] = None
    ch: int = 3


@dataclass
class DataSpec:
    """A dataset in upstream's YAML format (``conf/data/*.yaml``), or ``file`` pointing at one."""

    path: Optional[str] = None
    train: Any = None
    val: Any = None
    test: Any = None
    names: Any = None
    nc: Optional[int] = None
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
    split: str = "val"
    model: Optional[ModelConfig] = None
    nc: Optional[int] = None
    imgsz: int = 640
    batch_size: int = 32
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    device: str = "auto"
    workers: int = 2
    single_cls: bool = False
    half: bool = False
    fuse: bool = True
    verbose: bool = False
    plots: bool = True
    save_json: bool = False


@dataclass
class HypConfig:
    """Training hyperparameters, upstream's keys and meanings (``conf/hyp/*.yaml``)."""

    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    box: float = 0.05
    cls: float = 0.5
    cls_pw: float = 1.0
    obj: float = 1.0
    obj_pw: float = 1.0
    iou_t: float = 0.20
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0
    copy_paste: float = 0.0
    anchors: Optional[float] = None


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
    timeout_s: float = 5.0
    log_weights: bool = True  # upload best.pt as an artifact (evolution turns this off: one per generation)


@dataclass
class TrainConfig:
    """``run_train.py``: one training run."""

    model: Optional[ModelConfig] = None
    hyp: HypConfig = field(default_factory=HypConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataSpec = field(default_factory=DataSpec)
    datasets_dir: str = DATASETS_DIR
    weights: Optional[str] = None
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    device: str = "auto"
    workers: int = 8
    seed: int = 0
    deterministic: bool = True
    resume: Any = False  # false, true (latest run) or a path to last.pt
    cache: Optional[str] = None  # ram | disk
    rect: bool = False
    multi_scale: bool = False
    single_cls: bool = False
    freeze: List[int] = field(default_factory=list)  # [10] freezes layers 0-9; [0, 1, 2] freezes those layers
    image_weights: bool = False
    sync_bn: bool = False  # DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    label_smoothing: float = 0.0
    cos_lr: bool = False
    patience: int = 100
    save_period: int = -1
    noval: bool = False
    nosave: bool = False
    noautoanchor: bool = False
    noplots: bool = False
    amp: bool = True
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    project: str = "runs/train"  # where run folders go (Hydra's run dir is built from it)
    name: str = "exp"
    exist_ok: bool = False  # train into a folder that already holds a run (upstream's --exist-ok)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="val_schema", node=ValConfig)
    cs.store(name="train_schema", node=TrainConfig)


register_configs()
