"""Config schema of ``run_evolve.py``, registered in Hydra's ConfigStore as ``evolve_schema``.

:class:`EvolveConfig` is the training schema (:class:`yolo.config.TrainConfig`, every field at the top level, so
``model=``, ``data=``, ``epochs=``, ``hyp.lr0=``... mean what they mean to ``run_train.py``) plus ``generations``
and the evolution settings under ``evolve:``. A mistyped key fails before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from yolo.config import TrainConfig, checked, device_rule, each, num


@dataclass
class EvolveSettings:
    """``evolve.*``: how the search runs (see conf/evolve.yaml for what each does)."""

    strategy: str = "mutation"  # mutation (YOLOv5's) | guided | tpe | cmaes | gp | auto | random | qmc
    seed: int = 0  # seeds the search (upstream seeds its mutation from the clock)
    parent: str = "single"  # mutation parent selection: single | weighted
    space: Dict[str, Any] = field(default_factory=dict)  # key: [gain, lower, upper] (checked by evolve.space)
    search_anchors: Optional[bool] = None  # null: searched unless starting from weights (or noautoanchor)
    out_dir: Optional[str] = None  # null: ${project}/${name}
    storage: Optional[str] = None  # null: journal file in out_dir; or a path; or an SQLAlchemy URL
    study_name: str = "evolve"
    workers: int = num(1, ge=1)  # processes evaluating generations concurrently
    devices: List[str] = checked(each(device_rule), default_factory=list)  # one per worker (default: `device`)
    fidelity: str = "full"  # full: every generation trains `epochs` | asha: rungs of min_epochs * eta**k, promoted
    min_epochs: int = num(1, ge=1)  # asha: epochs of the first rung
    eta: int = num(3, ge=2)  # asha: the top 1/eta of a rung is promoted to the next, eta times longer
    auto_switch: int = num(20, ge=2)  # auto: finished generations of the GP before CMA-ES takes over
    pruner: str = "none"  # none | median | hyperband
    pruner_startup: int = num(5, ge=0)  # median: generations finished before any is pruned
    pruner_warmup_epochs: int = num(0, ge=0)  # median: epochs of a generation before it may be pruned
    warm_start: List[str] = field(default_factory=list)  # evolve.csv files (upstream's or ours) or evolution
    # folders / journals whose generations seed a new study's history (see evolve.rows.warm_start)
    resume_from_csv: Optional[str] = None  # an evolve.csv (upstream's or ours) to seed a new study (= warm_start)
    max_retries: int = num(1, ge=0)  # times a generation whose worker died is run again (0: skip it)
    max_consecutive_failures: int = num(3, ge=1)  # a worker stops after this many generations failing in a row
    heartbeat_s: int = num(60, ge=1)  # seconds between a running generation's heartbeats (journal: a file beside it)
    heartbeat_grace_s: Optional[int] = num(None, ge=1)  # silent this long, a generation is failed (null: 2x)
    poll_s: float = num(2.0, gt=0)  # how often a waiting worker / the monitor looks at the storage
    final_train: bool = False  # at the end: retrain the best and the base hyps for the full schedule, compare
    final_epochs: Optional[int] = num(None, ge=1)  # final_train's schedule (null: `epochs`)
    final_seeds: int = num(1, ge=1, le=20)  # final_train: training seeds per side (seed..seed+N-1), paired
    keep_weights: bool = False  # keep each generation's last.pt/best.pt
    plot: bool = True  # write evolve.png
    train_fn: Optional[str] = None  # "module:function" replacing yolo.train.train (tests, benchmarks)
    sampler_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra arguments of the strategy's sampler


@dataclass
class EvolveConfig(TrainConfig):
    """``run_evolve.py``: the training config of every generation, plus the evolution."""

    generations: int = num(300, ge=1)  # finished generations wanted in total (a resumed run counts the earlier ones)
    evolve: EvolveSettings = field(default_factory=EvolveSettings)


def register_configs() -> None:
    ConfigStore.instance().store(name="evolve_schema", node=EvolveConfig)


register_configs()
