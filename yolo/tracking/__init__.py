"""MLflow tracking for training and evolution runs: an observer that never kills a run.

One job per module:

- :mod:`yolo.tracking.uri`: where the data goes (tracking URI, the SQLite store beside the runs folder, bounded HTTP);
- :mod:`yolo.tracking.sanitize`: names and values MLflow accepts, passwords masked (params, tags, text artifacts);
- :mod:`yolo.tracking.source`: where a run comes from (command line, git commit, user);
- :mod:`yolo.tracking.tracker`: :class:`Tracker`, one run at a time, one warning then disabled on any failure;
- :mod:`yolo.tracking.parents`: parent runs shared by many processes, and the best of their children;
- :mod:`yolo.tracking.hydra_job`: the current Hydra job (its sweep, number and overrides);
- :mod:`yolo.tracking.names`: run names that tell runs apart;
- :mod:`yolo.tracking.sweep`: a Hydra multirun's parent run and its closing summary (:class:`MlflowSweepCallback`);
- :mod:`yolo.tracking.training`: :func:`start_training_run`, what the trainer's MLflow callback opens.

The settings are one class, :class:`yolo.config.MlflowConfig` (``mlflow:`` in the Hydra config). ``mlflow`` itself
is imported only when a tracker first connects (``import mlflow`` takes ~1.5 s). Nothing here imports the trainer.
"""

from yolo.tracking.hydra_job import HydraJob, current_job, sweep_dir
from yolo.tracking.names import (
    generation_run_name,
    overrides_run_name,
    run_name_for_training,
    training_run_name,
)
from yolo.tracking.parents import PARENT_KEY_RAW_TAG, PARENT_KEY_TAG, PARENT_RUN_ID_TAG, ChildResult, best_child
from yolo.tracking.sanitize import flatten_dict, sanitize_name
from yolo.tracking.source import command_line, git_commit
from yolo.tracking.sweep import MlflowSweepCallback, finish_sweep, parent_run_for_sweep
from yolo.tracking.tracker import Tracker, mlflow_config
from yolo.tracking.training import start_training_run
from yolo.tracking.uri import artifact_location_for, probe_http, resolve_tracking_uri, store_dir

__all__ = [
    "PARENT_KEY_RAW_TAG",
    "PARENT_KEY_TAG",
    "PARENT_RUN_ID_TAG",
    "ChildResult",
    "HydraJob",
    "MlflowSweepCallback",
    "Tracker",
    "artifact_location_for",
    "best_child",
    "command_line",
    "current_job",
    "finish_sweep",
    "flatten_dict",
    "generation_run_name",
    "git_commit",
    "mlflow_config",
    "overrides_run_name",
    "parent_run_for_sweep",
    "probe_http",
    "resolve_tracking_uri",
    "run_name_for_training",
    "sanitize_name",
    "start_training_run",
    "store_dir",
    "sweep_dir",
    "training_run_name",
]
