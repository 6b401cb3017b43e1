"""Evolve training hyperparameters: ``python run_evolve.py generations=300 model=yolov5n data=coco128 epochs=1``.

Running the same command again continues the evolution; see conf/evolve.yaml for the settings.
"""

import sys

import hydra

import evolve.config  # noqa: F401  (registers the config schema)
import yolo.config  # noqa: F401
from yolo.cli import exit_on_user_error, rewrite_data_override


@hydra.main(version_base="1.3", config_path="conf", config_name="evolve")
def main(cfg) -> float:
    import optuna

    from evolve.driver import evolve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with exit_on_user_error():
        return evolve(cfg).best_fitness


if __name__ == "__main__":
    sys.argv = rewrite_data_override(sys.argv)  # data=path/to/custom.yaml works as for run_train.py
    main()
