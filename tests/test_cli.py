"""One path from any user-input error to one ``ERROR: <key>: <why>`` line, no traceback, exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hydra.errors import HydraException

from helpers import ROOT, compose
from yolo.cli import error_line, exit_on_user_error, run_hydra_main
from yolo.errors import CheckpointError, ConfigError


def hydra_error(*overrides: str) -> HydraException:
    with pytest.raises(HydraException) as e:
        compose("train", list(overrides))
    return e.value


@pytest.mark.parametrize("override,line", [
    ("hyp.lr00=1", "hyp.lr00: Key 'lr00' not in 'HypConfig'"),
    ("epochs=abc", "epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("model=yolov9", "model: 'yolov9' is not an option of conf/model (choose from yolov5l, yolov5m, yolov5n, "
                     "yolov5s, yolov5x)"),
    ("epochs=[1", "epochs: cannot parse 'epochs=[1': "),
])
def test_hydra_errors_are_one_line_naming_the_key(override, line):
    assert error_line(hydra_error(override)).startswith(line)


@pytest.mark.parametrize("error", [ConfigError("epochs: must be >= 1, got 0"), CheckpointError("x.pt: corrupt\nmore"),
                                   FileNotFoundError("nowhere.yaml"), hydra_error("hyp.lr00=1")])
def test_every_user_error_type_is_one_line(error, capsys):
    with pytest.raises(SystemExit) as exc, exit_on_user_error():
        raise error
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: "), err


def test_hydra_plain_value_error_is_one_line(capsys):
    """Hydra reports some override mistakes (``model=null`` on a config group) as a plain ValueError."""
    with pytest.raises(SystemExit), exit_on_user_error():
        compose("train", ["model=null"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: Config group override must be a string"), err


@pytest.mark.parametrize("bug", [KeyError("not the user's fault"), ValueError("nor this one")])
def test_a_bug_keeps_its_traceback(bug):
    with pytest.raises(type(bug)), exit_on_user_error():
        raise bug


def test_run_hydra_main_leaves_hydra_full_error_as_it_was(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["run_train.py", "epochs=1"])
    seen = []
    run_hydra_main(lambda: seen.append(os.environ.get("HYDRA_FULL_ERROR")))
    assert seen == ["1"] and "HYDRA_FULL_ERROR" not in os.environ  # Hydra raises its errors only while we listen


# ---- the entrypoints, end to end (a few: each costs a Python start) -----------------------------------------------
ENTRY = [
    (["run_train.py", "epochs=0"], "ERROR: epochs: must be >= 1, got 0"),
    (["run_train.py", "hyp.lr00=1"], "ERROR: hyp.lr00: Key 'lr00' not in 'HypConfig'"),  # Hydra's own error
    (["run_evolve.py", "generations=0"], "ERROR: generations: must be >= 1, got 0"),
    (["-m", "yolo.val", "weights=/nonexistent/w.pt", "imgsz=0"], "ERROR: imgsz: must be >= 32, got 0"),
]


@pytest.mark.parametrize("argv,line", ENTRY, ids=["train-epochs", "train-hydra-key", "evolve", "val-imgsz"])
def test_entrypoint_prints_one_error_line_before_reading_data(argv, line, tmp_path):
    # a dataset that does not exist and an empty datasets root: reading data would be another error
    cmd = [sys.executable, *argv, "data=/nonexistent/nowhere.yaml", "device=cpu", "mlflow.enabled=false",
           f"hydra.run.dir={tmp_path / 'run'}"]
    if "yolo.val" in argv:
        cmd.remove("mlflow.enabled=false")
    env = dict(os.environ, DATASETS_DIR=str(tmp_path / "datasets"))
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert errors == [line] or (len(errors) == 1 and errors[0].startswith(line)), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "datasets").exists()
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder
    assert elapsed < 60, f"{elapsed:.1f}s: the check should come before any data work"
