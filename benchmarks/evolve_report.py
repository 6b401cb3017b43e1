"""The tables of ``bench_evolve.py``, from its curves and retrains (no training; only ``write_curves_csv`` writes).

- :func:`report`: per strategy x fidelity, the final best, CPU totals, the CPU to the mutation search's final best;
- :func:`final_table`: the full-schedule retrains, paired with the base hyps per training seed;
- :func:`reeval_table`: the noise check, the incumbents' recorded fitness against their worth over other seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from evolve.final import paired_gain

BASELINE = ("mutation", "full")  # the search whose final best fitness is the target


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def time_to(curve: dict, target: float) -> float | None:
    """Cumulative CPU time at the first generation whose best full-schedule fitness so far reaches ``target``."""
    for g in curve["generations"]:
        if g["best"] >= target - 1e-9:
            return g["cpu_s"]
    return None


def final_best(curve: dict) -> float:
    return curve["generations"][-1]["best"] if curve["generations"] else 0.0


def report(curves: list[dict], strategies: list[str], fidelities: list[str]) -> tuple[str, dict]:
    """The table: per strategy x fidelity, the final best, CPU totals, CPU to the mutation search's final best
    (mean of seeds) and, per seed, the CPU to that seed's mutation best as a fraction of that seed's mutation CPU."""
    groups = {(st, fi): [c for c in curves if c["strategy"] == st and c["fidelity"] == fi]
              for st in strategies for fi in fidelities}
    base = {c["seed"]: c for c in groups.get(BASELINE) or []}
    target = statistics.mean(final_best(c) for c in base.values()) if base else None
    base_cpu = statistics.mean(c["cpu_s"] for c in base.values()) if base else None
    lines = [f"Target: {target:.4f} (mean final best fitness of the mutation search, full fidelity); its mean "
             f"total CPU time {base_cpu:.0f} s." if target is not None else "No mutation/full runs: no target.", "",
             "| strategy | fidelity | final best fitness (mean ± sd) | CPU total (s) | CPU to target (s) | reached | "
             "CPU to target / mutation's total | per seed: CPU to that seed's mutation best / its CPU |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {"target": target, "baseline_cpu_s": base_cpu, "rows": []}
    for (st, fi), cs in groups.items():
        if not cs:
            continue
        finals = [final_best(c) for c in cs]
        cpu = statistics.mean(c["cpu_s"] for c in cs)
        hits = [t for t in (time_to(c, target) for c in cs) if t is not None] if target is not None else []
        ttt = statistics.mean(hits) if hits else None
        ratio = ttt / base_cpu if ttt is not None and base_cpu else None
        per_seed = {}
        for c in cs:
            b = base.get(c["seed"])
            if b is not None:
                t = time_to(c, final_best(b))
                per_seed[c["seed"]] = None if t is None else t / b["cpu_s"]
        shown = ", ".join("—" if r is None else f"{r:.2f}" for _, r in sorted(per_seed.items()))
        lines.append(f"| {st} | {fi} | {_mean_sd(finals)} | {cpu:.0f} | {f'{ttt:.0f}' if ttt is not None else '—'} "
                     f"| {len(hits)}/{len(cs)} | {f'{ratio:.2f}' if ratio is not None else '—'} | {shown} |")
        summary["rows"].append({"strategy": st, "fidelity": fi, "final_best": finals, "cpu_s": cpu,
                                "cpu_to_target_s": ttt, "reached": len(hits), "runs": len(cs), "ratio": ratio,
                                "per_seed_ratio": per_seed})
    return "\n".join(lines), summary


def write_curves_csv(path: Path, curves: list[dict]) -> None:
    rows = ["strategy,fidelity,seed,generation,trial,state,epochs,fitness,best_fitness,cpu_s"]
    for c in curves:
        for i, g in enumerate(c["generations"]):
            fit = "" if g["fitness"] is None else f"{g['fitness']:.6g}"
            rows.append(f"{c['strategy']},{c['fidelity']},{c['seed']},{i},{g['trial']},{g['state']},{g['epochs']},"
                        f"{fit},{g['best']:.6g},{g['cpu_s']:.3f}")
    path.write_text("\n".join(rows) + "\n")


def final_table(finals: list[dict], s: dict) -> str:
    """Per hyp set: its fitness in the evolution, after the retrain (mean ± sd over the training seeds) and its
    gain over the base hyps (paired per training seed: mean ± standard error)."""
    by_name: dict[str, dict[int, dict]] = {}
    for f in finals:
        by_name.setdefault(f["name"], {})[f.get("train_seed", 0)] = f
    base = by_name.get("base", {})
    n = max((len(v) for v in by_name.values()), default=1)
    lines = [f"Full-schedule retrain ({s['final_epochs']} epochs, evolved at {s['epochs']}; the best generation of "
             f"each strategy x fidelity over its seeds, and the base hyps; training seeds 0..{n - 1}):", "",
             "| hyps | fitness during the evolution | fitness after the full-schedule retrain | vs base |",
             "|---|---|---|---|"]
    for name, runs in sorted(by_name.items()):
        fits = [r["fitness"] for _, r in sorted(runs.items())]
        paired = [k for k in sorted(runs) if k in base]
        gain = "—"
        if name != "base" and paired:
            mean, se = paired_gain([runs[k]["fitness"] for k in paired], [base[k]["fitness"] for k in paired])
            gain = f"{mean:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
        shown = f"{fits[0]:.4f}" if len(fits) == 1 else _mean_sd(fits)
        lines.append(f"| {name} | {next(iter(runs.values()))['evolved']:.4f} | {shown} | {gain} |")
    return "\n".join(lines)


def incumbent(curve: dict, epochs: int, cpu_limit: float = math.inf) -> dict | None:
    """The best full-schedule generation among those finished within ``cpu_limit`` CPU seconds."""
    done = [g for g in curve["generations"] if g["fitness"] is not None and g["epochs"] == epochs
            and g["hyp"] is not None and g["cpu_s"] <= cpu_limit]
    return max(done, key=lambda g: g["fitness"]) if done else None


def quarter_mark(curve: dict, base: dict[int, dict]) -> float:
    """A quarter of the CPU time of the mutation search (``base``: its curves by seed) of ``curve``'s seed."""
    b = base.get(curve["seed"])
    return 0.25 * b["cpu_s"] if b is not None else math.nan


def hyp_key(hyp: dict) -> str:
    return hashlib.sha1(json.dumps(hyp, sort_keys=True).encode()).hexdigest()[:12]


def reeval_table(s: dict, curves: list[dict], values: dict, strategies: list[str], fidelities: list[str]) -> str:
    """Per strategy x fidelity: the incumbents' recorded fitness against their mean over the other training seeds,
    at the end and at a quarter of the mutation search's CPU time; per seed, whether the quarter-mark incumbent is
    worth (mean over seeds) at least as much as that seed's final mutation incumbent."""
    def worth(g: dict | None) -> float | None:
        v = values.get(hyp_key(g["hyp"])) if g is not None else None
        return statistics.mean(v) if v else None

    base = {c["seed"]: c for c in curves if (c["strategy"], c["fidelity"]) == BASELINE}
    base_vals = values.get("base") or []
    first = next((c["generations"][0]["fitness"] for c in base.values() if c["generations"]), math.nan)
    lines = [f"Noise check: incumbents trained again as a generation is, with the training seeds 1..{len(base_vals)}"
             f" (the evolutions train with seed 0). The base hyps: {_mean_sd(base_vals)} (recorded at generation 1: "
             f"{first:.4f}).", "",
             "| strategy | fidelity | final incumbent: recorded | final incumbent: mean over other seeds | "
             "quarter-mark incumbent: recorded | quarter-mark incumbent: mean over other seeds | "
             "per seed: quarter-mark worth >= mutation's final worth |", "|---|---|---|---|---|---|---|"]
    for st in strategies:
        for fi in fidelities:
            cs = sorted((c for c in curves if c["strategy"] == st and c["fidelity"] == fi), key=lambda c: c["seed"])
            if not cs:
                continue
            cells, hits = [], []
            for limit_of in (lambda c: math.inf, lambda c: quarter_mark(c, base)):
                gs = [incumbent(c, s["epochs"], limit_of(c)) for c in cs]
                cells.append(_mean_sd([g["fitness"] for g in gs if g is not None]))
                cells.append(_mean_sd([w for w in map(worth, gs) if w is not None]))
            for c in cs:
                q = worth(incumbent(c, s["epochs"], quarter_mark(c, base))) if c["seed"] in base else None
                m = worth(incumbent(base[c["seed"]], s["epochs"])) if c["seed"] in base else None
                hits.append("—" if q is None or m is None else f"{'yes' if q >= m else 'no'} ({q:.3f}/{m:.3f})")
            lines.append(f"| {st} | {fi} | " + " | ".join(cells) + f" | {', '.join(hits)} |")
    return "\n".join(lines)
