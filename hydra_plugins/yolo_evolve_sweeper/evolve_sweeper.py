"""The ``evolve`` sweeper of Hydra: hyperparameter evolution as a multirun, found by Hydra's plugin discovery
(this ``hydra_plugins`` namespace package) once the project is installed or run from its folder.

``python run_train.py -m hydra/sweeper=evolve hydra.sweeper.strategy=cmaes hydra.sweeper.generations=50
'hyp.lr0=tag(log, interval(1e-4, 0.1))' 'optimizer=choice(sgd, adamw)'``

Its settings (``hydra.sweeper.*``) are ``run_evolve.py``'s ``evolve.*`` (:class:`evolve.config.EvolveSettings`)
plus those below; the work is :class:`evolve.sweeper.EvolveSweep`, imported when a sweep starts, so Hydra's scan of
its plugins stays cheap. (No ``from __future__ import annotations`` here: Hydra's scan runs this module before it
is in ``sys.modules``, where dataclasses cannot resolve string annotations.)
"""


from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from evolve.config import EvolveSettings
from yolo.config import num


@dataclass
class EvolveSweeperConf(EvolveSettings):
    """``hydra.sweeper`` of ``hydra/sweeper=evolve`` (conf/hparams_search/ holds presets)."""

    _target_: str = "hydra_plugins.yolo_evolve_sweeper.evolve_sweeper.EvolveSweeper"
    generations: int = num(300, ge=1)  # finished trials wanted in total (a rerun of the command counts the earlier)
    params: Dict[str, Any] = field(default_factory=dict)  # key: sweep, e.g. hyp.lr0: interval(1e-4, 0.1); the
    # command line's sweep overrides are added (and win); none at all: upstream's meta table (`space`)
    n_jobs: Optional[int] = None  # trials at once (null: the launcher's n_jobs / array_parallelism; basic: 1)
    upstream_generations: bool = True  # each trial trains as upstream's evolution does: noval, nosave, noplots
    # (validation and the checkpoint at the end only) unless the command line sets them


ConfigStore.instance().store(group="hydra/sweeper", name="evolve", node=EvolveSweeperConf, provider="yolo-hydra")


class EvolveSweeper(Sweeper):
    """Hydra's side of the evolve sweeper: receives its settings, the launcher, and the sweep's arguments."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                         for k, v in settings.items()}
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        from evolve.sweeper import EvolveSweep  # deferred: optuna and torch load once a sweep starts
        from yolo.cli import exit_on_user_error

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with exit_on_user_error():
            return EvolveSweep(self.settings, self.config, self.launcher).run(list(arguments))
