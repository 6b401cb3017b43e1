"""evolve.csv / hyp_evolve.yaml / evolve.png in upstream's formats, seeding from an upstream evolve.csv, storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from evolve import ledger
from evolve.samplers import MutationSampler, trial_history
from evolve.space import HYP_KEYS, build_space

SPACE_YAML = Path(__file__).resolve().parents[1] / "conf" / "evolve_space" / "default.yaml"
ISSUE_HEADER = (  # the header upstream writes, fields stripped (from the issue)
    "metrics/precision, metrics/recall, metrics/mAP_0.5, metrics/mAP_0.5:0.95, val/box_loss, val/obj_loss, "
    "val/cls_loss, lr0, lrf, momentum, weight_decay, warmup_epochs, warmup_momentum, warmup_bias_lr, box, cls, "
    "cls_pw, obj, obj_pw, iou_t, anchor_t, fl_gamma, hsv_h, hsv_s, hsv_v, degrees, translate, scale, shear, "
    "perspective, flipud, fliplr, mosaic, mixup, copy_paste, anchors")

# three generations as upstream's print_mutation writes them (every field padded to 20 characters)
UPSTREAM_CSV = (
    "   metrics/precision,      metrics/recall,     metrics/mAP_0.5,metrics/mAP_0.5:0.95,        val/box_loss,        val/obj_loss,        val/cls_loss,                 lr0,                 lrf,            momentum,        weight_decay,       warmup_epochs,     warmup_momentum,      warmup_bias_lr,                 box,                 cls,              cls_pw,                 obj,              obj_pw,               iou_t,            anchor_t,            fl_gamma,               hsv_h,               hsv_s,               hsv_v,             degrees,           translate,               scale,               shear,         perspective,              flipud,              fliplr,              mosaic,               mixup,          copy_paste,             anchors\n"
    "             0.43278,             0.37799,              0.3552,              0.1925,            0.051432,            0.031245,            0.021378,                0.01,                0.01,               0.937,              0.0005,                   3,                 0.8,                 0.1,                0.05,                 0.5,                   1,                   1,                   1,                 0.2,                   4,                   0,               0.015,                 0.7,                 0.4,                   0,                 0.1,                 0.5,                   0,                   0,                   0,                 0.5,                   1,                   0,                   0,                   3\n"
    "                0.41,                0.36,                0.34,                0.18,               0.052,              0.0315,              0.0219,             0.00963,             0.01035,             0.96172,             0.00049,              2.9986,             0.79596,             0.10152,             0.05144,             0.47969,             0.95283,              1.0336,             0.99328,             0.20525,              3.8008,                   0,             0.01533,             0.68101,             0.41781,                   0,             0.09531,             0.47627,                   0,                   0,                   0,             0.48583,             0.99221,                   0,                   0,              2.9814\n"
    "                0.45,                0.39,                0.37,              0.2012,              0.0511,              0.0309,              0.0211,                0.01,             0.00973,             0.91178,             0.00049,              2.9879,             0.78318,             0.09521,             0.05169,             0.50282,              1.0142,             0.96859,              1.0493,              0.2072,              3.8484,                   0,             0.01533,             0.71478,             0.41746,                   0,              0.1033,             0.50852,                   0,                   0,                   0,             0.51731,              1.0005,                   0,                   0,              2.9228\n"
)


@pytest.fixture()
def space_base():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from yolo.config import HypConfig

    table = OmegaConf.to_container(OmegaConf.load(SPACE_YAML))
    return build_space(table, asdict(HypConfig()))


def test_read_upstream_padded_csv(tmp_path):
    p = tmp_path / "evolve.csv"
    p.write_text(UPSTREAM_CSV)
    columns, rows = ledger.read_evolve_csv(p)
    assert columns == list(HYP_KEYS)
    assert len(rows) == 3
    assert rows[0].metrics[:4] == (0.43278, 0.37799, 0.3552, 0.1925)
    assert rows[0].fitness == pytest.approx(0.20877, abs=1e-5)
    assert rows[0].hyp["lr0"] == 0.01 and rows[0].hyp["anchors"] == 3.0
    assert rows[1].hyp["momentum"] == 0.96172
    assert ledger.best_index(rows) == 2


def test_read_plain_csv(tmp_path):
    header = ISSUE_HEADER.replace(", ", ",")
    vals = ["0.5", "0.4", "0.3", "0.2", "0.05", "0.03", "0.02"] + ["0.1"] * len(HYP_KEYS)
    p = tmp_path / "plain.csv"
    p.write_text(header + "\n" + ", ".join(vals) + "\n")  # no padding, a space after each comma
    columns, rows = ledger.read_evolve_csv(p)
    assert columns == list(HYP_KEYS) and rows[0].hyp["mixup"] == 0.1 and rows[0].metrics[3] == 0.2


def test_read_rejects_other_csv(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("epoch,train/box_loss\n0,0.1\n")
    with pytest.raises(ValueError, match="not an evolve.csv"):
        ledger.read_evolve_csv(p)


def test_write_matches_upstream_layout_and_round_trips(tmp_path):
    columns, rows = ledger.read_evolve_csv(_write(tmp_path, UPSTREAM_CSV))
    out = ledger.write_evolve_csv(tmp_path / "ours.csv", rows, columns)
    text = out.read_text()
    assert text == UPSTREAM_CSV  # byte for byte what upstream writes
    header = text.splitlines()[0]
    assert [f.strip() for f in header.split(",")] == ISSUE_HEADER.split(", ")
    assert all(len(f) == 20 for line in text.splitlines() for f in line.split(","))
    _, again = ledger.read_evolve_csv(out)
    assert [r.metrics for r in again] == [r.metrics for r in rows] and [r.hyp for r in again] == [r.hyp for r in rows]


def test_hyp_yaml_has_comment_lines_and_best_hyps(tmp_path):
    _, rows = ledger.read_evolve_csv(_write(tmp_path, UPSTREAM_CSV))
    p = ledger.write_hyp_yaml(tmp_path / "hyp_evolve.yaml", rows)
    text = p.read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert "# Best generation: 2" in comments and "# Last generation: 2" in comments
    assert any("metrics/mAP_0.5:0.95" in c for c in comments) and any("0.2012" in c for c in comments)
    hyp = yaml.safe_load(text)
    assert list(hyp) == list(HYP_KEYS)
    assert hyp == rows[2].hyp


def test_plot_one_scatter_per_hyperparameter(tmp_path):
    columns, rows = ledger.read_evolve_csv(_write(tmp_path, UPSTREAM_CSV))
    p = ledger.plot_evolve(tmp_path / "evolve.png", rows, columns)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(p).size
    assert w == 1500 and h == 150 * 2 * 6  # 10 x 12 inches: 6 rows of 5 plots for 29 keys


def test_seed_study_from_upstream_csv_then_mutate(tmp_path, space_base):
    space, base = space_base
    study = optuna.create_study(direction="maximize", sampler=MutationSampler(space, base, seed=0))
    n = ledger.seed_study_from_csv(study, _write(tmp_path, UPSTREAM_CSV), space, base)
    assert n == 3
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[0].value == pytest.approx(0.20877, abs=1e-5)
    values, fit = trial_history(trials, space.keys, base)
    assert values.shape == (3, len(space.keys)) and np.allclose(fit, [r.fitness for r in
                                                                     ledger.read_evolve_csv(tmp_path / "evolve.csv")[1]])
    rows = ledger.study_rows(trials, base)
    assert ledger.format_evolve_csv(rows, list(HYP_KEYS)) == UPSTREAM_CSV  # the ledger reproduces the file
    trial = study.ask()
    for k in space.tuned_keys:
        trial.suggest_float(k, space.bounds[k].lower, space.bounds[k].upper)
    assert trial.params != {k: base[k] for k in space.tuned_keys}  # a mutation of a seeded parent


def test_seed_ignores_anchors_when_not_searched(tmp_path):
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from yolo.config import HypConfig

    table = OmegaConf.to_container(OmegaConf.load(SPACE_YAML))
    space, base = build_space(table, asdict(HypConfig()), weights="w.pt")
    study = optuna.create_study(direction="maximize")
    ledger.seed_study_from_csv(study, _write(tmp_path, UPSTREAM_CSV), space, base)
    rows = ledger.study_rows(study.get_trials(), base)
    assert all(r.hyp["anchors"] is None for r in rows)


def test_journal_and_sqlite_storages(tmp_path):
    kind, where = ledger.describe_storage(None, tmp_path)
    assert kind == "journal" and where == str(tmp_path / ledger.JOURNAL_NAME)
    assert ledger.describe_storage("sqlite:///x.db", tmp_path) == ("rdb", "sqlite:///x.db")
    assert ledger.describe_storage(f"journal://{tmp_path}/j.log", tmp_path) == ("journal", str(tmp_path / "j.log"))
    for spec in (None, f"sqlite:///{tmp_path}/o.db"):
        s = ledger.open_storage(spec, tmp_path)
        study = optuna.create_study(storage=s, study_name="x", direction="maximize")
        study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="x", storage=ledger.open_storage(spec, tmp_path)).trials) == 2


def test_owner_alive():
    assert ledger.owner_alive(ledger.owner_info()) is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = ledger.owner_info(p.pid)
    p.wait()
    assert ledger.owner_alive(owner) is False
    assert ledger.owner_alive({**ledger.owner_info(), "host": "elsewhere"}) is None
    assert ledger.owner_alive({**ledger.owner_info(), "start": -5}) is False  # pid reused by another process


def _write(tmp_path, text):
    p = tmp_path / "evolve.csv"
    p.write_text(text)
    return p


def test_rdb_trial_without_heartbeat_is_failed_and_retried(tmp_path):
    import time
    import warnings

    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(storage=ledger.open_storage(url, tmp_path, heartbeat_s=1, max_retries=1),
                                study_name="s", direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    trial.suggest_float("a", 0, 1)
    # owned by a worker on another machine: only its missing heartbeat can tell it is gone
    study._storage.set_trial_system_attr(trial._trial_id, ledger.OWNER_ATTR, {"host": "elsewhere", "pid": 1})
    study._storage.record_heartbeat(trial._trial_id)
    assert ledger.recover_stale_trials(study, max_retries=1) == []
    failed, t0 = [], time.time()
    while not failed and time.time() - t0 < 8:  # stale after the grace period, twice the heartbeat (2 s)
        time.sleep(0.5)
        failed = ledger.recover_stale_trials(study, max_retries=1)
    assert failed == [0] and time.time() - t0 > 1.5
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    retry = study.get_trials()[1]
    assert retry.params == trial.params and retry.system_attrs["retry_history"] == [0]
    assert ledger.OWNER_ATTR not in retry.system_attrs
