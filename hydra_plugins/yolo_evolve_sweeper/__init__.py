"""yolo-hydra's Hydra sweeper: ``python run_train.py -m hydra/sweeper=evolve ...`` (see :mod:`.evolve_sweeper`)."""
