"""Every use of Optuna's private API, in one place: a study's storage and id, a trial's id, whether the storage
records heartbeats, its stale trials, and the RDB tables. Checked against Optuna 4 and 5; when Optuna changes,
this is the one module to adapt."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("yolo.evolve")


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def frozen(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as stored now."""
    return study._storage.get_trial(trial._trial_id)


def set_user_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def set_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def set_failed(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Set a trial to FAIL in the storage (not through ``tell``: it may be another worker's)."""
    return bool(study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))


def heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of RUNNING trials whose heartbeat is older than the storage's grace period."""
    return list(study._storage._get_stale_trial_ids(study._study_id))


def rdb_backend(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The RDBStorage behind a study's storage (Optuna wraps it in a cache), or None."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def running_without_heartbeat(study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat (RDB storages; [] for others)."""
    backend = rdb_backend(study)
    if backend is None:
        return []
    try:
        from optuna.storages._rdb import models

        session = backend.scoped_session()
        try:
            rows = (session.query(models.TrialModel.trial_id)
                    .outerjoin(models.TrialHeartbeatModel,
                               models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study._study_id,
                            models.TrialModel.state == TrialState.RUNNING,
                            models.TrialHeartbeatModel.trial_id.is_(None)).all())
            session.commit()
        finally:
            session.close()
        return [int(r[0]) for r in rows]
    except Exception as e:  # Optuna's tables changed: a trial that never beat is then left to its own host
        log.debug(f"evolve: looking for trials without a heartbeat: {e}")
        return []
