"""Resume under hostile and unlucky use: what a checkpoint may decide, finished runs, run folders, NaN loss."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, train_overrides


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> SHA-256), to see that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_run(folder: Path, cfg, epochs_done: int, *, stripped: bool = False, in_run: bool = True,
              config_edit=None) -> Path:
    """A run folder as the trainer leaves it after ``epochs_done`` epochs (without spending time training):
    ``run.json``, ``results.csv`` and ``weights/last.pt``/``best.pt`` of an untrained yolov5n for the shapes data."""
    from omegaconf import OmegaConf

    from yolo.checkpoint import save_checkpoint, strip_optimizer
    from yolo.data.shapes import CLASS_NAMES
    from yolo.engine import results_csv, run_dir
    from yolo.engine.optim import build_optimizer
    from yolo.models import build_model

    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), nc=len(CLASS_NAMES))
    model.names = list(CLASS_NAMES)
    opt = build_optimizer(model, "SGD", 0.01, 0.9, 5e-4)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)  # records each group's initial_lr, as the trainer's
    folder.mkdir(parents=True, exist_ok=True)
    run_id = run_dir.new_run_id()
    if in_run:
        run_dir.write_marker(folder, run_id)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["resume"] = False
    if config_edit is not None:
        config_edit(config)
    wdir = folder / "weights"
    for e in range(epochs_done):
        results_csv.append_row(folder / "results.csv", e, {k: 0.1 * (e + 1) for k in results_csv.COLUMNS})
    last = save_checkpoint(wdir / "last.pt", model=model, ema=model, optimizer=opt, epoch=epochs_done - 1,
                           best_fitness=0.01, updates=epochs_done * 6, config=config,
                           extra={"run_id": run_id, "mlflow_run_id": None})
    save_checkpoint(wdir / "best.pt", model=model, ema=model, optimizer=opt, epoch=epochs_done - 1,
                    best_fitness=0.01, config=config, extra={"run_id": run_id})
    if stripped:
        strip_optimizer(last)
        strip_optimizer(wdir / "best.pt")
    return last


def _resume_cfg(tiny_shapes, tmp_path, last: Path, *extra: str):
    return compose("train", train_overrides(tiny_shapes, tmp_path, f"resume={last}", "noplots=true",
                                            "mlflow.enabled=false", *extra))


def test_hostile_stored_config_chooses_no_place(tiny_shapes, tmp_path):
    """A checkpoint whose stored config points data.path/download and the project outside: resuming creates
    nothing outside the run folder and the datasets root, and never unpacks the archive."""
    from yolo.train import train

    evil = tmp_path / "evil"
    evil.mkdir()
    archive = evil / "payload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ds/images/val/x.txt", "payload")
        z.writestr("ds/images/train/x.txt", "payload")

    def edit(c):
        c["data"] = {"path": str(evil / "root" / "ds"), "train": "images/train", "val": "images/val",
                     "names": ["a", "b", "c", "d", "e"], "download": archive.as_uri(), "file": None}
        c["datasets_dir"] = str(evil / "root")
        c["project"] = str(evil / "project")
        c["mlflow"]["tracking_uri"] = f"sqlite:///{evil / 'mlflow.db'}"
        c["mlflow"]["enabled"] = True

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    run = tmp_path / "runs" / "train" / "victim"
    last = _fake_run(run, base, 1, config_edit=edit)
    before = _digest(evil)
    res = train(_resume_cfg(tiny_shapes, tmp_path, last, "epochs=2"))
    assert _digest(evil) == before  # nothing unpacked, no project, no MLflow store there
    assert sorted(p.name for p in evil.iterdir()) == ["payload.zip"]
    assert Path(res.save_dir) == run.resolve()
    assert res.epochs_completed == 2


def test_stored_interpolation_is_refused_not_resolved(tiny_shapes, tmp_path, monkeypatch):
    from yolo.train import train
    from yolo.errors import CheckpointError

    monkeypatch.setenv("YOLO_TEST_SECRET", "hunter2-secret")

    def edit(c):
        c["optimizer"]["name"] = "${oc.env:YOLO_TEST_SECRET}"

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    run = tmp_path / "runs" / "train" / "interp"
    last = _fake_run(run, base, 1, config_edit=edit)
    with pytest.raises(CheckpointError, match="optimizer.name"):
        train(_resume_cfg(tiny_shapes, tmp_path, last))
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"hunter2-secret" in p.read_bytes()]
    assert leaked == []


def test_finished_run_is_never_retrained(tiny_shapes, tmp_path):
    """A stripped last.pt (the run ended): resume refuses in one line and touches nothing."""
    from yolo.train import train
    from yolo.errors import UserError

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    run = tmp_path / "runs" / "train" / "done"
    last = _fake_run(run, base, 2, stripped=True)
    before = _digest(run)
    with pytest.raises(UserError, match="finished run.*weights="):
        train(_resume_cfg(tiny_shapes, tmp_path, last, "epochs=2"))
    after = _digest(run)
    assert {k: v for k, v in after.items() if k != ".run.lock"} == before


def test_run_killed_during_its_end_is_finished_without_training(tiny_shapes, tmp_path):
    """All epochs done, killed before the strip: the resume strips and validates, results.csv stays as it is."""
    from yolo.checkpoint import load_checkpoint
    from yolo.train import train

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    run = tmp_path / "runs" / "train" / "ending"
    last = _fake_run(run, base, 2)
    csv_before = (run / "results.csv").read_bytes()
    res = train(_resume_cfg(tiny_shapes, tmp_path, last, "epochs=2"))
    assert (run / "results.csv").read_bytes() == csv_before
    assert load_checkpoint(last).optimizer is None and load_checkpoint(run / "weights" / "best.pt").epoch == -1
    assert res.epochs_completed == 0 and res.best


def test_checkpoint_outside_its_run_resumes_into_a_new_folder(tiny_shapes, tmp_path):
    """``myproject/checkpoints/last.pt``: myproject's own config.yaml and results.csv are never touched."""
    from yolo.train import train

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    src = _fake_run(tmp_path / "source", base, 1)
    project = tmp_path / "myproject"
    (project / "checkpoints").mkdir(parents=True)
    last = project / "checkpoints" / "last.pt"
    last.write_bytes(src.read_bytes())
    (project / "config.yaml").write_text("mine: true\n")
    (project / "results.csv").write_text("my own results\n")
    before = _digest(project)
    res = train(_resume_cfg(tiny_shapes, tmp_path, last, "epochs=2"))
    assert _digest(project) == before
    save_dir = Path(res.save_dir)
    assert save_dir.parent == tmp_path / "runs" / "train" and (save_dir / "run.json").exists()
    rows = (save_dir / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1]


def test_resume_honours_more_epochs_and_refuses_changed_training(tiny_shapes, tmp_path):
    from yolo.engine import resume

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    last = _fake_run(tmp_path / "runs" / "train" / "r", base, 1)
    cfg = _resume_cfg(tiny_shapes, tmp_path, last, "epochs=5", "hyp.lr0=0.5")
    plan = resume.plan(cfg, given=["resume", "epochs", "workers"])
    assert plan.cfg.epochs == 5 and plan.start_epoch == 1 and plan.run_dir == last.parent.parent.resolve()
    assert plan.cfg.hyp.lr0 == base.hyp.lr0  # from the checkpoint: not given on the command
    with pytest.raises(resume.ResumeError, match=r"hyp\.lr0=0\.5"):
        resume.plan(cfg, given=["resume", "hyp.lr0"])
    last2 = _fake_run(tmp_path / "runs" / "train" / "r2", base, 2)
    with pytest.raises(resume.ResumeError, match="already trained 2 epochs"):
        resume.plan(_resume_cfg(tiny_shapes, tmp_path, last2, "epochs=1"), given=["epochs"])


def test_resume_with_another_dataset_is_refused(tiny_shapes, tmp_path):
    from yolo.engine import resume

    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    last = _fake_run(tmp_path / "runs" / "train" / "r", base, 1)
    plan = resume.plan(_resume_cfg(tiny_shapes, tmp_path, last), given=["resume"])
    resume.check_data_matches(plan, 5, list(plan.ckpt.names))  # the run's own classes: fine
    with pytest.raises(resume.ResumeError, match="80.*data"):
        resume.check_data_matches(plan, 80, [str(i) for i in range(80)])


def test_run_folders_are_claimed_once_even_at_once(tmp_path):
    from yolo.engine.run_dir import claim_fresh

    got, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        got.append(claim_fresh(tmp_path / "2026-01-01_00-00-00_exp"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8


def test_live_or_used_folder_is_refused(tmp_path):
    from yolo.engine.run_dir import RunDirError, open_run

    run_id, hold = open_run(tmp_path / "a")
    try:
        with pytest.raises(RunDirError, match="in use by a live training run"):
            open_run(tmp_path / "a", exist_ok=True)
    finally:
        hold.release()
    with pytest.raises(RunDirError, match="exist_ok"):
        open_run(tmp_path / "a")
    new_id, hold = open_run(tmp_path / "a", exist_ok=True)
    hold.release()
    assert new_id != run_id


def test_same_instant_double_start_gets_two_folders(tiny_shapes, tmp_path):
    """Two trainings started together with the default (one-second) folder name: two folders, one row per
    epoch each."""
    args = train_overrides(tiny_shapes, tmp_path, "epochs=1", "noplots=true", "mlflow.enabled=false")
    cmd = [sys.executable, "run_train.py", *args, "name=twin"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    folders = sorted((tmp_path / "runs" / "train").glob("*twin*"))
    assert len(folders) == 2, folders
    for f in folders:
        rows = (f / "results.csv").read_text().strip().splitlines()[1:]
        assert [int(float(r.split(",")[0])) for r in rows] == [0]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    from yolo.checkpoint import load_model
    from yolo.train import train
    from yolo.errors import UserError
    from yolo.loss import ComputeLoss

    calls = {"n": 0}
    real = ComputeLoss.__call__

    def flaky(self, p, targets):
        loss, items = real(self, p, targets)
        calls["n"] += 1
        return (loss * float("nan"), items) if calls["n"] > 6 else (loss, items)  # epoch 0 is 6 batches

    monkeypatch.setattr(ComputeLoss, "__call__", flaky)
    cfg = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=3", "noval=true", "noplots=true",
                                           "mlflow.enabled=false", "name=nan"))
    with pytest.raises(UserError, match="diverged.*epoch 1"):
        train(cfg)
    (run,) = (tmp_path / "runs" / "train").glob("nan*")
    for name in ("last.pt", "best.pt"):
        load_model(run / "weights" / name)  # strict: finite and fitting
    rows = (run / "results.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 1


def test_explicit_used_folder_is_refused_before_hydra_writes(tiny_shapes, tmp_path):
    """``hydra.run.dir=`` into a folder holding a run: one ERROR line, and its files (Hydra's included) intact."""
    base = compose("train", train_overrides(tiny_shapes, tmp_path, "epochs=2"))
    run = tmp_path / "runs" / "train" / "used"
    _fake_run(run, base, 1)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the original run's composition\n")
    before = _digest(run)
    args = train_overrides(tiny_shapes, tmp_path, "epochs=1", "mlflow.enabled=false")
    out = subprocess.run([sys.executable, "run_train.py", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "exist_ok" in errors[0] and "Traceback" not in out.stderr, out.stderr
    assert _digest(run) == before
