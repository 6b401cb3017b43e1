"""Dead workers: who owns a RUNNING trial (host id, pid, process start), whether that owner still runs, failing
its trial with the reason and queueing its hyps again (``max_retries``). Silence of owners that cannot be
checked from here is :mod:`evolve.beats`' job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evolve import optuna_internals as oi

log = logging.getLogger("yolo.evolve")

OWNER_ATTR = "evolve:owner"  # system attr: which process runs a trial (host, pid, process start time)
FAIL_ATTR = "fail_reason"  # user attr of a failed trial
SURPLUS_ATTR = "evolve:surplus"  # system attr: a trial started past the budget by a cross-machine race
HOST_ENV = "YOLO_EVOLVE_HOST"


def host_id() -> str:
    """This machine since its last boot (a reboot makes every earlier owner dead), and the process-id namespace
    (containers sharing a kernel see different pids). ``$YOLO_EVOLVE_HOST``, when set, replaces it: processes with
    different values treat each other as being on different machines (tests of the cross-machine paths)."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    boot = ns = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return "/".join(x for x in (socket.gethostname(), boot, ns) if x)


def process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, None where that is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def exit_when(gone: Callable[[], bool], message: Callable[[], str], poll_s: float = 1.0,
              name: str = "evolve-watch") -> None:
    """End this process (exit code 3) once ``gone()`` says the process it works for has died, after logging
    ``message()``: a worker or a job must not go on training, orphaned, beside those of the command run again.
    What it was training is then failed (and retried) like any generation whose worker died."""

    def watch() -> None:
        while not gone():
            time.sleep(poll_s)
        log.warning(message())
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name=name).start()


def owner_info(pid: int | None = None) -> dict[str, Any]:
    pid = os.getpid() if pid is None else pid
    ps = process_start(pid)
    return {"host": host_id(), "pid": pid, "start": ps[1] if ps else None}


def owner_alive(owner: Mapping[str, Any] | None) -> bool | None:
    """Whether the process that owns a trial still runs: True/False on this machine, None when unknowable."""
    if not isinstance(owner, Mapping) or owner.get("host") != host_id():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return None
    ps = process_start(pid)
    if ps is None:
        return True
    state, start = ps
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    if owner.get("start") is not None and start != owner["start"]:
        return False  # the pid was reused
    return True


def describe_owner(owner: Any) -> str:
    """``worker 4242 on node07`` (the host name without its boot and namespace ids), from untrusted data."""
    if not isinstance(owner, Mapping) or not owner:
        return "no worker recorded"
    host = str(owner.get("host", "?")).split("/")[0][:64]
    return f"worker {str(owner.get('pid'))[:20]} on {host}"


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retries: int, reason: str = "") -> int | None:
    """Queue a failed trial's hyps again (state WAITING) unless it was retried ``max_retries`` times already.

    Keeps Optuna's retry bookkeeping (system attrs ``failed_trial``: the first failed number, ``retry_history``:
    every failed number so far). Returns the number of the queued trial, or None when skipped.
    """
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > max_retries:
        log.warning(f"WARNING: evolve: trial {trial.number} failed{' (' + reason + ')' if reason else ''}; "
                    f"retried {len(history) - 1} times already, skipping it")
        return None
    keep = {k: v for k, v in trial.system_attrs.items() if k not in (OWNER_ATTR, SURPLUS_ATTR)}
    keep.update({"failed_trial": history[0], "retry_history": history})
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=keep))
    log.warning(f"WARNING: evolve: trial {trial.number} failed{' (' + reason + ')' if reason else ''}; "
                f"its hyps are queued again (retry {len(history)} of {max_retries})")
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max(t.number for t in waiting) if waiting else None


def mark_failed(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Set a RUNNING trial to FAIL with ``reason``; False if it had finished meanwhile."""
    try:
        oi.set_user_attr(study, trial, FAIL_ATTR, reason)
        return oi.set_failed(study, trial)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def _stale_reason(trial: FrozenTrial, study: optuna.Study) -> str:
    grace = getattr(oi.rdb_backend(study), "grace_period", None)
    owner = trial.system_attrs.get(OWNER_ATTR) or {}
    who = describe_owner(owner) if owner else "its worker"
    return f"no heartbeat for {grace}s: {who} is gone" if grace else f"no heartbeat: {who} is gone"


def recover_stale_trials(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail (and retry) RUNNING trials whose worker is gone; returns their numbers.

    On this machine a trial's owner process is checked directly (it also catches a SIGKILLed worker at once); with
    an RDB storage, the heartbeat catches workers on other machines: a trial whose last heartbeat is older than
    the grace period is failed with the reason ``no heartbeat ...``. A RUNNING trial that never beat (its worker
    died between creating it and training it) gets a first heartbeat from whoever sees it, so that it too goes
    stale. Call under the evolution's lock.
    """
    failed: list[int] = []
    storage = oi.storage_of(study)
    if oi.heartbeat_enabled(study):
        for trial_id in oi.stale_trial_ids(study):
            t = storage.get_trial(trial_id)
            reason = _stale_reason(t, study)
            if t.state == TrialState.RUNNING and mark_failed(study, t, reason):
                failed.append(t.number)
                retry_trial(study, storage.get_trial(trial_id), max_retries, reason=reason)
        for trial_id in oi.running_without_heartbeat(study):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner_alive(owner) is False:
            reason = f"worker process {owner.get('pid')} died"
            if mark_failed(study, t, reason):
                failed.append(t.number)
                retry_trial(study, oi.frozen(study, t), max_retries, reason=reason)
    return failed
