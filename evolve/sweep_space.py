"""A Hydra sweep's search space: the sweep overrides of the command line (and ``hydra.sweeper.params``) as the
evolution's space, and each trial's values back as overrides.

Hydra's grammar maps to Optuna distributions as Hydra users expect from its Optuna sweeper:

=====================================  ===================================================================
override                               parameter
=====================================  ===================================================================
``key=a,b,c`` / ``key=choice(a,b,c)``  categorical
``key=range(start,stop,step)``         integer (every bound an integer) or float with that step; stop excluded
``key=interval(low,high)``             float uniform; ``int(interval(...))``: integer (unless ``key`` is a
                                       training hyp); ``tag(log, interval(...))``: on a log scale
=====================================  ===================================================================

A training hyp (``hyp.lr0``) is named by its bare key (``lr0``), as in ``run_evolve.py``'s ledger, and a float
one is a row of the mutation table (its gain from ``evolve_space``, 1 when the table has none), so upstream's
mutation search moves it; every other setting (``optimizer``, ``model``, ``batch_size``, a hyp's ``choice``) is
named by its key and lives in :attr:`evolve.space.SearchSpace.extra`. Values go back to Hydra as override text
that its parser reads as the same value (:func:`format_value`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (ChoiceSweep, IntervalSweep, Override, OverrideType, RangeSweep,
                                              ValueType)
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from evolve.space import HYP_KEYS, SearchSpace, build_space
from yolo.errors import ConfigError

# settings a sweep sets itself for every trial: not for the user to search
RESERVED = ("resume", "stop_epoch", "mlflow.parent_run_id", "mlflow.run_name", "project", "name")
_PLAIN = re.compile(r"[A-Za-z_/.][A-Za-z0-9_./\-:@+]*")
_SPECIAL = {"true", "false", "null", "nan", "inf", "-inf", "+inf"}


@dataclass(frozen=True)
class SweepParam:
    """One searched setting: the override key, the study's parameter name, its distribution."""

    key: str
    name: str
    dist: BaseDistribution

    @property
    def is_hyp_float(self) -> bool:
        """A training hyp searched on a continuous range: a row of the mutation table."""
        return self.name in HYP_KEYS and isinstance(self.dist, FloatDistribution) and self.dist.step is None


def param_name(key: str) -> str:
    """The study's name of the setting ``key``: a training hyp's bare key (``hyp.lr0`` → ``lr0``), else ``key``."""
    head, _, rest = key.partition(".")
    return rest if head == "hyp" and rest in HYP_KEYS else key


def format_value(value: Any) -> str:
    """``value`` as Hydra override text that its parser reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _SPECIAL:
        return text
    # Hydra's quoted strings: a backslash escapes only a quote or the backslashes before one
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def _scalar(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{key}: a searched value must be a number, a string, true/false or null, got {value!r}")


def distribution(o: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override (see the module's table)."""
    key, name = o.key_or_group, param_name(o.key_or_group)
    if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
        raise ConfigError(f"{key}: glob(...) is not supported by the evolve sweeper: list the options with "
                          f"choice(...)")
    v = o.value()
    try:
        if isinstance(v, ChoiceSweep) or o.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            choices = [_scalar(key, x) for x in o.sweep_iterator()]
            if not choices:
                raise ConfigError(f"{key}: choice() needs at least one option")
            return CategoricalDistribution(list(dict.fromkeys(choices)))
        if isinstance(v, RangeSweep):
            values = list(o.sweep_iterator())
            if not values:
                raise ConfigError(f"{key}: {o.input_line.split('=', 1)[1]} holds no value")
            step = abs(float(v.step))
            if all(isinstance(x, int) and not isinstance(x, bool) for x in (v.start, v.stop, v.step)):
                return IntDistribution(min(values), max(values), step=int(step))
            return FloatDistribution(float(min(values)), float(max(values)), step=step)
        if isinstance(v, IntervalSweep):
            log = "log" in (v.tags or set())
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (v.start, v.end))
            if ints and name not in HYP_KEYS:
                return IntDistribution(int(v.start), int(v.end), log=log)
            return FloatDistribution(float(v.start), float(v.end), log=log)
    except ConfigError:
        raise
    except ValueError as e:  # Optuna's checks: low > high, a log scale through 0, ...
        raise ConfigError(f"{key}: {o.input_line.split('=', 1)[1]}: {e}") from None
    raise ConfigError(f"{key}: {o.input_line!r} is no sweep the evolve sweeper knows")


def parse(arguments: Sequence[str], params: Mapping[str, Any] | None = None
          ) -> tuple[list[str], dict[str, SweepParam]]:
    """(fixed overrides, searched settings by key) of a sweep's command-line ``arguments`` and the sweeper's
    ``params`` (``{key: "interval(0.001, 0.1)"}``; a command-line override of the same key wins)."""
    parser = OverridesParser.create()
    fixed: dict[str, str] = {}
    searched: dict[str, SweepParam] = {}
    pairs = [f"{k}={v}" for k, v in (params or {}).items()]
    for line in [*pairs, *arguments]:
        try:
            (o,) = parser.parse_overrides([line])
        except Exception as e:  # Hydra's own message names the override
            raise ConfigError(f"hydra.sweeper: cannot read {line!r}: {e}") from None
        key = o.key_or_group
        fixed.pop(key, None)
        searched.pop(key, None)
        if not o.is_sweep_override():
            fixed[key] = line
            continue
        if o.type != OverrideType.CHANGE and o.type != OverrideType.ADD:
            raise ConfigError(f"{key}: only a setting can be searched, not {o.input_line!r}")
        if key in RESERVED or key.startswith("hydra."):
            raise ConfigError(f"{key}: set by the evolve sweeper for each trial, it cannot be searched")
        searched[key] = SweepParam(key=("+" if o.type == OverrideType.ADD else "") + key, name=param_name(key),
                                   dist=distribution(o))
    return list(fixed.values()), searched


def sweep_space(params: Mapping[str, SweepParam], base_hyp: Mapping[str, Any], table: Mapping[str, Any],
                current: Mapping[str, Any], *, model_cfg: Mapping[str, Any] | None = None
                ) -> tuple[SearchSpace, dict[str, Any]]:
    """The search space of a sweep's ``params`` and its base values (generation 1): the config's hyps clipped
    to their ranges, and ``current[name]`` (the composed config's value) for the other settings."""
    rows = {p.name: [_gain(table, p.name), p.dist.low, p.dist.high] for p in params.values() if p.is_hyp_float}
    space, base = build_space(rows, base_hyp, search_anchors="anchors" in rows, model_cfg=model_cfg)
    logs = {p.name: p.dist.log for p in params.values() if p.is_hyp_float}
    bounds = {k: replace(b, log=logs[k]) for k, b in space.bounds.items()}
    extra = {p.name: p.dist for p in params.values() if not p.is_hyp_float}
    excluded = {k: "not searched by this sweep" for k in space.excluded}
    base = {**base, **{name: current.get(name) for name in extra}}
    return SearchSpace(bounds, excluded, extra), base


def _gain(table: Mapping[str, Any], key: str) -> float:
    row = table.get(key)
    try:
        gain = float(row[0])
    except (TypeError, ValueError, IndexError, KeyError):
        return 1.0
    return gain if gain > 0 else 1.0


def trial_overrides(space: SearchSpace, values: Mapping[str, Any], keys: Mapping[str, str],
                    hyp_keys: Sequence[str] | None = None) -> list[str]:
    """The overrides that give a job one trial's values: the rows of the mutation table as ``hyp.<key>`` (by
    default every row, as ``run_evolve.py`` trains a generation's complete hyps; ``hyp_keys`` picks some), then
    the other searched settings by their key."""
    out = [f"hyp.{k}={format_value(values[k])}" for k in (space.keys if hyp_keys is None else hyp_keys)]
    out += [f"{keys.get(name, name)}={format_value(values[name])}" for name in space.extra if name in values]
    return out
