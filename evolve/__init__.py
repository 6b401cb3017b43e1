"""Hyperparameter evolution: YOLOv5's mutation search and Optuna's samplers over one resumable, parallel ledger.

``python run_evolve.py generations=300 ...`` or, from Python::

    from evolve import evolve
    results = evolve(cfg)  # cfg: an evolve.config.EvolveConfig (conf/evolve.yaml)

Modules: :mod:`evolve.space` (the search space), :mod:`evolve.mutation` (upstream's parent selection and
mutation), :mod:`evolve.samplers` (every strategy as an Optuna sampler), :mod:`evolve.ledger` (the storage and the
files, gathered from formats, rows, locations, storages, journal, locks, recovery, beats), :mod:`evolve.settings`,
:mod:`evolve.trial` (one generation), :mod:`evolve.workers`, :mod:`evolve.progress` (MLflow parent, progress bar),
:mod:`evolve.driver` (``evolve()``).
"""

from __future__ import annotations

__all__ = ["evolve", "EvolveResults"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name in __all__:
        from evolve import driver  # deferred: importing the package stays cheap (optuna, torch)

        return getattr(driver, name)
    raise AttributeError(f"module 'evolve' has no attribute {name!r}")
