"""Distributed data-parallel training (DDP): one process per device, started by ``torchrun``.

``torchrun --nproc_per_node=N run_train.py ...`` starts N copies of the script and tells each its place in the
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``).
:class:`DistInfo` reads it; with ``WORLD_SIZE`` 1 (or no torchrun) training is the ordinary single-process run.

What this module gives the trainer:

* :func:`setup`: the process's device (``cuda:LOCAL_RANK``, or the CPU) and the process group, NCCL on GPUs and
  gloo on CPUs;
* :func:`check_config`: options DDP cannot honour are refused with a message saying what to change;
* :func:`local_main_first`: one process per machine does file work (dataset download, label cache) while the
  others wait, then they read what it wrote;
* :func:`broadcast` (rank 0's value everywhere) and :func:`barrier`;
* :func:`wrap_model` (optional SyncBatchNorm, then ``DistributedDataParallel``) and :func:`gradient_sync`
  (skip the all-reduce on batches that only accumulate gradients);
* :class:`SharedRunDir`: a Hydra callback that claims the run folder and makes every process use rank 0's;
* :class:`TrainTrace`: with ``YOLO_DDP_TRACE=<folder>`` each process records the images it trained on and
  checksums of its weights (for tests and debugging).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from yolo.cli import exit_on_user_error
from yolo.device import select_device
from yolo.engine import resume, run_dir
from yolo.errors import UserError
from yolo.models.yolo import unwrap_model
from yolo.tracking.hydra_job import sweep_dir
from yolo.utils.files import atomic_write_text

log = logging.getLogger("yolo")

PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)  # rank 0 validates alone while the others wait
TRACE_ENV = "YOLO_DDP_TRACE"

_owns_process_group = False  # True when this module created the default process group (and must destroy it)


class DDPConfigError(UserError, ValueError):
    """A training option that distributed training cannot honour."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read what torchrun (or any ``env://`` launcher) set; defaults describe a single process."""
        def env_int(name: str, default: int) -> int:
            value = os.environ.get(name, "").strip()
            return int(value) if value else default

        world_size = env_int("WORLD_SIZE", 1)
        return cls(rank=env_int("RANK", 0), local_rank=env_int("LOCAL_RANK", 0), world_size=world_size,
                   local_world_size=env_int("LOCAL_WORLD_SIZE", world_size))

    @property
    def enabled(self) -> bool:
        """Several processes train one model together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, plots, saves checkpoints and logs to MLflow."""
        return self.rank == 0


def check_config(cfg: Any, info: DistInfo) -> None:
    """Refuse what DDP cannot do (upstream YOLOv5's restrictions), naming the option and the way out."""
    if not info.enabled:
        return
    if cfg.image_weights:
        raise DDPConfigError(f"image_weights=true is not supported with DDP ({info.world_size} processes): the "
                             "image weights are refreshed from rank 0's validation only. Drop image_weights or "
                             "train in a single process.")
    if cfg.batch_size % info.world_size:
        multiple = -(-cfg.batch_size // info.world_size) * info.world_size
        raise DDPConfigError(f"batch_size={cfg.batch_size} must be a multiple of the number of processes "
                             f"(WORLD_SIZE={info.world_size}): it is the global batch, split evenly across them. "
                             f"Use e.g. batch_size={multiple}.")
    if _in_hydra_sweep():
        raise DDPConfigError("a Hydra sweep (-m) cannot run under torchrun: launch one torchrun per configuration")


def _in_hydra_sweep() -> bool:
    return sweep_dir() is not None


# ---------------------------------------------------------------------------------------------------------------
# process group


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device_spec: Any, info: DistInfo) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` under DDP with ``device=auto``."""
    return select_device(device_spec, local_rank=info.local_rank if info.enabled else None)


def init_process_group(device: torch.device, info: DistInfo) -> None:
    """Join the training processes (a no-op when not distributed, or when the group already exists)."""
    global _owns_process_group
    if not info.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise DDPConfigError(f"the process group uses {dist.get_backend()} but this run trains on {device}, "
                                 f"which needs {backend}: give device= explicitly on the command line")
        return
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    _owns_process_group = True
    log.info(f"DDP: process {info.rank} of {info.world_size} ({backend}) on {device}")


def setup(device_spec: Any, info: DistInfo) -> torch.device:
    """This process's device, with the process group joined under DDP."""
    device = process_device(device_spec, info)
    init_process_group(device, info)
    return device


def shutdown() -> None:
    """Leave the process group if this module created it."""
    global _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def barrier(info: DistInfo) -> None:
    if not info.enabled:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` in every process (any picklable object); ``value`` itself when not distributed."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first(info: DistInfo) -> Iterator[None]:
    """The block runs first in each machine's local rank 0, then in that machine's other processes.

    For work with files (dataset download or generation, label and image caches): the others then read what the
    first one wrote instead of racing it.
    """
    if info.enabled and info.local_rank != 0:
        barrier(info)
    yield
    if info.enabled and info.local_rank == 0:
        barrier(info)


# ---------------------------------------------------------------------------------------------------------------
# model


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` under DDP (rank 0's weights and buffers are copied to all processes),
    with BatchNorm layers made SyncBatchNorm when ``sync_bn`` (CUDA only); ``model`` unchanged otherwise."""
    if not info.enabled:
        if sync_bn:
            log.info("sync_bn=true has no effect in a single process")
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("Using SyncBatchNorm")
    elif sync_bn:
        log.warning("WARNING: sync_bn=true ignored: SyncBatchNorm needs CUDA devices, this run trains on the CPU")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Wrap a forward/backward pass: with ``sync`` false a DDP model only accumulates its gradients locally; the
    next synchronised backward all-reduces the sum (same result, fewer all-reduces)."""
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# logging


@contextlib.contextmanager
def quiet_unless_main(info: DistInfo, logger: logging.Logger = log) -> Iterator[None]:
    """Only rank 0 logs progress and shows progress bars; the other processes keep warnings and errors."""
    if info.is_main:
        yield
        return
    level, bars = logger.level, os.environ.get("TQDM_DISABLE")
    logger.setLevel(max(logging.WARNING, level))
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads its defaults from TQDM_* variables (dataset scan, caching)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars


# ---------------------------------------------------------------------------------------------------------------
# Hydra: one run folder for all processes

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except Exception:  # pragma: no cover - hydra always provides it in supported versions
    _HydraCallback = object


class SharedRunDir(_HydraCallback):
    """Chooses a training job's run folder before Hydra creates it (registered in ``conf/train.yaml``).

    * the default, time-stamped folder is claimed atomically (:func:`yolo.engine.resume.hydra_dirs`), so two
      runs started in the same instant never share one; a resume continues in its run's own folder;
    * under torchrun every process uses rank 0's folder: each process composes its own config, and processes
      started a second apart would each make a folder, so rank 0 chooses and tells the others; only rank 0
      writes Hydra's ``.hydra/`` files;
    * a multirun's default sweep folder is claimed atomically too.
    """

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        info = DistInfo.from_env()
        if info.enabled:
            init_process_group(process_device(config.device, info), info)
        dirs = None
        if info.is_main:
            HydraConfig.instance().set_config(config)  # for ${hydra:...} in the folder's name
            with exit_on_user_error():  # a refused folder: one line, before Hydra writes anything
                dirs = resume.hydra_dirs(config)
        run_dir, subdir = broadcast(dirs, info)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            if subdir is not None:
                config.hydra.output_subdir = subdir
            if not info.is_main:
                config.hydra.output_subdir = None

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict, read_write

        if DistInfo.from_env().enabled:
            return
        overrides = OmegaConf.select(config, "hydra.overrides.hydra") or []
        if any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.sweep.dir" for o in overrides):
            return
        HydraConfig.instance().set_config(config)
        sweep_dir = run_dir.claim_fresh(str(OmegaConf.select(config, "hydra.sweep.dir")))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(sweep_dir)


def shared_path(path: Path | None, info: DistInfo) -> Path | None:
    """Rank 0's ``path`` in every process (the run folder, when each process could have chosen its own)."""
    value = broadcast(None if path is None else str(path), info)
    return None if value is None else Path(value)


# ---------------------------------------------------------------------------------------------------------------
# tracing (tests, debugging)


def weights_digest(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the model's parameters and, separately, of its buffers (in name order, float32 bytes)."""
    net = unwrap_model(model)

    def digest(items) -> str:
        h = hashlib.sha256()
        for name, t in sorted(items, key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    return {"parameters": digest(net.named_parameters()), "buffers": digest(net.named_buffers())}


class TrainTrace:
    """What one process trained on, written to ``<folder>/rank<R>.json`` when ``YOLO_DDP_TRACE=<folder>`` is set.

    ``{"rank", "world_size", "epochs": {epoch: [image index, ...]}, "weights": {tag: {"parameters": sha256,
    "buffers": sha256}}}``; image indices are positions in the training dataset's ``im_files``; tags are ``start``
    (after DDP copied rank 0's weights), ``first_step`` (after the first optimizer step) and ``epoch<N>``.
    Parameters agree across processes; buffers (BatchNorm running statistics) are rank 0's at the start of
    every forward pass but each process then updates its own with its own batch (unless ``sync_bn``).
    """

    def __init__(self, folder: Path, info: DistInfo, im_files: list[str]):
        self.path = Path(folder) / f"rank{info.rank}.json"
        self.data: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size, "epochs": {}, "weights": {}}
        self._index = {f: i for i, f in enumerate(im_files)}

    def batch(self, epoch: int, paths) -> None:
        self.data["epochs"].setdefault(str(epoch), []).extend(self._index[p] for p in paths)

    def weights(self, tag: str, model: nn.Module) -> None:
        self.data["weights"][tag] = weights_digest(model)
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data))


class TraceCallback:
    """The DDP trace as a trainer callback (every process): weights at the start, after the first optimizer step
    and after each epoch; the images of each batch."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.trace: TrainTrace | None = None
        self._first_step = False

    @classmethod
    def from_env(cls) -> TraceCallback | None:
        folder = os.environ.get(TRACE_ENV, "").strip()
        return cls(Path(folder)) if folder else None

    def on_train_epoch_start(self, trainer: Any) -> None:
        if self.trace is None:
            self.trace = TrainTrace(self.folder, trainer.info, trainer.dataset.im_files)
            self.trace.weights("start", trainer.model)

    def on_train_batch_end(self, trainer: Any) -> None:
        self.trace.batch(trainer.epoch, trainer.batch[2])
        if not self._first_step and trainer.stepper.steps > 0:
            self._first_step = True
            self.trace.weights("first_step", trainer.model)

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.trace.weights(f"epoch{trainer.epoch}", trainer.model)

