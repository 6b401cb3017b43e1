"""Evolution strategies and fidelities at a real budget, on the embedded shapes dataset, on CPU (not part of CI).

    nice -n 5 python benchmarks/bench_evolve.py --jobs 2  # the full benchmark (about 100 min on 2 cores)
    python benchmarks/bench_evolve.py --quick             # a smoke test of the whole pipeline (about 2 min)
    python benchmarks/bench_evolve.py --report-only       # the tables again from the curves already measured

1. Once (cached in ``<out>/start``): yolov5n is trained from scratch on a shapes set (seed 0) with
   ``hyp=shapes-scratch``; its best.pt is the start checkpoint of every evolution.
2. For each strategy (mutation, guided, cmaes, tpe, gp, auto) x fidelity (``evolve.fidelity=full``: every generation
   trains ``epochs``; ``asha``: rungs of 1 and ``epochs`` epochs, the top third promoted by resuming its
   checkpoint) x seed, an evolution (``generations``, or ``asha_generations`` with asha: ledger rows, rungs
   included) fine-tunes the start checkpoint on another shapes set (seed 1) from ``--hyp`` as the base hyps
   (default ``scratch-low``, upstream's). Each runs in its own process with one torch thread (``--jobs`` at a
   time) and is cached in ``<out>/runs/<name>/curve.json``; an interrupted benchmark continues.
3. CPU time is the user + system time of the evolution's process (getrusage, the process and its children) from
   just before ``evolve()`` to the end of each generation's training, so it counts the samplers' own work and
   leaves out the interpreter start-up and imports. The best fitness so far counts only generations trained for the
   whole ``epochs`` (a short rung's fitness is not a result).
4. The table: per strategy x fidelity, the final best fitness (mean ± sd over seeds), the total CPU time, the CPU
   time to reach the target (the mean final best of the mutation search at full fidelity, i.e. upstream's search),
   and per seed the CPU time to reach that seed's mutation best as a fraction of that seed's mutation CPU time.
5. The generalisation check: the best generation of each strategy x fidelity (over its seeds) and the base hyps
   retrained for ``final_epochs`` (longer than the evolution's ``epochs``), fitness after that retrain.
6. ``--reeval K`` (the noise check): a generation's fitness is one draw of a noisy training, and an evolution's best
   is the luckiest of its draws. Each evolution's incumbent (its best full-schedule generation) at the end and at a
   quarter of that seed's mutation CPU time, and the base hyps, are trained again exactly as a generation is, with
   the training seeds 1..K (the evolution trains with seed 0): their mean is what those hyps are worth.

The tables are built in ``evolve_report.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve_report import (BASELINE, final_table, hyp_key, incumbent, quarter_mark, reeval_table,  # noqa: E402
                           report, write_curves_csv)

STRATEGIES = ("mutation", "guided", "cmaes", "tpe", "gp", "auto")
FIDELITIES = ("full", "asha")
FULL = dict(generations=40, asha_generations=60, epochs=3, final_epochs=9, imgsz=96, n_train=400, n_val=100,
            batch=16, seeds=[0, 1, 2], start_n_train=1000, start_epochs=10, start_imgsz=128)
QUICK = dict(generations=3, asha_generations=4, epochs=3, final_epochs=3, imgsz=64, n_train=32, n_val=16, batch=16,
             seeds=[0], start_n_train=64, start_epochs=2, start_imgsz=64)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its (waited-for) children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND="Agg", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1")
    return env


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import evolve.config  # noqa: F401  (registers the schemas)
    import yolo.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


# ---------------------------------------------------------------------------------------------------------------
# data and the start checkpoint
# ---------------------------------------------------------------------------------------------------------------


def make_data(folder: Path, seed: int, n_train: int, n_val: int) -> Path:
    """A shapes set (``generate_shapes`` is idempotent) and its data YAML."""
    from yolo.data.shapes import CLASS_NAMES, generate_shapes

    root = generate_shapes(folder, seed=seed, n_train=n_train, n_val=n_val)
    yaml = folder.with_suffix(".yaml")
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames: {list(CLASS_NAMES)}\n")
    return yaml


def start_spec(s: dict, out: Path) -> dict:
    return {"n_train": s["start_n_train"], "n_val": s["n_val"], "epochs": s["start_epochs"],
            "imgsz": s["start_imgsz"], "batch": s["batch"], "data_seed": 0, "out": str(out / "start")}


def ensure_start(s: dict, out: Path, threads: int) -> dict:
    """The start checkpoint: trained once, reused while its settings are unchanged."""
    spec = start_spec(s, out)
    info_path = out / "start" / "start.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("spec") == spec and Path(info["weights"]).is_file():
            print(f"start checkpoint: {info['weights']} (cached; mAP50 {info['map50']:.3f}, "
                  f"mAP50-95 {info['map']:.3f})", flush=True)
            return info
    print(f"start checkpoint: training yolov5n from scratch on {spec['n_train']} shapes images, "
          f"{spec['epochs']} epochs at imgsz {spec['imgsz']} ...", flush=True)
    run = out / "start" / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    with open(run.parent / "train.log", "w") as log:
        p = subprocess.run([sys.executable, __file__, "--_start", json.dumps(spec)], cwd=ROOT,
                           env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"training the start checkpoint failed; see {run.parent / 'train.log'}")
    info = json.loads(info_path.read_text())
    print(f"start checkpoint: {info['weights']}: mAP50 {info['map50']:.3f}, mAP50-95 {info['map']:.3f} "
          f"({info['cpu_s']:.0f} CPU-s, {info['wall_s']:.0f} s)", flush=True)
    return info


def _train_start(spec: dict) -> None:
    """Child process: train the start checkpoint."""
    import torch

    from yolo.train import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(spec["out"])
    data = make_data(out.parent / "data" / "start", spec["data_seed"], spec["n_train"], spec["n_val"])
    cfg = compose("train", ["model=yolov5n", "hyp=shapes-scratch", "data=external", f"data.file={data}",
                            f"imgsz={spec['imgsz']}", f"epochs={spec['epochs']}", f"batch_size={spec['batch']}",
                            "workers=0", "device=cpu", "noplots=true", "mlflow.enabled=false",
                            f"project={out}", "name=run"])
    t0, c0 = time.time(), cpu_seconds()
    res = train(cfg, save_dir=out / "run")
    weights = out / "start.pt"
    shutil.copyfile(res.best or res.last, weights)
    info = {"spec": spec, "weights": str(weights), "map50": res.map50, "map": res.map, "fitness": res.fitness,
            "cpu_s": cpu_seconds() - c0, "wall_s": time.time() - t0}
    (out / "start.json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# one evolution
# ---------------------------------------------------------------------------------------------------------------


def run_name(strategy: str, fidelity: str, seed: int) -> str:
    return f"{strategy}-{fidelity}-s{seed}"


def evolve_overrides(s: dict, evo_dir: Path, data_yaml: Path, weights: str, strategy: str, fidelity: str,
                     seed: int) -> list[str]:
    generations = s["asha_generations"] if fidelity == "asha" else s["generations"]
    return [f"evolve.out_dir={evo_dir}", f"generations={generations}", f"evolve.strategy={strategy}",
            f"evolve.seed={seed}", f"evolve.fidelity={fidelity}", "evolve.plot=false", "mlflow.enabled=false",
            "~model", f"weights={weights}", f"hyp={s['hyp']}", "data=external", f"data.file={data_yaml}",
            f"imgsz={s['imgsz']}", f"epochs={s['epochs']}", f"batch_size={s['batch']}", "workers=0", "device=cpu",
            "noautoanchor=true", "cache=ram"]


def _run_evolution(spec: dict) -> None:
    """Child process: one evolution, timed per generation; writes curve.json."""
    import optuna
    import torch

    from evolve import ledger
    from evolve.driver import evolve
    from yolo.train import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evo_dir = Path(spec["evo_dir"])
    shutil.rmtree(evo_dir, ignore_errors=True)  # a run interrupted earlier starts over, for a clean CPU count
    cfg = compose("evolve", spec["overrides"])
    ends: dict[str, float] = {}
    c0 = cpu_seconds()

    def timed_train(cfg, callbacks=(), save_dir=None):
        try:
            return train(cfg, callbacks=callbacks, save_dir=save_dir)
        finally:
            ends[str(cfg.name)] = cpu_seconds() - c0

    t0 = time.time()
    evolve(cfg, train_fn=timed_train)
    cpu_total, wall = cpu_seconds() - c0, time.time() - t0
    study = optuna.load_study(study_name="evolve", storage=ledger.open_storage(None, evo_dir))
    gens, best, full = [], -math.inf, int(cfg.epochs)
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        fit = float(t.value) if t.state == optuna.trial.TrialState.COMPLETE else None
        epochs = t.user_attrs.get("epochs")
        if fit is not None and epochs == full:  # a short rung's fitness does not count as a result
            best = max(best, fit)
        gens.append({"trial": t.number, "state": t.state.name, "fitness": fit, "best": best,
                     "cpu_s": round(ends.get(f"trial{t.number:04d}", math.nan), 3),
                     "epochs": epochs, "hyp": t.user_attrs.get("hyp")})
    curve = {k: spec[k] for k in ("name", "strategy", "fidelity", "seed", "settings")}
    curve.update(generations=gens, cpu_s=round(cpu_total, 3), wall_s=round(wall, 3),
                 process_cpu_s=round(cpu_seconds(), 3))
    (evo_dir.parent / "curve.json").write_text(json.dumps(curve, indent=1))


def run_one(spec: dict) -> dict | None:
    folder = Path(spec["evo_dir"]).parent
    curve_path = folder / "curve.json"
    if curve_path.exists():
        curve = json.loads(curve_path.read_text())
        if curve.get("settings") == spec["settings"]:
            return curve
    folder.mkdir(parents=True, exist_ok=True)
    curve_path.unlink(missing_ok=True)
    t0 = time.time()
    with open(folder / "evolve.log", "w") as log:
        p = subprocess.run([sys.executable, __file__, "--_run", json.dumps(spec)], cwd=ROOT, env=child_env(1),
                           stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0 or not curve_path.exists():
        print(f"  {spec['name']}: FAILED (exit {p.returncode}); see {folder / 'evolve.log'}", flush=True)
        return None
    curve = json.loads(curve_path.read_text())
    print(f"  {spec['name']}: best fitness {curve['generations'][-1]['best']:.4f}, {curve['cpu_s']:.0f} CPU-s "
          f"({time.time() - t0:.0f} s)", flush=True)
    return curve


# ---------------------------------------------------------------------------------------------------------------
# the generalisation check: the best hyps of each strategy x fidelity, and the base hyps, for the full schedule
# ---------------------------------------------------------------------------------------------------------------


def train_overrides(s: dict, data: Path, weights: str, epochs: int) -> list[str]:
    """A training of the start checkpoint on the evolution's data, as the evolutions' generations are set up."""
    return ["~model", f"weights={weights}", f"hyp={s['hyp']}", "data=external", f"data.file={data}",
            f"imgsz={s['imgsz']}", f"epochs={epochs}", f"batch_size={s['batch']}", "workers=0", "device=cpu",
            "noautoanchor=true", "cache=ram", "noval=true"]


def train_hyp(overrides: list[str], hyp: dict, save_dir: Path):
    """In a child process (one torch thread): train with ``overrides`` and the hyps ``hyp`` into a fresh
    ``save_dir``; returns the training's results."""
    import torch

    from yolo.train import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose("train", [*overrides, f"project={save_dir.parent}", f"name={save_dir.name}", "noplots=true",
                            "mlflow.enabled=false"])
    for k, v in hyp.items():
        if k in cfg.hyp:
            cfg.hyp[k] = v
    shutil.rmtree(save_dir, ignore_errors=True)
    return train(cfg, save_dir=save_dir)


def _retrain(spec: dict) -> None:
    """Child process: train the start checkpoint on the evolution's data with given hyps for ``epochs``."""
    c0 = cpu_seconds()
    res = train_hyp(spec["overrides"], spec["hyp"], Path(spec["out"]) / "run")
    info = {"fitness": res.fitness, "map50": res.map50, "map": res.map, "cpu_s": cpu_seconds() - c0}
    (Path(spec["out"]) / "final.json").write_text(json.dumps({**spec, **info}, indent=1))


def generalisation(s: dict, out: Path, curves: list[dict], data: Path, weights: str, jobs: int,
                   train_seeds: int = 1) -> list[dict]:
    """Retrain the best hyps of each strategy x fidelity (best over seeds) and the base hyps for
    ``final_epochs``, with the training seeds 0..train_seeds-1; cached in ``<out>/final/<name>[-seed<k>]/final.json``."""
    picks: dict[str, dict] = {}
    for c in curves:
        full = [g for g in c["generations"] if g["fitness"] is not None and g["epochs"] == s["epochs"]]
        if not full:
            continue
        g = max(full, key=lambda g: g["fitness"])
        name = f"{c['strategy']}-{c['fidelity']}"
        if name not in picks or g["fitness"] > picks[name]["evolved"]:
            picks[name] = {"evolved": g["fitness"], "hyp": g["hyp"], "seed": c["seed"]}
        if g["hyp"] is not None and "base" not in picks:
            base_row = c["generations"][0]  # generation 1: the base hyps
            picks["base"] = {"evolved": base_row["fitness"], "hyp": base_row["hyp"], "seed": None}
    train_ov = train_overrides(s, data, weights, s["final_epochs"])

    def one(item: tuple[str, dict, int]) -> dict | None:
        name, pick, seed = item
        folder = out / "final" / (name if seed == 0 else f"{name}-seed{seed}")
        done = folder / "final.json"
        ov = train_ov if seed == 0 else [*train_ov, f"seed={seed}"]
        spec = {"name": name, "hyp": pick["hyp"] or {}, "overrides": ov, "out": str(folder),
                "evolved": pick["evolved"], "seed": pick["seed"], "train_seed": seed}
        if done.exists():
            old = json.loads(done.read_text())
            if old.get("hyp") == spec["hyp"] and old.get("overrides") == ov:
                return {"train_seed": 0, **old}
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.log", "w") as log:
            subprocess.run([sys.executable, __file__, "--_final", json.dumps(spec)], cwd=ROOT, env=child_env(1),
                           stdout=log, stderr=subprocess.STDOUT)
        return json.loads(done.read_text()) if done.exists() else None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        items = [(name, pick, k) for name, pick in sorted(picks.items()) for k in range(max(1, train_seeds))]
        return [r for r in pool.map(one, items) if r is not None]


# ---------------------------------------------------------------------------------------------------------------
# the noise check: incumbents trained again with other training seeds
# ---------------------------------------------------------------------------------------------------------------


def _reeval(spec: dict) -> None:
    """Child process: one hyp set trained as a generation is, once per training seed; writes reeval.json."""
    out, done = Path(spec["out"]), Path(spec["out"]) / "reeval.json"
    old = json.loads(done.read_text()) if done.exists() else {}
    same = all(old.get(f) == spec[f] for f in ("hyp", "overrides"))
    runs = [r for r in old.get("runs", []) if r["seed"] in spec["seeds"]] if same else []
    for seed in sorted(set(spec["seeds"]) - {r["seed"] for r in runs}):
        c0 = cpu_seconds()
        res = train_hyp([*spec["overrides"], f"seed={seed}"], spec["hyp"], out / f"seed{seed}")
        runs.append({"seed": seed, "fitness": res.fitness, "cpu_s": cpu_seconds() - c0})
        shutil.rmtree(out / f"seed{seed}", ignore_errors=True)
        done.write_text(json.dumps({**spec, "runs": sorted(runs, key=lambda r: r["seed"])}, indent=1))  # so far
    done.write_text(json.dumps({**spec, "runs": sorted(runs, key=lambda r: r["seed"])}, indent=1))


def reevaluate(s: dict, out: Path, curves: list[dict], data: Path, weights: str, jobs: int, k: int) -> dict:
    """Train each evolution's final and quarter-mark incumbents and the base hyps again with the training seeds
    1..k; cached per hyp set in ``<out>/reeval/<hash>/reeval.json``. Returns {hyp hash: [fitness per seed]}."""
    base = {c["seed"]: c for c in curves if (c["strategy"], c["fidelity"]) == BASELINE}
    hyps: dict[str, dict] = {}
    for c in curves:
        for limit in (math.inf, quarter_mark(c, base)):
            g = incumbent(c, s["epochs"], limit)
            if g is not None:
                hyps[hyp_key(g["hyp"])] = g["hyp"]
        if c["generations"] and c["generations"][0]["hyp"] is not None:  # generation 1: the base hyps
            hyps.setdefault("base", c["generations"][0]["hyp"])
    seeds = list(range(1, k + 1))
    train_ov = [*train_overrides(s, data, weights, s["epochs"]), "nosave=true"]

    def one(item: tuple[str, dict]) -> tuple[str, list[float]] | None:
        key, hyp = item
        folder = out / "reeval" / key
        done = folder / "reeval.json"
        spec = {"hyp": hyp, "seeds": seeds, "overrides": train_ov, "out": str(folder)}
        if done.exists():  # seeds already trained are kept; the child trains the others
            old = json.loads(done.read_text())
            if all(old.get(f) == spec[f] for f in ("hyp", "seeds", "overrides")):
                return key, [r["fitness"] for r in old["runs"]]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.log", "w") as log:
            subprocess.run([sys.executable, __file__, "--_reeval", json.dumps(spec)], cwd=ROOT, env=child_env(1),
                           stdout=log, stderr=subprocess.STDOUT)
        return (key, [r["fitness"] for r in json.loads(done.read_text())["runs"]]) if done.exists() else None

    print(f"noise check: {len(hyps)} hyp sets x {k} training seeds ...", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(r for r in pool.map(one, sorted(hyps.items())) if r is not None)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke test of the whole pipeline")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench_evolve[_quick]")
    ap.add_argument("--jobs", type=int, default=2, help="evolutions run at a time (one torch thread each)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--fidelities", nargs="+", default=list(FIDELITIES))
    ap.add_argument("--report-only", action="store_true", help="only tabulate the curves already measured")
    ap.add_argument("--no-final", action="store_true", help="skip the full-schedule retrains")
    ap.add_argument("--hyp", default="scratch-low", help="the base hyps of every evolution (conf/hyp/)")
    ap.add_argument("--final-seeds", type=int, default=1, metavar="N",
                    help="the full-schedule retrains with the training seeds 0..N-1 (paired with the base hyps)")
    ap.add_argument("--reeval", type=int, default=0, metavar="K",
                    help="the noise check: train the incumbents and the base hyps again with K other training seeds")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, nargs="+" if isinstance(v, list) else None,
                        default=None, help=f"default {v} ({QUICK[k]} with --quick)")
    ap.add_argument("--_start", help=argparse.SUPPRESS)
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    ap.add_argument("--_final", help=argparse.SUPPRESS)
    ap.add_argument("--_reeval", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._start:
        return _train_start(json.loads(a._start))
    if a._run:
        return _run_evolution(json.loads(a._run))
    if a._final:
        return _retrain(json.loads(a._final))
    if a._reeval:
        return _reeval(json.loads(a._reeval))

    s = dict(QUICK if a.quick else FULL, hyp=a.hyp)
    s.update({k: getattr(a, k) for k in FULL if getattr(a, k) is not None})
    out = (a.out or ROOT / "runs" / ("bench_evolve_quick" if a.quick else "bench_evolve")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in s.items() if k not in ("seeds", "final_epochs")}
    t0, c0 = time.time(), cpu_seconds()
    start = ensure_start(s, out, threads=max(1, a.jobs))
    data = make_data(out / "data" / "evolve", 1, s["n_train"], s["n_val"])
    settings["start"] = start["spec"]
    if not a.report_only:
        specs = []
        for seed in s["seeds"]:
            for st in a.strategies:
                for fi in a.fidelities:
                    name = run_name(st, fi, seed)
                    evo_dir = out / "runs" / name / "evo"
                    specs.append({"name": name, "strategy": st, "fidelity": fi, "seed": seed, "settings": settings,
                                  "evo_dir": str(evo_dir), "overrides": evolve_overrides(
                                      s, evo_dir, data, start["weights"], st, fi, seed)})
        print(f"{len(specs)} evolutions of {s['generations']} generations ({s['asha_generations']} with asha) x "
              f"{s['epochs']} epochs ({s['n_train']} images at imgsz {s['imgsz']}), {a.jobs} at a time; results in "
              f"{out}", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            curves = [c for c in pool.map(run_one, specs) if c is not None]
        print(f"evolutions done in {time.time() - t0:.0f} s wall, {cpu_seconds() - c0:.0f} CPU-s", flush=True)
    else:
        curves = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/curve.json"))]
        curves = [c for c in curves if c["seed"] in s["seeds"] and c.get("settings") == settings]

    table, summary = report(curves, a.strategies, a.fidelities)
    finals = [] if a.no_final else generalisation(s, out, curves, data, start["weights"], a.jobs, a.final_seeds)
    ftable = final_table(finals, s) if finals else ""
    values = reevaluate(s, out, curves, data, start["weights"], a.jobs, a.reeval) if a.reeval > 0 else {}
    ntable = reeval_table(s, curves, values, a.strategies, a.fidelities) if values else ""
    (out / "results.json").write_text(json.dumps({"settings": settings, "seeds": s["seeds"], "summary": summary,
                                                  "final": finals, "reeval": values, "curves": curves}, indent=1))
    write_curves_csv(out / "curves.csv", curves)
    (out / "table.md").write_text("\n\n".join(t for t in (table, ftable, ntable) if t) + "\n")
    print("\n" + "\n\n".join(t for t in (table, ftable, ntable) if t))
    if summary["target"] is not None:
        fast = [r for r in summary["rows"] if (r["strategy"], r["fidelity"]) != BASELINE and r["per_seed_ratio"]
                and all(v is not None and v <= 0.25 for v in r["per_seed_ratio"].values())]
        print("\nReaches the mutation search's final best in at most a quarter of its CPU time on every seed: "
              + (", ".join(f"{r['strategy']}/{r['fidelity']}" for r in fast) if fast else "none"))
    print(f"\ncurves: {out / 'curves.csv'}, {out / 'results.json'}; wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
