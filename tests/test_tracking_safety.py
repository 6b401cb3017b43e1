"""Tracking keeps secrets and structure: no password reaches MLflow or the log, one config class, no import cycle."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose, train_overrides
from omegaconf import OmegaConf

from yolo.config import MlflowConfig
from yolo.errors import ConfigError
from yolo.tracking import Tracker, mlflow_config, store_dir
from yolo.utils.redact import redact_text

SECRET = "s3cr3t-pw"
URL = f"http://alice:{SECRET}@127.0.0.1:9/mlflow"


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _stored_text(client, run_id: str, tmp_path: Path) -> str:
    """Everything MLflow keeps about a run (name, params, tags, text artifacts) as one string."""
    run = client.get_run(run_id)
    parts = [run.info.run_name, *run.data.params.items(), *run.data.tags.items()]
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / f"dl-{run_id}")))
    parts += [p.read_text(errors="replace") for p in local.rglob("*") if p.is_file() and p.suffix != ".pt"]
    return "\n".join(map(str, parts))


def test_redact_text_masks_every_url_password():
    line = f"python run_train.py mlflow.tracking_uri={URL} evolve.storage=postgresql://bob:pw2@db/x epochs=3"
    out = redact_text(line)
    assert SECRET not in out and "pw2" not in out
    assert "http://alice:***@127.0.0.1:9/mlflow" in out and "postgresql://bob:***@db/x" in out
    assert out.endswith("epochs=3") and redact_text("no url here") == "no url here"


def test_unreachable_server_with_a_password_warns_without_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        t = Tracker(MlflowConfig(tracking_uri=URL, timeout_s=1.0), default_dir=tmp_path)
        assert t.start({"mlflow": {"tracking_uri": URL}}, {"uri": URL}) is None
    assert not t.enabled
    assert "MLflow tracking disabled" in caplog.text
    assert SECRET not in caplog.text and "alice:***@127.0.0.1" in caplog.text
    assert SECRET not in t.safe_uri


def test_password_never_reaches_params_tags_names_or_artifacts(tmp_path, monkeypatch):
    """What the trainer sends (its config as params, the command line, config.yaml and .hydra/) is stored masked."""
    monkeypatch.setattr(sys, "argv", ["run_train.py", f"mlflow.tracking_uri={URL}", "epochs=1"])
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"mlflow:\n  tracking_uri: {URL}\nepochs: 1\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- mlflow.tracking_uri={URL}\n- epochs=1\n")
    (run_dir / "weights.pt").write_bytes(b"\0binary")
    t = Tracker(MlflowConfig(experiment="secret"), default_dir=tmp_path)
    run_id = t.start({"mlflow": {"tracking_uri": URL}, "epochs": 1}, {"hydra_overrides": f"mlflow.tracking_uri={URL}"},
                     run_name=f"tracking_uri={URL}")
    t.log_artifact(run_dir / "config.yaml")
    t.log_artifact(run_dir / "weights.pt")
    t.log_artifacts(run_dir / ".hydra", artifact_path="hydra")
    t.end()
    assert t.enabled
    client = _client(tmp_path / "mlflow.db")
    stored = _stored_text(client, run_id, tmp_path)
    assert SECRET not in stored
    run = client.get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == "http://alice:***@127.0.0.1:9/mlflow"
    assert "alice:***@" in run.data.tags["yolo.command"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "weights.pt", "hydra"}
    assert SECRET in (run_dir / "config.yaml").read_text()  # the user's own files are left as they were


@pytest.mark.timeout(300)
def test_training_with_a_password_in_tracking_uri_stores_none(tiny_shapes, tmp_path, monkeypatch):
    """The real trainer: its config (with the password) becomes params, config.yaml and .hydra/ artifacts."""
    from yolo.train import train

    cfg = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=1", "noval=true", "noplots=true",
                                           "imgsz=64", f"mlflow.tracking_uri={URL}"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store we can read back
    res = train(cfg)
    assert res.mlflow_run_id
    client = _client(tmp_path / "mlflow.db")
    assert "config.yaml" in {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert SECRET not in _stored_text(client, res.mlflow_run_id, tmp_path)


def test_one_config_class_given_as_object_mapping_or_dictconfig(tmp_path):
    node = OmegaConf.structured(MlflowConfig(experiment="e", enabled=False))
    for given in (MlflowConfig(experiment="e", enabled=False), {"experiment": "e", "enabled": False}, node):
        cfg = mlflow_config(given)
        assert isinstance(cfg, MlflowConfig) and cfg.experiment == "e" and cfg.enabled is False
        assert Tracker(given, default_dir=tmp_path).cfg == cfg
    original = MlflowConfig()
    assert mlflow_config(original) is not original  # callers may change their copy
    with pytest.raises(ConfigError, match="^mlflow: .*enabld"):
        mlflow_config({"enabld": False})
    with pytest.raises(ConfigError, match="^mlflow: "):
        mlflow_config({"timeout_s": "soon"})
    assert store_dir({"project": str(tmp_path / "runs" / "train")}) == (tmp_path / "runs").resolve()


# ---- structure -------------------------------------------------------------------------------------------------

_FORBIDDEN = ("yolo.engine", "yolo.val", "yolo.cli", "yolo.data", "yolo.models", "evolve")


def _tracking_sources() -> list[Path]:
    """The tracking code: the package (and, in older layouts, yolo/tracking.py and yolo/sweep.py)."""
    files = sorted((ROOT / "yolo" / "tracking").glob("*.py"))
    return files + [p for p in (ROOT / "yolo" / "tracking.py", ROOT / "yolo" / "sweep.py") if p.exists()]


def test_tracking_imports_no_trainer_module():
    """No import of the trainer (or anything that imports it) anywhere in tracking, inside functions included:
    that is what made the cycle cli -> engine.distributed -> sweep -> engine.trainer -> val -> cli."""
    bad = []
    for path in _tracking_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(_FORBIDDEN)]
    assert not bad, bad
    code = ("import sys, yolo.tracking; mods = sorted(m for m in sys.modules if m.startswith(('yolo.engine', "
            "'yolo.val', 'yolo.cli', 'mlflow', 'torch'))); print(mods)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # nor mlflow (imported on first connection) nor torch
