"""The trained detector as an MLflow model: logged at the end of a finished training, loadable with
``mlflow.pyfunc.load_model``, registered on request, and never a reason for a run to fail."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest
from conftest import compose, train_overrides

from yolo.config import MlflowConfig
from yolo.data.shapes import CLASS_NAMES
from yolo.tracking import Tracker
from yolo.tracking.callback import MlflowCallback, ui_hint

COLUMNS = ["image", "class", "name", "confidence", "x1", "y1", "x2", "y2"]
REGISTERED = "tiny-shapes-detector"


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    """One short tracked training (1 epoch, imgsz 64) that registers its model."""
    from yolo.train import train

    tmp = tmp_path_factory.mktemp("mlmodel")
    cfg = compose("train", train_overrides(tiny_shapes, tmp, "epochs=1", "imgsz=64", "batch_size=16",
                                           f"mlflow.register_model={REGISTERED}"))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("yolo")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        res = train(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return SimpleNamespace(res=res, uri=f"sqlite:///{tmp / 'mlflow.db'}", data=tiny_shapes, log=lines)


def _val_image(data_yaml: Path) -> Path:
    return sorted((data_yaml.parent / "tiny_shapes" / "images" / "val").glob("*"))[0]


def test_finished_training_logs_a_pyfunc_model(trained):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained.uri)
    run_id = trained.res.mlflow_run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert {"MLmodel", "input_example.json", "requirements.txt"} <= files
    assert "python_model.pkl" not in files  # models from code: nothing is unpickled at load time

    mlflow.set_tracking_uri(trained.uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    sig = model.metadata.get_input_schema()
    assert sig.input_names() == ["image"]
    assert model.metadata.get_output_schema().input_names() == COLUMNS

    path = _val_image(trained.data)
    b64 = base64.b64encode(cv2.imencode(".png", cv2.imread(str(path)))[1].tobytes()).decode()
    out = model.predict(pd.DataFrame({"image": [b64, str(path)]}), params={"conf_thres": 0.0001})
    assert list(out.columns) == COLUMNS
    assert len(out) > 0 and set(out["image"]) <= {0, 1}
    h, w = cv2.imread(str(path)).shape[:2]
    assert (out["x2"] <= w + 1e-3).all() and (out["y2"] <= h + 1e-3).all() and (out["x1"] >= 0).all()
    assert all(CLASS_NAMES[c] == n for c, n in zip(out["class"], out["name"]))
    first, second = out[out["image"] == 0].reset_index(drop=True), out[out["image"] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(first.drop(columns="image"), second.drop(columns="image"))  # base64 == path


def test_register_model_makes_a_version_tagged_with_metrics(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained.uri)
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.run_id == trained.res.mlflow_run_id
    assert "metrics/mAP_0.5:0.95" in mv.tags and "fitness" in mv.tags
    assert float(mv.tags["fitness"]) == pytest.approx(client.get_run(mv.run_id).data.metrics["fitness"])

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(trained.uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/{mv.version}")
    finally:
        mlflow.set_tracking_uri(None)
    out = model.predict(pd.DataFrame({"image": [str(_val_image(trained.data))]}))
    assert list(out.columns) == COLUMNS


def test_failing_log_model_only_warns(tmp_path, monkeypatch, caplog):
    """The model cannot be saved: one warning, and the run still ends FINISHED with its artifacts."""
    from mlflow.tracking import MlflowClient

    from yolo.tracking import pyfunc

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pyfunc, "log_model", broken)
    weights = tmp_path / "run" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really weights")
    (tmp_path / "run" / "train_batch0.jpg").write_bytes(b"jpg")
    (tmp_path / "run" / "run_train.log").write_text("epoch 0\n")
    cb = MlflowCallback()
    cb.tracker = Tracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), default_dir=tmp_path)
    run_id = cb.tracker.start(run_name="broken-model")
    trainer = SimpleNamespace(status="FINISHED", save_dir=tmp_path / "run", best=weights, imgsz=64,
                              cfg=SimpleNamespace(mlflow=MlflowConfig(register_model="never")),
                              results=SimpleNamespace(mlflow_run_id=run_id))
    with caplog.at_level(logging.INFO, logger="yolo"):
        cb.on_train_end(trainer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "log_model" in warnings[0] and "disk full" in warnings[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"train_batch0.jpg", "run_train.log", "weights"} <= names and "model" not in names
    assert any(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in r.getMessage()
               for r in caplog.records)


def test_ui_hint():
    assert ui_hint("sqlite:///runs/mlflow.db") == (
        "MLflow: view the runs with  mlflow ui --backend-store-uri sqlite:///runs/mlflow.db")
    assert "open http://host:5000" in ui_hint("http://host:5000")


# ---- what a YOLOv5 user expects to see (the same training) --------------------------------------------------------


def test_training_prints_the_scratch_note_the_epoch_all_row_and_the_ui_command(trained):
    from yolo.engine.trainer import SCRATCH_NOTE
    from yolo.val import TABLE_HEADER

    log = trained.log
    assert SCRATCH_NOTE in log
    header = [i for i, line in enumerate(log) if line == TABLE_HEADER]
    alls = [i for i, line in enumerate(log) if line.split()[:1] == ["all"]]
    assert len(header) >= 2 and len(alls) >= 2, log  # the epoch's line, then the final validation's table
    assert alls[0] == header[0] + 1
    assert f"MLflow: view the runs with  mlflow ui --backend-store-uri {trained.uri}" in log


def test_final_validation_draws_val_batches_and_they_reach_mlflow(trained):
    from mlflow.tracking import MlflowClient

    save_dir = Path(trained.res.save_dir)
    for name in ("val_batch0_labels.jpg", "val_batch0_pred.jpg", "train_batch0.jpg"):
        assert (save_dir / name).is_file(), name
    names = {a.path for a in MlflowClient(tracking_uri=trained.uri).list_artifacts(trained.res.mlflow_run_id)}
    assert {"val_batch0_labels.jpg", "val_batch0_pred.jpg", "train_batch0.jpg"} <= names


def test_validate_draws_val_batches_unless_plots_false(trained, tmp_path):
    from yolo.checkpoint import load_model
    from yolo.data.loader import create_dataloader
    from yolo.val import validate

    model, _ = load_model(trained.res.best)
    val = trained.data.parent / "tiny_shapes" / "images" / "val"
    loader, _ = create_dataloader(str(val), 64, 4, 32, augment=False, rect=True, pad=0.5, workers=0,
                                  shuffle=False, prefix="val: ")
    for plots in (True, False):
        save_dir = tmp_path / str(plots)
        validate(model, loader, list(CLASS_NAMES), save_dir=save_dir, plots=plots)
        drawn = sorted(p.name for p in save_dir.glob("val_batch*.jpg"))
        # 16 images in batches of 4: the first 3 batches, as upstream; none with plots=false
        assert drawn == ([f"val_batch{i}_{k}.jpg" for i in range(3) for k in ("labels", "pred")] if plots else [])
