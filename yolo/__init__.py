"""Hydra-configured YOLOv5: models, data, training, validation."""

__version__ = "0.1.0"
