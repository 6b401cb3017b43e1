"""Evolve training hyperparameters: ``python run_evolve.py generations=300 ...`` (the ``yolo-evolve`` command)."""
from evolve.run_evolve import main

if __name__ == "__main__":
    main()
