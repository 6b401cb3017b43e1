"""A trained detector as an MLflow model: the ``pyfunc`` flavour around :class:`yolo.predictor.Predictor`.

At the end of a finished training with tracking on (``mlflow.log_model=true``, the default), the MLflow callback
saves ``best.pt`` as a model under the run's ``model`` artifact folder, with a signature and an input example;
``mlflow.register_model=NAME`` also registers it as a new version of model ``NAME``, tagged with the run's final
metrics. Load it anywhere ``yolo`` is installed::

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    detections = model.predict(pandas.DataFrame({"image": [base64_jpeg, "path/to/image.jpg"]}))

Input (:data:`INPUT_COLUMN`): a DataFrame with one column ``image``, one row per image, each either the base64 text
of an encoded image file (JPEG, PNG, anything OpenCV decodes), its raw bytes, or the path of an image file on the
machine that predicts. ``mlflow models predict -m runs:/<id>/model -i input.json -t json --env-manager local``
reads ``input.json`` as ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}``.

Output (:data:`OUTPUT_COLUMNS`): a DataFrame with one row per detection: ``image`` (the row index of the input
image), ``class``, ``name``, ``confidence``, and the box ``x1, y1, x2, y2`` in the original image's pixels. Params
``conf_thres`` (default 0.25), ``iou_thres`` (0.45) and ``max_det`` (1000) may be passed per call.

The model is built from code (``yolo/tracking/pyfunc_code.py``), not unpickled. This module imports ``mlflow``:
import it only where MLflow is used (the tracker defers it).
"""

from __future__ import annotations

import base64
import contextlib
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd

from yolo.predictor import Detections, Predictor
from yolo.sources import SourceError, read_image

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("image", "class", "name", "confidence", "x1", "y1", "x2", "y2")
ARTIFACT_PATH = "model"
WEIGHTS_KEY = "weights"
DEFAULT_PARAMS = {"conf_thres": 0.25, "iou_thres": 0.45, "max_det": 1000}
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")  # what MLflow runs to build the model: no pickled object


def decode_image(value: Any, index: int = 0) -> np.ndarray:
    """One input cell as a BGR image: raw bytes, an image file's path, or the base64 text of an image file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if len(text) < 4096 and os.path.isfile(text):
            im = read_image(text)
            if im is None:
                raise SourceError(f"image {index}: {text} cannot be decoded as an image")
            return im
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SourceError(f"image {index}: neither an existing file nor base64 text") from None
    else:
        raise SourceError(f"image {index}: a {type(value).__name__}; give base64 text, bytes or a file path")
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise SourceError(f"image {index}: the bytes are not an image OpenCV can decode")
    return im


def detections_frame(dets: Sequence[Detections]) -> pd.DataFrame:
    """The output DataFrame (:data:`OUTPUT_COLUMNS`) for one :class:`Detections` per input row."""
    rows = [(i, int(c), d.name_of(int(c)), float(s), *(float(v) for v in b))
            for i, d in enumerate(dets) for b, s, c in zip(d.boxes, d.scores, d.classes)]
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype({"image": "int64", "class": "int64", "name": "object", "confidence": "float64",
                         "x1": "float64", "y1": "float64", "x2": "float64", "y2": "float64"})


def _images_of(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise SourceError(f"input: no {INPUT_COLUMN!r} column (columns: {list(model_input.columns)})")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, Mapping):
        return list(model_input[INPUT_COLUMN])
    return list(model_input) if isinstance(model_input, (list, tuple, pd.Series)) else [model_input]


class YoloDetector(mlflow.pyfunc.PythonModel):
    """The pyfunc model: ``predict(DataFrame['image']) -> DataFrame of detections`` (see the module docstring).
    ``model_config`` holds ``imgsz`` (the training's), ``device`` and the default params."""

    # the signature describes the input (a DataFrame); MLflow's type-hint validation would read predict()'s hints
    # as a list schema, and warns at class definition when there are none: skip it
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        config = dict(context.model_config or {})
        self.defaults = {k: config.get(k, v) for k, v in DEFAULT_PARAMS.items()}
        self.predictor = Predictor(context.artifacts[WEIGHTS_KEY], imgsz=int(config.get("imgsz", 640)),
                                   device=str(config.get("device", "auto")), **self.defaults)

    def predict(self, context, model_input, params=None):  # no type hints (see above)
        p = self.predictor
        settings = {**self.defaults, **{k: v for k, v in (params or {}).items() if k in DEFAULT_PARAMS}}
        p.conf_thres, p.iou_thres, p.max_det = (float(settings["conf_thres"]), float(settings["iou_thres"]),
                                                int(settings["max_det"]))
        images = [decode_image(v, i) for i, v in enumerate(_images_of(model_input))]
        return detections_frame(p(images) if images else [])


def signature() -> Any:
    """Input: one string column ``image``; output: the detection columns; params: the NMS settings."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    out_types = {"image": "long", "class": "long", "name": "string", "confidence": "double"}
    outputs = Schema([ColSpec(out_types.get(c, "double"), c) for c in OUTPUT_COLUMNS])
    params = ParamSchema([ParamSpec("conf_thres", "double", 0.25), ParamSpec("iou_thres", "double", 0.45),
                          ParamSpec("max_det", "long", 1000)])
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=outputs, params=params)


def input_example(image: np.ndarray | None = None) -> pd.DataFrame:
    """One row: ``image`` (a grey 64x64 one by default) as base64 JPEG text."""
    im = image if image is not None else np.full((64, 64, 3), 114, np.uint8)
    ok, buf = cv2.imencode(".jpg", im)
    if not ok:
        raise ValueError("cannot encode the example image")
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.tobytes()).decode("ascii")]})


def pip_requirements() -> list[str]:
    """What the model needs, pinned to this environment's versions (never inferred: no network at log time)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "torchvision", "numpy", "pandas", "opencv-python-headless", "omegaconf", "mlflow",
                 "yolo-hydra"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


@contextlib.contextmanager
def _no_artifact_bars() -> Iterator[None]:
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def save_model(path: str | os.PathLike, weights: str | os.PathLike, imgsz: int, device: str = "auto",
               example: np.ndarray | None = None) -> Path:
    """Write the MLflow model of ``weights`` into the new folder ``path`` (``MLmodel``, the weights, signature,
    input example, ``requirements.txt``). Returns ``path``."""
    with _no_artifact_bars():  # MLflow's bar while it checks the example would be a stray line in the run's log
        mlflow.pyfunc.save_model(
            os.fspath(path), python_model=os.fspath(MODEL_CODE), artifacts={WEIGHTS_KEY: os.fspath(weights)},
            model_config={"imgsz": int(imgsz), "device": device, **DEFAULT_PARAMS}, signature=signature(),
            input_example=input_example(example), pip_requirements=pip_requirements())
    return Path(path)


def log_model(client: Any, run_id: str, weights: str | os.PathLike, imgsz: int, example: np.ndarray | None = None,
              artifact_path: str = ARTIFACT_PATH) -> str:
    """Save the model in a temporary folder and upload it as run ``run_id``'s ``artifact_path`` folder (no fluent
    API: the run is addressed by id). Returns ``runs:/<run_id>/<artifact_path>``."""
    with tempfile.TemporaryDirectory(prefix="yolo-mlmodel-") as tmp:
        folder = save_model(Path(tmp) / artifact_path, weights, imgsz, example=example)
        client.log_artifacts(run_id, os.fspath(folder), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def register_model(client: Any, name: str, run_id: str, artifact_path: str = ARTIFACT_PATH,
                   tags: Mapping[str, Any] | None = None) -> Any:
    """A new version of registered model ``name`` (created if missing) from run ``run_id``'s model, tagged with
    ``tags`` (default: the run's latest metrics). Returns the ``ModelVersion``."""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = dict(run.data.metrics) if tags is None else dict(tags)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    return client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
