"""Evolve training hyperparameters: ``python run_evolve.py generations=300 model=yolov5n data=coco128 epochs=1``.

Running the same command again continues the evolution; see conf/evolve.yaml for the settings.
"""

import hydra

from evolve.config import EvolveConfig  # registers the config schema
from yolo.cli import exit_on_user_error, run_hydra_main
from yolo.config import check_train_config


@hydra.main(version_base="1.3", config_path="conf", config_name="evolve")
def main(cfg) -> float:
    with exit_on_user_error():
        check_train_config(cfg, EvolveConfig)  # the generations' training settings and evolve.*, before any work
        import optuna  # heavy: imported once the config is composed and checked (--help and --cfg stay fast)

        from evolve.driver import evolve

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return evolve(cfg).best_fitness


if __name__ == "__main__":
    run_hydra_main(main)  # data=path/to/custom.yaml works as for run_train.py
