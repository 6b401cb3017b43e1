"""The ledger of an evolution in one import: the Optuna storage is the record, the upstream-format files are views
of it. This module only gathers names; each lives in the module that does its job:

- :mod:`evolve.locations` / :mod:`evolve.storages`: where the storage is and opening it (the journal file through
  :mod:`evolve.journal`, or a database);
- :mod:`evolve.formats` / :mod:`evolve.rows`: ``evolve.csv``, ``hyp_evolve.yaml``, ``evolve.png``, regenerated
  from the COMPLETE trials in trial-number order; seeding a study from an ``evolve.csv``;
- :mod:`evolve.locks`: the evolution's lock across processes and machines;
- :mod:`evolve.recovery` / :mod:`evolve.beats`: trials of dead or silent workers become FAIL (with the reason)
  and are retried once per ``max_retries``, never counted as finished.
"""

from __future__ import annotations

from evolve import mutation
from evolve.formats import (CSV_NAME, FIELD_WIDTH, METRIC_KEYS, PNG_NAME, YAML_NAME, Row, best_index,
                            export_outputs, format_evolve_csv, format_hyp_yaml, plot_evolve, read_evolve_csv,
                            write_evolve_csv, write_hyp_yaml)
from evolve.locations import JOURNAL_NAME, describe_storage, with_installed_driver
from evolve.locks import DatabaseLock, EvolutionLock, database_lock, evolution_lock
from evolve.recovery import (FAIL_ATTR, HOST_ENV, OWNER_ATTR, SURPLUS_ATTR, describe_owner, host_id, mark_failed,
                             owner_alive, owner_info, process_start, recover_stale_trials, retry_trial)
from evolve.rows import SOURCE_ATTR, seed_study_from_csv, study_rows, trial_row
from evolve.samplers import FULL_HYP_ATTR, HYP_ATTR, METRICS_ATTR
from evolve.storages import grace_period, open_storage

__all__ = [
    "mutation", "CSV_NAME", "FIELD_WIDTH", "METRIC_KEYS", "PNG_NAME", "YAML_NAME", "Row", "best_index",
    "export_outputs", "format_evolve_csv", "format_hyp_yaml", "plot_evolve", "read_evolve_csv", "write_evolve_csv",
    "write_hyp_yaml", "JOURNAL_NAME", "describe_storage", "with_installed_driver", "DatabaseLock", "EvolutionLock",
    "database_lock", "evolution_lock", "FAIL_ATTR", "HOST_ENV", "OWNER_ATTR", "SURPLUS_ATTR", "describe_owner",
    "host_id", "mark_failed", "owner_alive", "owner_info", "process_start", "recover_stale_trials", "retry_trial",
    "SOURCE_ATTR", "seed_study_from_csv", "study_rows", "trial_row", "FULL_HYP_ATTR", "HYP_ATTR", "METRICS_ATTR",
    "grace_period", "open_storage",
]
