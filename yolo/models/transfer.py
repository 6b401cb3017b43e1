"""Putting stored tensors into a model: strictly (validation, resume, prediction) or by name and shape (fine-tuning).

- :func:`load_state_strict`: every tensor of the model must be in the state dict with its shape, and nothing else
  may be there; otherwise one :class:`~yolo.errors.CheckpointError` lists a few names of each kind and counts.
- :func:`check_finite`: a NaN or inf weight is a :class:`~yolo.errors.CheckpointError`.
- :func:`transfer_weights`: copies what matches by name and shape (upstream's ``intersect_dicts``), logs
  ``Transferred n/N items from <source>``, and raises when nothing at all transfers.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping

import torch
from torch import nn

from yolo.errors import CheckpointError

LOGGER = logging.getLogger(__name__)
SHOWN = 3  # names quoted per kind of mismatch


def _some(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _shape(x: torch.Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)


def fit_problem(expected: Mapping[str, torch.Tensor | torch.Size],
                state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state_dict`` from fitting a model whose tensors (or shapes) are ``expected``; None if it fits."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {list(_shape(state_dict[k]))} vs {list(_shape(v))}" for k, v in expected.items()
                 if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    if not (missing or unexpected or misshaped):
        return None
    fit = len(expected) - len(missing) - len(misshaped)
    parts = [f"{len(missing)} missing ({_some(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_some(unexpected)})" if unexpected else "",
             f"{len(misshaped)} mis-shaped (file vs model: {_some(misshaped)})" if misshaped else ""]
    return (f"weights do not fit the model: {fit}/{len(expected)} tensors fit; "
            + "; ".join(p for p in parts if p))


def check_finite(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when any floating tensor holds NaN or inf."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} of {len(state)} weight tensors hold NaN or inf ({_some(bad)})")


def load_state_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``state_dict`` into ``model`` only if it fits exactly (names and shapes) and is finite."""
    problem = fit_problem(model.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    check_finite(state_dict, path)
    model.load_state_dict(dict(state_dict), strict=True)


def transfer_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    exclude: Iterable[str] = (),
    source: str | os.PathLike | None = None,
) -> tuple[int, int]:
    """Copy every tensor of ``state_dict`` whose name and shape match the model's (names containing any of the
    ``exclude`` substrings are skipped). Returns ``(transferred, total items in the model's state dict)``; raises
    :class:`CheckpointError` when nothing transfers or a transferred tensor is not finite."""
    exclude = tuple(exclude)
    own = model.state_dict()
    matched = {
        k: v
        for k, v in state_dict.items()
        if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)
    }
    where = source if source is not None else "state dict"
    if not matched:
        raise CheckpointError(f"{where}: no tensor fits the model by name and shape (0/{len(own)} transferred); "
                              f"these weights belong to another architecture")
    check_finite(matched, where)
    model.load_state_dict(matched, strict=False)
    n, total = len(matched), len(own)
    LOGGER.info(f"Transferred {n}/{total} items from {where}")
    return n, total
