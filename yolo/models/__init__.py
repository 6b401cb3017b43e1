"""YOLOv5 models built from upstream-layout YAML architectures (``conf/model/*.yaml``)."""

from yolo.models.common import C3, SPPF, Bottleneck, Concat, Conv, autopad, fuse_conv_bn
from yolo.models.summary import count_parameters, model_gflops, model_summary
from yolo.models.yolo import Detect, DetectionModel, build_model, make_divisible, parse_model, unwrap_model

__all__ = [
    "C3",
    "SPPF",
    "Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "DetectionModel",
    "autopad",
    "build_model",
    "count_parameters",
    "fuse_conv_bn",
    "make_divisible",
    "model_gflops",
    "model_summary",
    "parse_model",
    "unwrap_model",
]

