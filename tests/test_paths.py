"""Config groups given as files (``hyp=path.yaml``, ``model=path.yaml``, as upstream's ``--hyp``/``--cfg``), the
console commands, the short ``--help`` pages and ``python -m yolo.models ... verbose=true``."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from evolve.config import EvolveConfig
from evolve.driver import evolve, train_command
from evolve.formats import Row, format_hyp_yaml
from fake_train import compose as compose_evolve
from fake_train import fake_train
from helpers import CONF, ROOT, compose, train_overrides
from yolo.config import HYP_KEYS, check_train_config, check_val_config
from yolo.group_files import rewrite_path_overrides
from yolo.tracking.names import run_name_for_training

EVOLVED = {k: v for k, v in yaml.safe_load((CONF / "hyp" / "scratch-low.yaml").read_text()).items()
           if v is not None} | {"lr0": 0.0123, "mosaic": 0.75, "hsv_h": 0.0171}


def write_hyp_evolve(folder: Path) -> Path:
    """A hyp_evolve.yaml as the evolution writes it (upstream's comment header, then the best hyps)."""
    rows = [Row((0.5, 0.4, 0.3, 0.2, 0.05, 0.04, 0.01), dict(EVOLVED)),
            Row((0.4, 0.3, 0.2, 0.1, 0.06, 0.05, 0.02), {**EVOLVED, "lr0": 0.02})]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hyp_evolve.yaml"
    path.write_text(format_hyp_yaml(rows, "test"))
    assert path.read_text().startswith("# Hyperparameter evolution results")
    return path


def composed(config_name: str, argv: list[str]):
    """The config an entrypoint composes for the overrides ``argv`` (path overrides rewritten first)."""
    return compose(config_name, rewrite_path_overrides(argv))


@pytest.fixture(autouse=True)
def _fresh_hydra():
    yield
    GlobalHydra.instance().clear()  # an entry function run in-process leaves Hydra initialised


# ---- hyp=path.yaml -------------------------------------------------------------------------------------------------
def test_hyp_file_like_hyp_evolve_sets_the_training_hyps(tmp_path, monkeypatch):
    path = write_hyp_evolve(tmp_path / "evolve")
    monkeypatch.chdir(tmp_path)  # a relative path means the user's working directory
    cfg = composed("train", ["hyp=evolve/hyp_evolve.yaml", "hyp.lrf=0.03", "model=yolov5n"])
    check_train_config(cfg)
    assert {k: cfg.hyp[k] for k in EVOLVED if k != "lrf"} == {k: v for k, v in EVOLVED.items() if k != "lrf"}
    assert cfg.hyp.lrf == 0.03  # a later override still applies
    assert cfg.hyp_file == str(path.resolve())  # config.yaml and MLflow's params record where they came from
    assert set(cfg.hyp) == set(HYP_KEYS)


def test_a_training_from_files_records_values_and_paths(tiny_shapes, tmp_path):
    """One short training with hyp= and model= files: config.yaml, hyp.yaml and MLflow hold the values and paths."""
    from mlflow.tracking import MlflowClient

    from yolo.train import train  # deferred: the trainer (torch) only for this test

    hyp = write_hyp_evolve(tmp_path / "evolve")
    shutil.copy(CONF / "model" / "yolov5n.yaml", tmp_path / "net.yaml")
    overrides = [o for o in train_overrides(tiny_shapes, tmp_path, "epochs=1", "imgsz=64") if o != "model=yolov5n"]
    res = train(composed("train", [*overrides, f"hyp={hyp}", f"model={tmp_path / 'net.yaml'}"]))
    saved = yaml.safe_load((Path(res.save_dir) / "config.yaml").read_text())
    assert saved["hyp"]["lr0"] == 0.0123 and saved["hyp_file"] == str(hyp)
    assert saved["model_file"] == str(tmp_path / "net.yaml") and saved["model"]["width_multiple"] == 0.25
    assert yaml.safe_load((Path(res.save_dir) / "hyp.yaml").read_text())["mosaic"] == 0.75
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(res.mlflow_run_id)
    assert run.data.params["hyp_file"] == str(hyp) and float(run.data.params["hyp.lr0"]) == 0.0123
    assert run.info.run_name.startswith("net-tiny_shapes-")


def test_a_hyp_group_name_keeps_working():
    assert rewrite_path_overrides(["run_train.py", "hyp=scratch-high"]) == ["run_train.py", "hyp=scratch-high"]
    cfg = composed("train", ["hyp=scratch-high"])
    assert cfg.hyp.mixup == 0.1 and cfg.hyp_file is None


def test_a_partial_hyp_file_keeps_the_schema_defaults(tmp_path):
    (tmp_path / "few.yaml").write_text("# mine\nlr0: 1e-3\nmosaic: 0.5\n")
    cfg = composed("train", [f"hyp={tmp_path / 'few.yaml'}"])
    assert cfg.hyp.lr0 == 0.001 and cfg.hyp.mosaic == 0.5 and cfg.hyp.fliplr == 0.5


def test_a_sweep_over_hyp_files_gives_each_job_its_file(tmp_path):
    (tmp_path / "a.yaml").write_text("lr0: 0.02\n")
    (tmp_path / "b.yaml").write_text("lr0: 0.03\n")
    [sweep] = rewrite_path_overrides([f"hyp={tmp_path / 'a.yaml'},{tmp_path / 'b.yaml'}"])
    options = sweep.removeprefix("hyp=").split(",")  # what Hydra's sweeper gives the jobs, one each
    jobs = [compose("train", [f"hyp={o}"]) for o in options]
    assert [(c.hyp.lr0, c.hyp_file) for c in jobs] == [(0.02, str(tmp_path / "a.yaml")),
                                                       (0.03, str(tmp_path / "b.yaml"))]


def test_evolve_starts_from_a_hyp_file_and_ends_with_the_training_command(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo.evolve")
    start = write_hyp_evolve(tmp_path / "before")
    out = tmp_path / "again"
    cfg = compose_evolve(rewrite_path_overrides(
        [f"hyp={start}", f"evolve.out_dir={out}", "generations=2", "mlflow.enabled=false", "evolve.plot=false",
         "epochs=2", "model=yolov5n"]))
    check_train_config(cfg, EvolveConfig)
    seen = []
    res = evolve(cfg, train_fn=lambda c, **kw: seen.append(c) or fake_train(c, **kw))
    assert seen[0].hyp.lr0 == 0.0123 and seen[0].hyp.mosaic == 0.75  # generation 1 trains the file's hyps
    command = f"python run_train.py hyp={(out / 'hyp_evolve.yaml').resolve()}"
    assert command in caplog.text and "conf/hyp" not in caplog.text
    cfg = composed("train", [f"hyp={res.hyp_yaml}"])  # the command's hyp= composes
    assert {k: cfg.hyp[k] for k in res.best_hyp if res.best_hyp[k] is not None} == \
        {k: v for k, v in res.best_hyp.items() if v is not None}


def test_train_command_names_files_by_their_paths():
    cfg = compose("train", ["data=external", "data.file=/d/set.yaml"])
    cfg.model_file = "/m/my.yaml"
    line = train_command("/r/hyp_evolve.yaml", cfg, ["generations=9", "evolve.seed=1", "model=file-my-12345678",
                                                     "data=external", "data.file=/d/set.yaml", "imgsz=320"])
    assert line == "python run_train.py hyp=/r/hyp_evolve.yaml model=/m/my.yaml data=/d/set.yaml imgsz=320"


# ---- errors: one line naming the key and the file -----------------------------------------------------------------
@pytest.mark.parametrize("text,line", [
    ("lr0: 0.01\nlr00: 0.1\n", "ERROR: hyp.lr00: not a setting of HypConfig (did you mean hyp.lr0?) (in {path})"),
    ("# evolved\nmosaic: 2.0\n", "ERROR: hyp.mosaic: must be in [0, 1], got 2.0 (in {path})"),
    ("lr0: fast\n", "ERROR: hyp.lr0: must be a number, got 'fast' (in {path})"),
    ("- 1\n- 2\n", "ERROR: hyp: {path} holds no hyp settings (a mapping of HypConfig's keys)"),
    (None, "ERROR: hyp: no such file: {path}"),
    ("lr0: ${oc.env:HOME}\n", "ERROR: hyp.lr0: interpolations (${{...}}) are not accepted in a file, give the value "
                              "itself (in {path})"),
], ids=["unknown-key", "bad-value", "wrong-type", "not-a-mapping", "missing", "interpolation"])
@pytest.mark.parametrize("entry", ["yolo.run_train", "evolve.run_evolve"])
def test_a_bad_hyp_file_is_one_error_line(entry, text, line, tmp_path, monkeypatch, capsys):
    path = tmp_path / "hyp.yaml"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(sys, "argv", [entry, f"hyp={path}", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(entry).main()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err == line.format(path=path) + "\n", err
    assert not (tmp_path / "run").exists()


def test_a_bad_model_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "net.yaml"
    path.write_text((CONF / "model" / "yolov5n.yaml").read_text().replace("width_multiple: 0.25", "width_multiple: -1"))
    monkeypatch.setattr(sys, "argv", ["yolo-train", f"model={path}"])
    with pytest.raises(SystemExit):
        importlib.import_module("yolo.run_train").main()
    assert capsys.readouterr().err == f"ERROR: model.width_multiple: must be > 0, got -1 (in {path})\n"


# ---- model=path.yaml -----------------------------------------------------------------------------------------------
def test_model_file_is_the_architecture(tmp_path):
    path = tmp_path / "mine.yaml"
    shutil.copy(CONF / "model" / "yolov5n.yaml", path)
    cfg = composed("train", [f"model={path}"])
    check_train_config(cfg)
    assert cfg.model == compose("train", ["model=yolov5n"]).model and cfg.model_file == str(path)
    assert run_name_for_training(cfg, "runs/train/x_exp", None).startswith("mine-coco128-")
    val = composed("val", ["weights=w.pt", f"model={path}"])
    check_val_config(val)
    assert val.model.width_multiple == 0.25 and val.model_file == str(path)
    evo = composed("evolve", [f"model={path}", f"hyp={write_hyp_evolve(tmp_path)}"])
    check_train_config(evo, EvolveConfig)
    assert evo.model.depth_multiple == 0.33 and evo.hyp.lr0 == 0.0123


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_paths_work_from_another_directory(tmp_path):
    """run_train.py started elsewhere: conf/ is found, relative paths are the user's."""
    shutil.copy(CONF / "model" / "yolov5n.yaml", tmp_path / "net.yaml")
    write_hyp_evolve(tmp_path / "evolve")
    out = run(str(ROOT / "run_train.py"), "model=net.yaml", "hyp=evolve/hyp_evolve.yaml", "--cfg", "job",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["hyp"]["lr0"] == 0.0123 and cfg["hyp_file"] == str(tmp_path / "evolve" / "hyp_evolve.yaml")
    assert cfg["model"]["width_multiple"] == 0.25 and cfg["model_file"] == str(tmp_path / "net.yaml")


# ---- console commands and --help ----------------------------------------------------------------------------------
SCRIPTS = {"yolo-evolve": "evolve.run_evolve:main", "yolo-train": "yolo.run_train:main",
           "yolo-val": "yolo.val:main", "yolo-export": "yolo.export:main", "yolo-predict": "yolo.predict:main"}


def test_console_commands_are_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: v for k, v in scripts.items() if k in SCRIPTS} == SCRIPTS
    for target in SCRIPTS.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("script,settings", [
    ("yolo-train", ["epochs", "batch_size", "imgsz", "device", "workers", "weights", "resume", "amp"]),
    ("yolo-val", ["weights", "imgsz", "batch_size", "conf_thres", "iou_thres", "device", "half", "verbose"]),
    ("yolo-evolve", ["generations", "evolve.strategy", "evolve.out_dir", "evolve.storage", "epochs"]),
])
def test_console_command_help_is_short(script, settings, monkeypatch, capsys):
    module, _, func = SCRIPTS[script].partition(":")
    monkeypatch.setattr(sys, "argv", [script, "--help", "epochs=7" if script != "yolo-val" else "imgsz=320"])
    with pytest.raises(SystemExit) as exc:
        getattr(importlib.import_module(module), func)()
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert exc.value.code in (0, None) and 15 < len(lines) <= 60, text
    assert lines[0].startswith(script) and any(ln.startswith("Usage: ") for ln in lines)
    assert "--cfg job" in text and "names:" not in text and "backbone" not in text  # not the composed config
    for key in settings:
        assert any(ln.strip().startswith(key) for ln in lines), key
    assert any(v in text for v in ("(7)", "(7,", "(320)"))  # the values this command would use


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_console_commands_run(script, tmp_path):
    """The scripts ``pip install`` wrote for this environment (beside its python) start and print their help page
    from any directory."""
    exe = Path(sys.executable).parent / script
    if not exe.is_file():
        pytest.skip(f"{script} not installed in this environment (pip install -e . writes it)")
    out = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith(script), out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("argv", [["run_train.py"], ["run_evolve.py"], ["-m", "yolo.val"]])
def test_help_of_the_commands_as_the_readme_gives_them(argv, tmp_path):
    out = run(*[str(ROOT / a) if a.endswith(".py") else a for a in argv], "--help", cwd=tmp_path)
    assert out.returncode == 0 and 15 < len(out.stdout.splitlines()) <= 60, out.stdout + out.stderr[-2000:]
    assert "hyp" in out.stdout or "yolo-val" in out.stdout


def test_model_summary_verbose_prints_the_layer_table(tmp_path):
    shutil.copy(CONF / "model" / "yolov5n.yaml", tmp_path / "yolov5n.yaml")
    out = run("-m", "yolo.models", "model=yolov5n.yaml", "verbose=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split() == ["from", "n", "params", "module", "arguments"])
    rows = lines[header + 1: header + 26]
    assert [int(r.split()[0]) for r in rows] == list(range(25))
    assert "Detect" in rows[-1] and rows[0].split()[1:4] == ["-1", "1", "1760"]
    assert lines[-1] == "YOLOv5n summary: 214 layers, 1872157 parameters, 1872157 gradients, 4.5 GFLOPs"
