"""Evolution cost: asha's rungs and promotions (resumed, never retrained; SIGKILL mid-promotion, 2 workers), warm
starts from an upstream-format and from our own evolve.csv, the auto strategy's switch, and the trainer's
``stop_epoch`` pause that promotions resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evolve import fidelity, ledger
from evolve.driver import evolve
from evolve.fidelity import Candidate, Rungs, choose_promotion
from evolve.formats import FIELD_WIDTH, METRIC_KEYS
from evolve.rows import is_warm
from evolve.samplers import AUTO_ATTR
from fake_train import compose, fake_train

REPO = Path(__file__).resolve().parents[1]


def cfg_for(out: Path, *overrides: str, generations: int = 4, epochs: int = 9):
    return compose([f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false",
                    "evolve.plot=false", f"epochs={epochs}", "model=yolov5n", *overrides])


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, out))


def trained_log(path: Path) -> list[tuple[str, int, str, bool]]:
    rows = []
    for line in path.read_text().splitlines():
        name, trained, stop, resumed = line.split()
        rows.append((name, int(trained), stop, resumed == "True"))
    return rows


# ---- the rule ---------------------------------------------------------------------------------------------------

def test_rungs_grow_by_eta_up_to_the_schedule():
    assert Rungs.make(9, 1, 3).budgets == (1, 3, 9)
    assert Rungs.make(10, 1, 3).budgets == (1, 3, 9, 10)
    assert Rungs.make(8, 2, 2).budgets == (2, 4, 8)
    assert Rungs.make(3, 3, 3).budgets == (3,)
    r = Rungs.make(9, 1, 3)
    assert [r.stop_epoch(k) for k in range(3)] == [1, 3, None]
    with pytest.raises(Exception, match="min_epochs"):
        Rungs.make(3, 4, 3)


def test_promotion_takes_the_top_third_of_the_highest_rung_first():
    r = Rungs.make(9, 1, 3)
    c = [Candidate(i, 0, v, False, True) for i, v in enumerate([0.1, 0.5, 0.3])]
    assert choose_promotion(c[:2], r) is None  # 2 // 3 = 0 may go up
    assert choose_promotion(c, r).number == 1
    c[1] = Candidate(1, 0, 0.5, True, True)  # promoted already
    assert choose_promotion(c, r) is None
    more = c + [Candidate(3, 0, 0.4, False, True), Candidate(4, 0, 0.2, False, True),
                Candidate(5, 0, 0.0, False, True), Candidate(6, 1, 0.7, False, True),
                Candidate(7, 1, 0.6, False, True), Candidate(8, 1, 0.9, False, True)]
    assert choose_promotion(more, r).number == 8  # rung 1 before rung 0
    gone = [x if x.number != 8 else Candidate(8, 1, 0.9, False, False) for x in more]
    assert choose_promotion(gone, r).number == 3  # no checkpoint left: the next best of rung 0 instead
    top = [Candidate(i, 2, 0.9, False, True) for i in range(6)]
    assert choose_promotion(top, r) is None  # the last rung goes nowhere


# ---- asha end to end (a fake trainer whose checkpoints count the epochs trained since scratch) -----------------

def test_asha_promotes_and_resumes_without_retraining(tmp_path, monkeypatch):
    log = tmp_path / "trained.log"
    monkeypatch.setenv("YOLO_FAKE_TRAIN_LOG", str(log))
    res = evolve(cfg_for(tmp_path / "ev", "evolve.fidelity=asha", "evolve.strategy=tpe", generations=24),
                 train_fn=fake_train)
    study = load(tmp_path / "ev")
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(trials) == 24 == res.generations
    by_number = {t.number: t for t in trials}
    promoted = [t for t in trials if fidelity.parent_of(t) is not None]
    assert promoted and any(fidelity.rung_of(t) == 2 for t in promoted)
    calls = {name: (trained, stop, resumed) for name, trained, stop, resumed in trained_log(log)}
    for t in trials:
        rung, name = fidelity.rung_of(t), f"trial{t.number:04d}"
        assert t.user_attrs["epochs"] == (1, 3, 9)[rung]
        trained, stop, resumed = calls[name]
        assert stop == ("1", "3", "None")[rung] and resumed == (rung > 0)
        assert trained == (1, 3, 9)[rung]  # epochs since scratch add up: a promotion continues, never restarts
        if rung:
            parent = by_number[fidelity.parent_of(t)]
            assert fidelity.rung_of(parent) == rung - 1 and parent.params == t.params
    assert len({fidelity.parent_of(t) for t in promoted}) == len(promoted)  # each generation promoted once
    # evolve.csv: upstream's columns, then ours; the best is chosen among the full-schedule generations
    header = Path(res.evolve_csv).read_text().splitlines()[0].split(",")
    assert [h.strip() for h in header[:7]] == list(METRIC_KEYS) and header[-1].strip() == "epochs"
    assert all(len(h) == FIELD_WIDTH for h in header)
    _, rows = ledger.read_evolve_csv(res.evolve_csv)
    assert rows[res.best_generation].extra["epochs"] == 9
    assert res.best_fitness == pytest.approx(max(r.fitness for r in rows if r.extra["epochs"] == 9), rel=1e-4)
    # the checkpoints kept for promotions are gone once the evolution is over
    assert not list((tmp_path / "ev" / "generations").glob("*/weights/last.pt"))


def test_full_fidelity_keeps_upstreams_columns_only(tmp_path):
    res = evolve(cfg_for(tmp_path, generations=3, epochs=2), train_fn=fake_train)
    header = [h.strip() for h in Path(res.evolve_csv).read_text().splitlines()[0].split(",")]
    assert "epochs" not in header and header[:7] == list(METRIC_KEYS)


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_evolve.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "tests"), **env})


def _asha_args(out: Path, generations: int, *extra: str) -> list[str]:
    return [f"evolve.out_dir={out}", f"generations={generations}", "mlflow.enabled=false", "evolve.plot=false",
            "evolve.poll_s=0.2", "epochs=3", "model=yolov5n", "evolve.fidelity=asha",
            "evolve.train_fn=fake_train:fake_train", *extra]


def test_asha_survives_sigkill_mid_promotion_and_a_rerun(tmp_path):
    out, markers, log = tmp_path / "ev", tmp_path / "markers", tmp_path / "trained.log"
    # rungs 1, 3 epochs: after 3 first-rung generations, the 4th call is the promotion of the best; it hangs
    env = {"YOLO_FAKE_TRAIN_MARKERS": str(markers), "YOLO_FAKE_TRAIN_HANG_AT": "3", "YOLO_FAKE_TRAIN_LOG": str(log)}
    proc = _launch(_asha_args(out, 8), env)
    deadline = time.time() + 120
    while not (markers / ".hanging").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    hanging = (markers / ".hanging").read_text().split()[1]
    study = load(out)
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert [f"trial{t.number:04d}" for t in running] == [hanging] and fidelity.parent_of(running[0]) is not None
    parent = fidelity.parent_of(running[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    rerun = _launch(_asha_args(out, 8), env)
    text = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, text[-3000:]
    study = load(out)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 8
    children = [t for t in done if fidelity.parent_of(t) == parent]
    assert len(children) == 1  # the killed promotion was retried once, from the same checkpoint
    calls = {name: trained for name, trained, _, _ in trained_log(log)}
    for t in done:
        assert calls[f"trial{t.number:04d}"] == (1, 3)[fidelity.rung_of(t)]  # nothing trained twice


def test_asha_with_two_workers(tmp_path):
    out, log = tmp_path / "ev", tmp_path / "trained.log"
    proc = _launch(_asha_args(out, 12, "evolve.workers=2", "evolve.strategy=cmaes"),
                   {"YOLO_FAKE_TRAIN_LOG": str(log), "YOLO_FAKE_TRAIN_SLEEP": "0.2"})
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, text[-3000:]
    study = load(out)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 12
    promoted = [t for t in done if fidelity.parent_of(t) is not None]
    assert promoted and len({fidelity.parent_of(t) for t in promoted}) == len(promoted)
    calls = {name: trained for name, trained, _, _ in trained_log(log)}
    assert all(calls[f"trial{t.number:04d}"] == (1, 3)[fidelity.rung_of(t)] for t in done)


# ---- warm starts ------------------------------------------------------------------------------------------------

def _upstream_csv(path: Path, hyps: list[dict[str, float]], fitnesses: list[float]) -> Path:
    """An evolve.csv as upstream writes it: padded fields, upstream's 28 hyp columns (plus anchors)."""
    from test_evolve_driver import SCRATCH_LOW

    keys = list(METRIC_KEYS) + list(SCRATCH_LOW) + ["anchors"]
    lines = [",".join(f"{k:>20s}" for k in keys)]
    for hyp, fit in zip(hyps, fitnesses):
        vals = [0.5, 0.5, fit, fit, 0.01, 0.01, 0.01] + [hyp.get(k, v) for k, v in SCRATCH_LOW.items()] + [3.0]
        lines.append(",".join(f"{v:20.5g}" for v in vals))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_warm_start_from_an_upstream_csv_enters_the_history_not_the_budget(tmp_path):
    hyps = [{"lr0": 0.02, "momentum": 0.9, "mosaic": 0.8}, {"lr0": 0.005}, {"lr0": 0.015, "box": 0.08}]
    csv = _upstream_csv(tmp_path / "upstream.csv", hyps, [0.5, 0.1, 0.3])
    res = evolve(cfg_for(tmp_path / "ev", f"evolve.warm_start=[{csv}]", generations=4, epochs=2),
                 train_fn=fake_train)
    study = load(tmp_path / "ev")
    warm = [t for t in study.get_trials() if is_warm(t)]
    assert len(warm) == 3 and res.generations == 4 and res.completed == 4
    _, rows = ledger.read_evolve_csv(res.evolve_csv)
    assert len(rows) == 4  # this evolution's generations only
    assert rows[0].hyp["lr0"] == 0.01  # generation 1 is still the base hyps
    # the mutation search draws its parents from the history: warm rows included (the best is lr0 0.02)
    from evolve.samplers import MutationSampler, trial_history
    values, fit = trial_history(study.get_trials(states=(TrialState.COMPLETE,)), ["lr0"], {})
    assert len(fit) == 7 and 0.02 in values[:, 0]
    assert isinstance(MutationSampler, type)


def test_warm_start_from_our_own_evolution_folder(tmp_path):
    first = evolve(cfg_for(tmp_path / "low", "evolve.fidelity=asha", "evolve.eta=2", generations=6, epochs=2),
                   train_fn=fake_train)
    res = evolve(cfg_for(tmp_path / "full", f"evolve.warm_start=[{tmp_path / 'low'}]", "evolve.strategy=tpe",
                         generations=3, epochs=2), train_fn=fake_train)
    study = load(tmp_path / "full")
    warm = [t for t in study.get_trials() if is_warm(t)]
    assert len(warm) == first.generations == 6
    assert sorted(t.user_attrs["epochs"] for t in warm)[0] == 1  # the budget each row got is kept
    assert res.generations == 3


def test_warm_start_of_a_missing_source_fails_clearly(tmp_path):
    with pytest.raises(Exception, match="warm_start.*nothing-here"):
        evolve(cfg_for(tmp_path / "ev", f"evolve.warm_start=[{tmp_path / 'nothing-here'}]", generations=1),
               train_fn=fake_train)


# ---- auto -------------------------------------------------------------------------------------------------------

def test_auto_switches_from_gp_to_cmaes_at_its_threshold(tmp_path):
    evolve(cfg_for(tmp_path, "evolve.strategy=auto", "evolve.auto_switch=4", generations=8, epochs=2),
           train_fn=fake_train)
    trials = sorted(load(tmp_path).get_trials(), key=lambda t: t.number)
    phases = [t.system_attrs.get(AUTO_ATTR) for t in trials]
    assert phases[0] is None  # generation 1: the base hyps, queued, sampled by no one
    assert phases[1:4] == ["gp"] * 3 and phases[4:] == ["cmaes"] * 4, phases
    # CMA-ES starts at the best of the GP's generations (its first sample is near it, not at the base)
    best = max(trials[:4], key=lambda t: t.value)
    assert trials[4].params != trials[0].params and best.value >= trials[0].value


# ---- the trainer's pause --------------------------------------------------------------------------------------

def test_stop_epoch_pauses_and_a_resume_continues_the_schedule(tiny_shapes, tmp_path):
    from helpers import compose as compose_train
    from helpers import train_overrides

    from yolo.checkpoint import load_checkpoint
    from yolo.errors import ConfigError
    from yolo.train import train

    ov = train_overrides(tiny_shapes, tmp_path, "epochs=3", "imgsz=64", "mlflow.enabled=false", "noplots=true")
    first = train(compose_train("train", [*ov, "stop_epoch=1"]))
    assert first.paused and first.epochs_completed == 1
    ckpt = load_checkpoint(first.last)
    assert ckpt.epoch == 0 and ckpt.optimizer is not None  # resumable, not stripped
    with pytest.raises(ConfigError, match="stop_epoch=1"):
        train(compose_train("train", [*ov, f"resume={first.last}", "stop_epoch=1"]))
    second = train(compose_train("train", [*ov, f"resume={first.last}"]))
    assert not second.paused and second.epochs_completed == 3
    assert len(second.history) == 2  # epochs 1 and 2 only: the first was not trained again
    lines = (Path(second.save_dir) / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 4
    # a promotion is the uninterrupted run: float32 weights at the pause and the accumulation phase carried on
    straight = train(compose_train("train", ov))
    assert straight.epochs_completed == 3
    assert [h["train/box_loss"] for h in second.history] == [h["train/box_loss"] for h in straight.history[1:]]
    assert (second.map50, second.map) == (straight.map50, straight.map)


# ---- the generalisation check -----------------------------------------------------------------------------------

def test_final_train_retrains_best_and_base_for_the_full_schedule(tmp_path, monkeypatch):
    import json

    log = tmp_path / "trained.log"
    monkeypatch.setenv("YOLO_FAKE_TRAIN_LOG", str(log))
    res = evolve(cfg_for(tmp_path / "ev", "evolve.fidelity=asha", "evolve.final_train=true", "evolve.final_epochs=12",
                         generations=8), train_fn=fake_train)
    check = json.loads((tmp_path / "ev" / "final_train.json").read_text())
    assert res.final is not None and check["best"]["epochs"] == check["base"]["epochs"] == 12
    assert check["gain"] == pytest.approx(res.final.best.fitness - res.final.base.fitness)
    calls = trained_log(log)[-2:]
    assert [c[0] for c in calls] == ["best", "base"] and all(c[1] == 12 and not c[3] for c in calls)
    assert res.final.best.fitness >= res.final.base.fitness  # fake_train: the search moves towards its peak


def seed_noisy_train(cfg, callbacks=(), save_dir=None):
    """fake_train plus a seed-dependent shift of its mAPs (a fine-tune's luck), recorded per call."""
    res = fake_train(cfg, callbacks=callbacks, save_dir=save_dir)
    shift = (0.0, 0.05, -0.04, 0.03)[int(cfg.seed) % 4] if str(cfg.name).startswith(("best", "base")) else 0.0
    res.map, res.map50 = res.map + shift, min(1.0, res.map50 + shift)
    seed_noisy_train.calls.append((str(cfg.name), int(cfg.seed), int(cfg.epochs), str(save_dir)))
    return res


seed_noisy_train.calls = []


def test_final_seeds_train_each_side_per_seed_paired(tmp_path):
    import json

    seed_noisy_train.calls.clear()
    res = evolve(cfg_for(tmp_path / "ev", "evolve.final_train=true", "evolve.final_epochs=12", "evolve.final_seeds=3",
                         "seed=5", generations=12), train_fn=seed_noisy_train)
    calls = seed_noisy_train.calls[-6:]
    assert [(c[0], c[1], c[2]) for c in calls] == [("best", 5, 12), ("base", 5, 12), ("best-seed6", 6, 12),
                                                   ("base-seed6", 6, 12), ("best-seed7", 7, 12), ("base-seed7", 7, 12)]
    assert len({c[3] for c in calls}) == 6  # each retrain has its own folder
    check = json.loads((tmp_path / "ev" / "final_train.json").read_text())
    assert check["seeds"] == [5, 6, 7] and len(check["best_runs"]) == len(check["base_runs"]) == 3
    best = [r["fitness"] for r in check["best_runs"]]
    base = [r["fitness"] for r in check["base_runs"]]
    assert check["best"]["fitness"] == pytest.approx(sum(best) / 3)
    assert check["gain"] == pytest.approx(sum(b - a for b, a in zip(best, base)) / 3)
    assert check["gain_se"] == pytest.approx(0.0, abs=1e-12)  # paired: the seed's shift is the same on both sides
    assert check["gain"] > 0 and check["best_fitness_sd"] > 0.01 and check["verdict"] == "the evolution paid off"
    assert res.final.seeds == [5, 6, 7]


def test_final_check_verdict_allows_for_the_seed_noise():
    from evolve.final import FinalCheck, FinalRun, paired_gain

    def runs(label, fits):
        return [FinalRun(label, f, 0, 0, 0, f, 3, 1.0, f"/x/{label}{i}", None, i) for i, f in enumerate(fits)]

    assert paired_gain([0.3, 0.5], [0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.1))
    noisy = FinalCheck(runs("best", [0.30, 0.10, 0.26]), runs("base", [0.20, 0.20, 0.20]))  # gain +0.02, se 0.06
    assert noisy.gain == pytest.approx(0.02) and noisy.verdict().startswith("within the seed-to-seed noise")
    clear = FinalCheck(runs("best", [0.30, 0.31, 0.29]), runs("base", [0.20, 0.22, 0.19]))
    assert clear.verdict() == "the evolution paid off"
    worse = FinalCheck(runs("best", [0.10, 0.11, 0.09]), runs("base", [0.20, 0.22, 0.19]))
    assert worse.verdict() == "the evolved hyps do NOT beat the base hyps"
    one = FinalCheck(runs("best", [0.25]), runs("base", [0.20]))  # one pair: no noise estimate, the sign decides
    assert one.gain_se is None and one.verdict() == "the evolution paid off" and one.as_dict()["best_fitness_sd"] is None
    assert one.best.save_dir == "/x/best0" and noisy.best.fitness == pytest.approx(0.22)


def test_final_check_rerun_reuses_finished_retrains_and_distrusts_bad_records(tmp_path):
    import json

    out = tmp_path / "ev"
    args = ("evolve.final_train=true", "evolve.final_epochs=12", "evolve.final_seeds=2")
    seed_noisy_train.calls.clear()
    first = evolve(cfg_for(out, *args, generations=5), train_fn=seed_noisy_train)
    finals = [c[0] for c in seed_noisy_train.calls if c[0].startswith(("best", "base"))]
    assert finals == ["best", "base", "best-seed1", "base-seed1"]
    seed_noisy_train.calls.clear()
    evolve(cfg_for(out, *args, generations=5), train_fn=seed_noisy_train)
    assert seed_noisy_train.calls == []  # a rerun of a finished evolution trains nothing again

    # a kill during the check: one retrain's record is gone, another's is torn, a third lies about its folder
    (out / "final" / "base-seed1" / "final_run.json").unlink()
    (out / "final" / "best-seed1" / "final_run.json").write_text('{"config": "')
    rec = out / "final" / "base" / "final_run.json"
    data = json.loads(rec.read_text())
    data["run"]["save_dir"] = "/etc"
    rec.write_text(json.dumps(data))
    seed_noisy_train.calls.clear()
    again = evolve(cfg_for(out, *args, generations=5), train_fn=seed_noisy_train)
    assert [c[0] for c in seed_noisy_train.calls] == ["best-seed1", "base-seed1"]  # the others are reused
    assert again.final.as_dict()["best_runs"] == first.final.as_dict()["best_runs"]
    assert again.final.base_runs[0].save_dir == str(out / "final" / "base")  # the folder is ours, not the record's

    # a record whose figures are not numbers, and another config (a longer schedule), are trained again
    rec = out / "final" / "best" / "final_run.json"
    data = json.loads(rec.read_text())
    data["run"]["fitness"] = "NaN"
    rec.write_text(json.dumps(data))
    seed_noisy_train.calls.clear()
    evolve(cfg_for(out, *args, generations=5), train_fn=seed_noisy_train)
    assert [c[0] for c in seed_noisy_train.calls] == ["best"]
    seed_noisy_train.calls.clear()
    evolve(cfg_for(out, "evolve.final_train=true", "evolve.final_epochs=15", "evolve.final_seeds=2", generations=5),
           train_fn=seed_noisy_train)
    assert [c[0] for c in seed_noisy_train.calls] == ["best", "base", "best-seed1", "base-seed1"]
