"""``yolo-evolve`` (``python run_evolve.py``): evolve training hyperparameters,
``yolo-evolve generations=300 model=yolov5n data=coco128 epochs=1`` (``--help`` for the settings).

Running the same command again continues the evolution; see conf/evolve.yaml for the settings. The module's name
is Hydra's job name (``run_evolve``: the log file ``run_evolve.log``), however it is started.
"""

from __future__ import annotations

import hydra

from evolve.config import EvolveConfig  # registers the config schema
from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main
from yolo.config import check_train_config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evolve")
def _evolve(cfg) -> float:
    with exit_on_user_error():
        check_train_config(cfg, EvolveConfig)  # the generations' training settings and evolve.*, before any work
        import optuna  # heavy: imported once the config is composed and checked (--help and --cfg stay fast)

        from evolve.driver import evolve  # deferred: optuna and torch load once the config is checked

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return evolve(cfg).best_fitness


def main() -> None:
    """The console script's entry: Hydra reads the command line (``sys.argv``); data=, hyp=, model= take paths."""
    run_hydra_main(_evolve)


if __name__ == "__main__":
    main()
