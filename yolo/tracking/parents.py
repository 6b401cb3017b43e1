"""Parent runs shared by many processes, and what their children achieved (MLflow client calls only).

A child run carries the tag ``mlflow.parentRunId`` (what the fluent API's ``nested=True`` sets, and what the UI
groups by). Many processes (the jobs of a Hydra sweep) find their common parent by a key (the sweep folder),
stored hashed in the tag ``yolo.parent_key``: :func:`claim_parent` returns the RUNNING parent with that key, or
creates it. The caller serialises this with a file lock (same machine); across machines a deterministic tie-break
(earliest ``start_time``, then run id) makes the losers delete their duplicate.

These functions take an ``MlflowClient`` and raise whatever it raises: :class:`yolo.tracking.tracker.Tracker`
calls them inside its guard, which turns a failure into one warning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
PARENT_KEY_TAG = "yolo.parent_key"  # sha1 of the key given to get_or_create_parent
PARENT_KEY_RAW_TAG = "yolo.parent_key_raw"  # the key itself, for humans
SWEEP_JOB_TAG = "yolo.sweep.job"  # a sweep child's Hydra job number
SWEEP_OVERRIDES_TAG = "yolo.sweep.overrides"  # a sweep child's overrides (those that vary across the sweep)
FITNESS_METRICS = ("best_fitness", "fitness")  # what a child achieved: the first of these it has
MAX_CHILDREN = 10_000  # a parent's children we look at (search_runs pages of 1,000)


def parent_key(key_tag: str) -> str:
    """The value of tag ``yolo.parent_key`` for ``key_tag`` (any text, e.g. a sweep folder)."""
    return hashlib.sha1(str(key_tag).encode()).hexdigest()


def find_parents(client: Any, exp_id: str, key: str) -> list[Any]:
    """The RUNNING runs of experiment ``exp_id`` tagged with parent key ``key``, the winner of a tie first."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'", max_results=100)
    runs = [r for r in runs if r.info.status == "RUNNING"]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def claim_parent(client: Any, exp_id: str, key: str, create: Callable[[], str]) -> str:
    """The id of the RUNNING parent with ``key``; when there is none, ``create()`` makes one (returning its id).

    If another machine created one at the same time, the earliest wins and ours is deleted.
    """
    found = find_parents(client, exp_id, key)
    if found:
        return found[0].info.run_id
    mine = create()
    found = find_parents(client, exp_id, key)
    winner = found[0].info.run_id if found else mine
    if winner != mine:  # lost a cross-machine race: drop our duplicate
        client.delete_run(mine)
    return winner


def list_children(client: Any, exp_id: str, parent_id: str) -> list[Any]:
    """Every run of experiment ``exp_id`` whose parent is ``parent_id`` (at most :data:`MAX_CHILDREN`)."""
    runs: list[Any] = []
    token = None
    while len(runs) < MAX_CHILDREN:
        page = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return runs[:MAX_CHILDREN]


@dataclass(frozen=True)
class ChildResult:
    """What one child run achieved, read back from MLflow."""

    run_id: str
    fitness: float
    job: int | None  # Hydra job number (sweep children)
    overrides: str  # the overrides that made this child differ ('' when unknown)
    name: str


def child_result(run: Any) -> ChildResult | None:
    """The result of a FINISHED child with a finite fitness metric, else None."""
    if run.info.status != "FINISHED":
        return None
    metrics, tags = run.data.metrics, run.data.tags
    fitness = next((metrics[m] for m in FITNESS_METRICS if m in metrics), None)
    if fitness is None or not math.isfinite(fitness):
        return None
    job_text = tags.get(SWEEP_JOB_TAG, "")
    job = int(job_text) if job_text.isdigit() else None
    return ChildResult(run_id=run.info.run_id, fitness=float(fitness), job=job,
                       overrides=tags.get(SWEEP_OVERRIDES_TAG, ""), name=run.info.run_name or "")


def best_child(runs: Iterable[Any]) -> ChildResult | None:
    """The finished child with the highest fitness (a tie goes to the lowest job number, then run id)."""
    results = [r for r in map(child_result, runs) if r is not None]
    if not results:
        return None
    return min(results, key=lambda r: (-r.fitness, r.job if r.job is not None else math.inf, r.run_id))
