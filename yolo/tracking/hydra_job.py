"""What the current Hydra job is, as far as tracking needs it: the sweep it belongs to, its number, its overrides.

Read-only and never raising: outside a Hydra app (``train(cfg)`` from Python, tests) every answer is None or empty.
The overrides that *vary* across a sweep are told apart from the ones every job shares by reading the sweep's own
command-line overrides back from ``<sweep dir>/multirun.yaml`` (written by Hydra's sweeper before the first job) and
parsing them with Hydra's override parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import OmegaConf

MAX_SWEEP_FILE_BYTES = 1 << 20  # multirun.yaml is a config: anything larger is not one we wrote
MAX_OVERRIDES = 1000


@dataclass(frozen=True)
class HydraJob:
    """The current Hydra job."""

    overrides: tuple[str, ...] = ()  # this job's task overrides (``hyp.lr0=0.01``)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (``model`` -> ``yolov5n``)
    sweep_dir: str | None = None  # absolute sweep folder of a multirun job, else None
    job_num: int | None = None  # the job's number in its multirun
    sweep_overrides: tuple[str, ...] | None = None  # the multirun's own overrides (``hyp.lr0=0.001,0.01``)


def current_job() -> HydraJob | None:
    """The running Hydra job, or None outside Hydra."""
    try:
        hc = HydraConfig.get()
        choices = {str(k): str(v) for k, v in (hc.runtime.choices or {}).items() if v is not None}
        overrides = tuple(str(o) for o in (hc.overrides.task or ()))
        multirun = hc.mode == RunMode.MULTIRUN
        sweep = str(Path(hc.sweep.dir).resolve()) if multirun else None
        num = OmegaConf.select(hc, "job.num", default=None) if multirun else None
    except Exception:  # noqa: BLE001 - not inside a Hydra app (ValueError), or a Hydra config without these keys
        return None
    if sweep is None:
        return HydraJob(overrides=overrides, choices=choices)
    return HydraJob(overrides=overrides, choices=choices, sweep_dir=sweep,
                    job_num=int(num) if num is not None else None,
                    sweep_overrides=read_sweep_overrides(Path(sweep) / "multirun.yaml"))


def sweep_dir() -> str | None:
    """The multirun's sweep folder (absolute), or None when this is not a multirun job."""
    job = current_job()
    return job.sweep_dir if job is not None else None


def read_sweep_overrides(path: Path) -> tuple[str, ...] | None:
    """``hydra.overrides.task`` of a sweep's ``multirun.yaml``, or None when it is missing, too large or not the
    list of strings Hydra writes (the file is read as data, never as a config to compose)."""
    try:
        if path.stat().st_size > MAX_SWEEP_FILE_BYTES:
            return None
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        task = doc["hydra"]["overrides"]["task"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    if not isinstance(task, list) or len(task) > MAX_OVERRIDES or not all(isinstance(t, str) for t in task):
        return None
    return tuple(task)


def override_key(override: str) -> str:
    """The key an override sets: ``hyp.lr0`` for ``hyp.lr0=0.01``, ``+hyp.x=1`` and ``~hyp.x``."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def _parse(overrides: Sequence[str]) -> list[Override] | None:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - text Hydra would not accept: no opinion on it
        return None


def swept_overrides(job_overrides: Sequence[str], sweep_overrides: Sequence[str] | None) -> list[str]:
    """The overrides of a job that vary across its sweep.

    A key the sweep's command line sets to one value (``epochs=1``) is the same in every job and is dropped; one it
    sweeps (``hyp.lr0=0.001,0.01``, ``range(...)``, ``glob(...)``) or does not set at all (a sweeper's own
    ``params``) varies and is kept. Hydra writes a job's values in its own spelling (``true`` -> ``True``), so keys
    are compared, not text. Without the sweep's overrides (``None``, or text Hydra cannot parse) every job
    override is kept.
    """
    job = list(job_overrides)
    parsed_sweep = _parse(sweep_overrides) if sweep_overrides is not None else None
    parsed_job = _parse(job)
    if parsed_sweep is None or parsed_job is None or len(parsed_job) != len(job):
        return job
    constant = {(o.key_or_group, o.package) for o in parsed_sweep if not o.is_sweep_override()}
    return [text for text, o in zip(job, parsed_job) if (o.key_or_group, o.package) not in constant]
