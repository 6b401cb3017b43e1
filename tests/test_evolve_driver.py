"""The evolution loop with a cheap deterministic train_fn: generation 1, seeds, anchors, resume, pruning, failures,
strategies, seeding from a CSV, MLflow parent and children."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import ledger
from evolve.driver import evolve
from evolve.settings import CONFIG_ATTR, PARENT_ATTR
from fake_train import compose, fake_train

SCRATCH_LOW = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
               "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0,
               "obj_pw": 1.0, "iou_t": 0.2, "anchor_t": 4.0, "fl_gamma": 0.0, "hsv_h": 0.015, "hsv_s": 0.7,
               "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0,
               "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0}


def cfg_for(out: Path, *overrides: str, generations: int = 4):
    return compose([f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false",
                    "evolve.plot=false", "epochs=2", "model=yolov5n", *overrides])


class Recorder:
    """fake_train that remembers the configs it was called with."""

    def __init__(self, fail_on: set[int] = frozenset()):
        self.cfgs = []
        self.fail_on = fail_on

    def __call__(self, cfg, callbacks=(), save_dir=None):
        self.cfgs.append(cfg)
        if len(self.cfgs) - 1 in self.fail_on:
            raise RuntimeError("boom: diverged")
        return fake_train(cfg, callbacks=callbacks, save_dir=save_dir)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, out))


def test_generation_1_trains_the_base_hyp_with_upstream_flags(tmp_path):
    rec = Recorder()
    res = evolve(cfg_for(tmp_path, generations=3), train_fn=rec)
    first = rec.cfgs[0]
    hyp = {k: first.hyp[k] for k in SCRATCH_LOW}
    assert hyp == SCRATCH_LOW and first.hyp.anchors == 3.0  # no weights: anchors searched, model's 3 per level
    assert all(c.noval and c.nosave and c.noplots and not c.resume for c in rec.cfgs)
    assert res.generations == 3 and res.completed == 3
    _, rows = ledger.read_evolve_csv(res.evolve_csv)
    assert {k: rows[0].hyp[k] for k in SCRATCH_LOW} == SCRATCH_LOW
    assert rows[1].hyp != rows[0].hyp and rows[2].hyp != rows[1].hyp
    assert Path(res.hyp_yaml).exists()
    assert Path(rec.cfgs[1].project) == tmp_path / "generations" and rec.cfgs[1].name == "trial0001"


def test_reproducible_with_a_seed(tmp_path):
    texts = [Path(evolve(cfg_for(tmp_path / f"r{i}", f"evolve.seed={s}", generations=4),
                         train_fn=fake_train).evolve_csv).read_text() for i, s in enumerate((7, 7, 8))]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_anchors_stay_out_of_the_search_from_pretrained_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo.evolve")
    rec = Recorder()
    res = evolve(cfg_for(tmp_path / "w", "weights=yolov5n.pt", generations=4), train_fn=rec)
    assert all(c.hyp.anchors is None for c in rec.cfgs)  # the pretrained head keeps its anchors
    assert "'anchors' is not searched" in caplog.text and "pretrained weights" in caplog.text
    columns, _ = ledger.read_evolve_csv(res.evolve_csv)
    assert "anchors" not in columns and len(columns) == 28
    rec = Recorder()
    res = evolve(cfg_for(tmp_path / "a", "weights=yolov5n.pt", "evolve.search_anchors=true", generations=4),
                 train_fn=rec)
    assert rec.cfgs[0].hyp.anchors == 3.0 and len({c.hyp.anchors for c in rec.cfgs}) > 1
    assert "anchors" in ledger.read_evolve_csv(res.evolve_csv)[0]


def test_more_generations_continue_the_same_evolution(tmp_path):
    first = evolve(cfg_for(tmp_path, generations=3), train_fn=fake_train)
    before = Path(first.evolve_csv).read_text().splitlines()
    rec = Recorder()
    again = evolve(cfg_for(tmp_path, generations=5), train_fn=rec)
    after = Path(again.evolve_csv).read_text().splitlines()
    assert len(before) == 1 + 3 and len(after) == 1 + 5 and after[:4] == before
    assert len(rec.cfgs) == 2
    rec = Recorder()
    evolve(cfg_for(tmp_path, generations=5), train_fn=rec)  # same command again: nothing left to do
    assert rec.cfgs == []
    # the same evolution, uninterrupted, draws the same generations
    straight = evolve(cfg_for(tmp_path / "straight", generations=5), train_fn=fake_train)
    assert Path(straight.evolve_csv).read_text() == Path(again.evolve_csv).read_text()


def test_pruned_generations_are_recorded_as_pruned(tmp_path):
    rec = Recorder()
    res = evolve(cfg_for(tmp_path, "evolve.pruner=median", "evolve.pruner_startup=2", "epochs=4",
                         "evolve.strategy=random", generations=12), train_fn=rec)
    assert all(not c.noval for c in rec.cfgs)  # pruning validates every epoch
    study = load(tmp_path)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and res.pruned == len(pruned) and res.completed == len(complete)
    assert len(pruned) + len(complete) == 12
    assert all(t.intermediate_values and max(t.intermediate_values) < 3 for t in pruned)  # stopped early
    _, rows = ledger.read_evolve_csv(res.evolve_csv)
    assert len(rows) == len(complete)  # evolve.csv holds the finished-in-full generations only


def test_a_failing_generation_is_recorded_and_skipped(tmp_path):
    rec = Recorder(fail_on={1})
    res = evolve(cfg_for(tmp_path, generations=3), train_fn=rec)
    study = load(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "boom" in failed[0].user_attrs[ledger.FAIL_ATTR]
    assert res.completed == 3 and res.failed == 1 and len(ledger.read_evolve_csv(res.evolve_csv)[1]) == 3


def test_repeated_failures_stop_the_evolution(tmp_path):
    rec = Recorder(fail_on=set(range(100)))
    with pytest.raises(RuntimeError, match="in a row"):
        evolve(cfg_for(tmp_path, "evolve.max_consecutive_failures=2", generations=5), train_fn=rec)
    assert len(rec.cfgs) == 2


@pytest.mark.parametrize("strategy", ["tpe", "random", "qmc", "gp", "cmaes", "guided"])
def test_optuna_strategies_start_from_the_base_hyp(tmp_path, strategy):
    if strategy == "cmaes":
        pytest.importorskip("cmaes")
    rec = Recorder()
    res = evolve(cfg_for(tmp_path, f"evolve.strategy={strategy}", generations=3), train_fn=rec)
    assert {k: rec.cfgs[0].hyp[k] for k in SCRATCH_LOW} == SCRATCH_LOW
    assert res.completed == 3
    table = compose([]).evolve.space
    for c in rec.cfgs[1:]:
        for k, (gain, lo, hi) in table.items():
            assert lo <= c.hyp[k] <= hi
            if gain == 0:
                assert c.hyp[k] == SCRATCH_LOW[k]  # gain 0: never changed by any strategy


def test_weighted_parent(tmp_path, monkeypatch):
    """``evolve.parent=weighted`` reaches the parent selection of every mutated generation (and ``single`` is
    the default): ignoring the setting fails this test."""
    from evolve import mutation

    seen = []
    real = mutation.select_parent

    def spy(values, fit, rng, method="single", top=mutation.TOP_N):
        seen.append(method)
        return real(values, fit, rng, method=method, top=top)

    monkeypatch.setattr(mutation, "select_parent", spy)
    res = evolve(cfg_for(tmp_path / "w", "evolve.parent=weighted", generations=4), train_fn=fake_train)
    assert res.completed == 4
    assert seen and set(seen) == {"weighted"}
    seen.clear()
    evolve(cfg_for(tmp_path / "s", generations=4), train_fn=fake_train)
    assert seen and set(seen) == {"single"}


def test_seed_from_an_upstream_csv(tmp_path):
    from test_evolve_ledger import UPSTREAM_CSV

    src = tmp_path / "upstream.csv"
    src.write_text(UPSTREAM_CSV)
    rec = Recorder()
    res = evolve(cfg_for(tmp_path / "out", f"evolve.resume_from_csv={src}", generations=5), train_fn=rec)
    assert len(rec.cfgs) == 2  # 3 generations came from the file
    lines = Path(res.evolve_csv).read_text().splitlines()
    assert lines[:4] == UPSTREAM_CSV.splitlines() and len(lines) == 6


def test_own_csv_without_storage_continues(tmp_path):
    evolve(cfg_for(tmp_path, generations=3), train_fn=fake_train)
    (tmp_path / ledger.JOURNAL_NAME).unlink()
    rec = Recorder()
    res = evolve(cfg_for(tmp_path, generations=4), train_fn=rec)
    assert len(rec.cfgs) == 1 and res.completed == 4


def test_unknown_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="strategy"):
        evolve(cfg_for(tmp_path, "evolve.strategy=nelder"), train_fn=fake_train)
    with pytest.raises(Exception, match="gens"):
        cfg_for(tmp_path, "evolve.gens=3")


def test_mlflow_parent_with_one_child_per_generation(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "evo"
    over = ["mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "evolve.plot=true"]
    res = evolve(cfg_for(out, *over, generations=3), train_fn=fake_train)
    client = MlflowClient(uri)
    parent = client.get_run(res.mlflow_parent_run_id)
    assert parent.info.status == "FINISHED"
    assert load(out).user_attrs[PARENT_ATTR] == parent.info.run_id
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3 and all("hyp.lr0" in c.data.params for c in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"evolve.csv", "hyp_evolve.yaml", "evolve.png"} <= arts
    best = client.get_metric_history(parent.info.run_id, "best_fitness")
    assert [m.step for m in best] == [0, 1, 2]
    assert [m.value for m in best] == sorted(m.value for m in best)
    # a longer run continues the same parent
    res = evolve(cfg_for(out, *over[:2], generations=4), train_fn=fake_train)
    assert res.mlflow_parent_run_id == parent.info.run_id
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "best_fitness")] == [0, 1, 2, 3]
    assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 4
    assert CONFIG_ATTR in load(out).user_attrs


def test_sqlalchemy_storage(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    res = evolve(cfg_for(tmp_path / "out", f"evolve.storage='{url}'", generations=3), train_fn=fake_train)
    assert res.completed == 3 and res.storage == f"rdb:{url}"
    study = optuna.load_study(study_name="evolve", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    res = evolve(cfg_for(tmp_path / "out", f"evolve.storage='{url}'", generations=4), train_fn=fake_train)
    assert res.completed == 4


def test_each_worker_gets_its_own_device(tmp_path):
    from evolve.settings import Setup

    cfg = cfg_for(tmp_path, "evolve.workers=2", "evolve.devices=[cpu,'1']")
    setups = [Setup(cfg, worker=i) for i in range(3)]
    assert [s.device for s in setups] == ["cpu", "1", "cpu"]
    assert setups[1].train_cfg(setups[1].base, 7, "pid").device == "1"
    tcfg = setups[1].train_cfg(setups[1].base, 7, "pid")
    assert tcfg.mlflow.parent_run_id == "pid" and tcfg.name == "trial0007" and tcfg.noval and tcfg.nosave


def test_a_trial_started_past_the_budget_is_detected():
    from evolve.workers import over_budget

    study = optuna.create_study(direction="maximize")
    for v in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(value=v, state=TrialState.COMPLETE))
    a, b = study.ask(), study.ask()  # two machines raced for the last generation
    assert not over_budget(study, a.number, 3)
    assert over_budget(study, b.number, 3)
