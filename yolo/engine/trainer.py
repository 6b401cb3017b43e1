"""The training run as an object with phases: :class:`Trainer` (upstream YOLOv5's recipe).

``Trainer(cfg, callbacks, save_dir).fit()`` runs ``setup`` (run folder, data, model, optimizer, scheduler, EMA,
loaders, loss), then for each epoch ``train_epoch`` (:func:`yolo.engine.loop.train_one_epoch` over objects),
``validate`` and ``end_epoch`` (fitness, ``results.csv``, checkpoints, early stop), then ``finish`` (strip,
final validation of ``best.pt``). State lives on the object; named events (:mod:`yolo.engine.callbacks`) hand
it to callbacks. The trainer knows no integration: MLflow, plots, evolution's pruning and the DDP trace are
callbacks attached by the caller (:func:`yolo.train.train` attaches the default ones). Under ``torchrun`` every
process runs a Trainer (:mod:`yolo.engine.distributed`); rank 0 alone validates, saves and fires the rank-0 events.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from yolo.autoanchor import check_anchors
from yolo.checkpoint import load_checkpoint, load_model, save_checkpoint, strip_optimizer
from yolo.config import check_train_config, data_source
from yolo.data.config import ensure_dataset, load_data_config
from yolo.data.loader import create_dataloader
from yolo.ema import ModelEMA
from yolo.engine import distributed, precision, resume, results_csv, run_dir
from yolo.engine.callbacks import CallbackList, StopTraining
from yolo.engine.distributed import DistInfo
from yolo.engine.loop import PROGRESS_HEADER, Stepper, multi_scale, train_one_epoch
from yolo.engine.optim import (
    accumulate_steps,
    apply_warmup,
    build_optimizer,
    lr_lambda,
    scaled_weight_decay,
    warmup_iterations,
)
from yolo.engine.setup import check_img_size, hydra_output_dir, init_seeds
from yolo.errors import ConfigError
from yolo.loss import ComputeLoss, scale_loss_gains
from yolo.models import build_model
from yolo.models.transfer import load_state_strict, transfer_weights
from yolo.models.yolo import to_plain
from yolo.utils.files import atomic_write_text, remove_stale_temps
from yolo.val import validate

log = logging.getLogger("yolo")

SCRATCH_NOTE = "Training from scratch (no weights=): pass weights=yolov5n.pt to fine-tune"


@dataclass
class TrainResults:
    """What a training run returns (evolution reads this)."""

    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    val_losses: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fitness: float = 0.0
    best_fitness: float = 0.0
    epochs_completed: int = 0
    save_dir: str = ""
    last: str | None = None
    best: str | None = None
    mlflow_run_id: str | None = None
    stopped_early: bool = False
    pruned: bool = False
    paused: bool = False  # stopped at ``stop_epoch`` with a resumable last.pt
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(NamedTuple):
    """Why training stops after an epoch (rank 0 decides and tells the other processes)."""

    reason: str
    pruned: bool
    by_callback: bool


class EarlyStopping:
    """Stop when fitness has not improved for ``patience`` epochs (0 or less: never)."""

    def __init__(self, patience: int = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience if patience > 0 else float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            log.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                     f"Best results observed at epoch {self.best_epoch}, best model saved as best.pt.")
        return stop


def freeze_layers(model: nn.Module, freeze: list[int]) -> list[str]:
    """``[10]`` freezes layers 0-9 (upstream's ``--freeze 10``); a longer list freezes exactly those layers."""
    indices = list(range(freeze[0])) if len(freeze) == 1 else list(freeze)
    prefixes = [f"model.{i}." for i in indices]
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad = True
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad = False
            frozen.append(name)
    return frozen


def class_weights(labels, nc: int) -> torch.Tensor:
    """Inverse class frequency, normalised (upstream's labels_to_class_weights)."""
    present = [lb[:, 0] for lb in labels if len(lb)]
    if not present:
        return torch.ones(nc) / nc
    weights = np.bincount(np.concatenate(present, 0).astype(int), minlength=nc).astype(float)
    weights[weights == 0] = 1
    weights = 1 / weights
    return torch.from_numpy(weights / weights.sum()).float()


def epoch_row(mloss: torch.Tensor, val_res, lr: list[float]) -> dict[str, float]:
    """One ``results.csv`` row: train losses, val metrics and losses (zeros when not validated), learning rates."""
    vals = list(mloss.cpu().tolist())
    vals += list(val_res.metrics) + list(val_res.losses) if val_res is not None else [0.0] * 7
    return results_csv.columns_for(vals + list(lr))


class Trainer:
    """One training run. Read by callbacks (see :mod:`yolo.engine.callbacks` for what each event carries)."""

    def __init__(self, cfg, callbacks: Iterable[Any] = (), save_dir: str | Path | None = None):
        self.info = DistInfo.from_env()
        self.main = self.info.is_main
        self.callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        self.requested_dir = save_dir
        self.t_start = time.time()
        check_train_config(cfg)  # every number, key and choice, before anything is read
        self.resume_plan = self._resume_plan(cfg)
        self.cfg = self.resume_plan.cfg if self.resume_plan is not None else cfg
        self.resumed = self.resume_plan is not None
        done = self.resume_plan.start_epoch if self.resume_plan is not None else 0
        if self.pausing and done >= self.end_epoch_index:
            raise ConfigError(f"stop_epoch={self.cfg.stop_epoch}: the run has already trained {done} epochs; give a "
                              f"later stop_epoch, or none to train to the end ({self.cfg.epochs})")
        self.ckpt_extra: dict[str, Any] = {}  # callbacks may add to what every checkpoint records
        self.results = TrainResults()
        self.epoch = self.start_epoch = 0
        self.metrics: dict[str, float] = {}
        self.val_res = None
        self.best_fitness = 0.0
        self.status = "RUNNING"
        self._hold: run_dir.RunHold | None = None

    # ---- events ------------------------------------------------------------------------------------------------
    def fire(self, event: str, everywhere: bool = False) -> None:
        """Fire ``event`` on rank 0 (or, with ``everywhere``, in every process)."""
        if self.main or everywhere:
            self.callbacks.fire(event, self)

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def end_epoch_index(self) -> int:
        """Epochs this leg trains up to: ``stop_epoch`` when it cuts the schedule short, else ``epochs``."""
        stop = self.cfg.get("stop_epoch")
        return min(int(stop), self.cfg.epochs) if stop else self.cfg.epochs

    def recorded_epochs(self) -> list[dict[str, float]]:
        """The rows of this run's results.csv (a resumed run: its earlier epochs)."""
        return results_csv.read(self.csv_path) if self.csv_path.is_file() else []

    @property
    def pausing(self) -> bool:
        return self.end_epoch_index < self.cfg.epochs

    @property
    def save_dir_str(self) -> str:
        return str(self.save_dir)

    # ---- setup -------------------------------------------------------------------------------------------------
    @staticmethod
    def _resume_plan(cfg) -> resume.ResumePlan | None:
        p = resume.plan(cfg, resume.command_keys())
        if p is None:
            return None
        p.cfg.device = cfg.device  # under torchrun the process group is already on the caller's device
        where = p.run_dir if p.run_dir is not None else "a new run folder (the checkpoint is not in its run's folder)"
        log.info(f"Resuming training from {p.path} (epoch {p.start_epoch} of {p.cfg.epochs}) into {where}")
        if not p.has_epochs_left:
            log.info(f"{p.path} has trained all {p.cfg.epochs} epochs; finishing the run (strip, final validation)")
        return p

    def setup(self) -> None:
        cfg = self.cfg
        distributed.check_config(cfg, self.info)
        self.device = distributed.setup(cfg.device, self.info)
        self._open_run_dir()
        init_seeds(cfg.seed + 1, deterministic=cfg.deterministic)
        self.precision = precision.choose(cfg.amp, self.device)
        self.py_rng = random.Random(cfg.seed)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_loaders()
        self._setup_loss()

    def _open_run_dir(self) -> None:
        """The run folder, held for this run (rank 0): the resumed run's own, the caller's, Hydra's, or a fresh
        ``project/name{N}``; under DDP always rank 0's."""
        cfg, p = self.cfg, self.resume_plan
        save_dir, self.run_id = self.requested_dir, None
        if self.main:
            if p is not None and p.run_dir is not None:
                folder, run_id, exist_ok = p.run_dir, p.run_id, True
            else:
                folder = Path(save_dir or hydra_output_dir() or run_dir.claim_fresh(Path(cfg.project) / cfg.name))
                run_id, exist_ok = None, bool(cfg.exist_ok) or save_dir is not None  # a caller owns what it names
            self.run_id, self._hold = run_dir.open_run(folder, run_id, exist_ok=exist_ok)
            save_dir = folder
        self.save_dir = distributed.shared_path(Path(save_dir) if save_dir else None, self.info)
        self.wdir = self.save_dir / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.csv_path = self.save_dir / "results.csv"
        if self.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            for folder in (self.save_dir, self.wdir):
                remove_stale_temps(folder)  # what a save killed half-way left behind
            atomic_write_text(self.save_dir / "hyp.yaml", OmegaConf.to_yaml(cfg.hyp, resolve=True))
            atomic_write_text(self.save_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def _setup_data(self) -> None:
        cfg = self.cfg
        with distributed.local_main_first(self.info):  # one process per machine downloads or generates it
            self.data = load_data_config(data_source(cfg.data), cfg.datasets_dir)
            ensure_dataset(self.data)
        self.nc = 1 if cfg.single_cls else self.data.nc
        self.names = ["item"] if cfg.single_cls and len(self.data.names) != 1 else list(self.data.names)
        if self.resume_plan is not None:
            resume.check_data_matches(self.resume_plan, self.nc, self.names)

    def _setup_model(self) -> None:
        cfg, hyp, rp = self.cfg, self.cfg.hyp, self.resume_plan
        ckpt = rp.ckpt if rp is not None else (load_checkpoint(cfg.weights) if cfg.weights else None)
        if ckpt is None:
            log.info(SCRATCH_NOTE)
        model_cfg = to_plain(cfg.model) if cfg.model is not None else None
        if model_cfg is None:
            if ckpt is None:
                raise ConfigError("model: none chosen; choose model=yolov5n|s|m|l|x or give weights=path/to/ckpt.pt")
            model_cfg = dict(ckpt.model_yaml)
        if hyp.anchors:
            model_cfg["anchors"] = int(round(hyp.anchors))
        # NHWC (channels_last) convolutions are markedly faster on CPU (oneDNN) and on recent GPUs
        model = build_model(model_cfg, nc=self.nc).to(self.device, memory_format=torch.channels_last)
        if rp is not None:  # a resume restores everything, and only into its own architecture
            load_state_strict(model, rp.ckpt.state_dict, rp.path)
        elif ckpt is not None:  # a chosen architecture or anchor count brings its own anchors (upstream's rule)
            exclude = ["anchor"] if (cfg.model is not None or hyp.anchors) else []
            transfer_weights(model, ckpt.state_dict, exclude=exclude, source=cfg.weights)
        if cfg.freeze:
            frozen = freeze_layers(model, list(cfg.freeze))
            log.info(f"Freezing {len(frozen)} parameter tensors of layers {list(cfg.freeze)}")
        self.model = model
        self.gs = max(int(model.stride.max()), 32)
        self.imgsz = check_img_size(cfg.imgsz, self.gs, floor=self.gs * 2)
        self.batch_size = cfg.batch_size  # the global batch: DDP processes take batch_size / WORLD_SIZE each

    def _setup_optimizer(self) -> None:
        cfg, hyp, rp = self.cfg, self.cfg.hyp, self.resume_plan
        self.optimizer = build_optimizer(self.model, cfg.optimizer.name, hyp.lr0, hyp.momentum,
                                         scaled_weight_decay(hyp.weight_decay, self.batch_size),
                                         cfg.optimizer.nesterov)
        self.lf = lr_lambda(hyp.lrf, cfg.epochs, cfg.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.ema = ModelEMA(self.model) if self.main else None
        if rp is not None:
            if rp.ckpt.optimizer:
                self.optimizer.load_state_dict(rp.ckpt.optimizer)
            if self.ema is not None and rp.ckpt.ema_state_dict:
                load_state_strict(self.ema.ema, rp.ckpt.ema_state_dict, rp.path)
                self.ema.updates = int(rp.ckpt.updates or 0)
            best = float(rp.ckpt.best_fitness or 0.0)
            self.best_fitness = best if math.isfinite(best) else 0.0
            self.start_epoch = rp.start_epoch
        self.scheduler.last_epoch = self.start_epoch - 1

    def _setup_loaders(self) -> None:
        cfg, info = self.cfg, self.info
        self.hyp_dict = to_plain(cfg.hyp)
        with distributed.local_main_first(info):  # the label cache is written once per machine
            self.train_loader, self.dataset = create_dataloader(
                self.data.train, self.imgsz, self.batch_size, self.gs, hyp=self.hyp_dict, augment=True,
                rect=cfg.rect, workers=cfg.workers, shuffle=not cfg.rect, seed=cfg.seed, cache=cfg.cache,
                image_weights=cfg.image_weights, single_cls=cfg.single_cls, nc=self.data.nc, prefix="train: ",
                rank=info.rank, world_size=info.world_size)
        max_label = max((int(lb[:, 0].max()) for lb in self.dataset.labels if len(lb)), default=-1)
        if max_label >= self.nc:
            raise ConfigError(f"data: label class {max_label} exceeds nc={self.nc} of the dataset")
        self.val_loader = None
        if self.main:  # rank 0 alone validates
            self.val_loader, _ = create_dataloader(
                self.data.val, self.imgsz, self.batch_size // info.world_size * 2, self.gs, hyp=self.hyp_dict,
                augment=False, rect=True, pad=0.5, workers=cfg.workers * 2, shuffle=False, seed=cfg.seed,
                cache=None if cfg.noval else cfg.cache, single_cls=cfg.single_cls, nc=self.data.nc,
                prefix="val: ")

    def _setup_loss(self) -> None:
        cfg, model = self.cfg, self.model
        if self.main and not self.resumed:
            if not cfg.noautoanchor:
                check_anchors(self.dataset, model, thr=cfg.hyp.anchor_t, imgsz=self.imgsz,
                              rng=np.random.default_rng(cfg.seed))
            model.half().float()  # pre-reduce anchor precision, as upstream does
            self.ema = ModelEMA(model)
        loss_hyp = scale_loss_gains(self.hyp_dict, model.detect.nl, self.nc, self.imgsz,
                                    label_smoothing=cfg.label_smoothing)
        model.nc, model.names, model.hyp = self.nc, self.names, loss_hyp
        model.class_weights = class_weights(self.dataset.labels, self.nc).to(self.device) * self.nc
        self.net = model  # the bare model (DDP wraps it below)
        self.model = distributed.wrap_model(model, self.device, self.info, sync_bn=cfg.sync_bn)
        self.compute_loss = ComputeLoss(self.model, loss_hyp)
        checked = precision.check_amp(model, self.precision) if self.main else None  # upstream's AMP check
        self.precision = distributed.broadcast(checked, self.info)
        log.info(self.precision.describe())
        self.half_val = self.precision.mode == "fp16"  # fp16 validation on CUDA, as upstream; else fp32
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.scaler)
        self.stepper = Stepper(self.model, self.optimizer, self.scaler, self.ema, self.info.world_size,
                               accumulate_steps(self.batch_size))
        if self.resume_plan is not None:  # the accumulation phase goes on where it was (not in upstream's resume)
            self.stepper.last_step = resume.last_step(self.resume_plan.ckpt.extra.get("last_step"),
                                                       self.start_epoch * len(self.train_loader))
        self.nw = warmup_iterations(cfg.hyp.warmup_epochs, len(self.train_loader))
        self.stopper = EarlyStopping(cfg.patience)
        self.stopper.best_fitness = self.best_fitness
        self.maps = np.zeros(self.nc)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> TrainResults:
        try:
            self.setup()
            if self.main:
                results_csv.truncate(self.csv_path, self.start_epoch)
            self.results = TrainResults(save_dir=str(self.save_dir), best_fitness=self.best_fitness)
            self.fire("on_train_start")
            log.info(f"Image sizes {self.imgsz} train, {self.imgsz} val\nUsing "
                     f"{getattr(self.train_loader, 'num_workers', 0)} dataloader workers\nLogging results to "
                     f"{self.save_dir}\nStarting training for {self.cfg.epochs} epochs...")
            stop = self._epochs()
            if self.main:
                self._finish(stop)
            return TrainResults(**distributed.broadcast(self.results.as_dict(), self.info))
        except BaseException:
            if self.status == "RUNNING":
                self.status = "FAILED"
                self._fire_end_safely()
            raise
        finally:
            if self._hold is not None:
                self._hold.release()

    def _epochs(self) -> _Stop | None:
        for epoch in range(self.start_epoch, self.end_epoch_index):
            self.epoch = epoch
            self.train_epoch()
            verdict = self.end_epoch() if self.main else None
            verdict = distributed.broadcast(verdict, self.info)
            self.results.epochs_completed = epoch + 1
            if verdict is not None:
                self.results.stopped_early = True
                return verdict
        return None

    def train_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        if cfg.image_weights:
            cw = self.net.class_weights.cpu().numpy() * (1 - self.maps) ** 2 / self.nc
            self.dataset.update_image_weights(cw)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.fire("on_train_epoch_start", everywhere=True)
        log.info(PROGRESS_HEADER)
        t0 = time.perf_counter()
        self.mloss = train_one_epoch(
            self.model, self.train_loader, self.compute_loss, self.stepper, self.device, epoch, cfg.epochs,
            warmup=self._warmup, resize=self._resize if cfg.multi_scale else None, precision=self.precision,
            on_batch=self._on_batch, show=self.main, last_checkpoint=self.last)
        self.lr = [g["lr"] for g in self.optimizer.param_groups]
        self.scheduler.step()
        self.epoch_train_s = time.perf_counter() - t0
        self.fire("on_train_epoch_end", everywhere=True)

    def _warmup(self, ni: int, epoch: int) -> int | None:
        if ni > self.nw:
            return None
        return apply_warmup(self.optimizer, ni, self.nw, self.lf(epoch), self.cfg.hyp, self.batch_size)

    def _resize(self, imgs: torch.Tensor) -> torch.Tensor:
        return multi_scale(imgs, self.imgsz, self.gs, self.py_rng)

    def _on_batch(self, i: int, batch: tuple) -> None:
        self.batch_index, self.batch = i, batch
        self.batches_per_epoch = len(self.train_loader)
        self.fire("on_train_batch_end", everywhere=True)

    def validate(self, final_epoch: bool) -> None:
        """Score the EMA model on the val split (every epoch, or only the last with ``noval``)."""
        cfg = self.cfg
        self.ema.update_attr(self.model, include=["yaml", "nc", "hyp", "names", "stride", "class_weights"])
        if not cfg.noval or final_epoch:
            self.val_res = validate(self.ema.ema, self.val_loader, self.names, conf_thres=cfg.conf_thres,
                                    iou_thres=cfg.iou_thres, max_det=cfg.max_det, single_cls=cfg.single_cls,
                                    half=self.half_val, compute_loss=self.compute_loss, plots=False)
            self.maps = self.val_res.maps
            for line in self.val_res.table[:2]:  # upstream's line under each epoch's bar: the header, the `all` row
                log.info(line)

    def end_epoch(self) -> _Stop | None:
        """Rank 0: validate, record the epoch, save checkpoints, ask callbacks and early stopping whether to stop."""
        cfg, epoch = self.cfg, self.epoch
        final_epoch = (epoch + 1 == self.end_epoch_index) or self.stopper.possible_stop
        self.validate(final_epoch)
        row = epoch_row(self.mloss, self.val_res, self.lr)
        fi = float(self.val_res.fitness) if self.val_res is not None else 0.0
        stop = self.stopper(epoch=epoch, fitness=fi)
        self.best_fitness = max(self.best_fitness, fi)
        results_csv.append_row(self.csv_path, epoch, row)
        self.fitness = fi
        self.metrics = {**row, "fitness": fi, "best_fitness": self.best_fitness,
                        "time/epoch_train_s": self.epoch_train_s}
        self.results.history.append({"epoch": epoch, **self.metrics})
        if not cfg.nosave or final_epoch:
            self.save_checkpoints(fi)
        try:
            self.fire("on_fit_epoch_end")
        except StopTraining as e:
            return _Stop(str(e), e.pruned, by_callback=True)
        return _Stop("early stopping", pruned=False, by_callback=False) if stop else None

    def save_checkpoints(self, fi: float) -> None:
        cfg, epoch = self.cfg, self.epoch
        common = dict(model=self.model, ema=self.ema.ema, optimizer=self.optimizer, epoch=epoch,
                      best_fitness=self.best_fitness, updates=self.ema.updates, config=to_plain(cfg),
                      extra={**self.ckpt_extra, "run_id": self.run_id, "last_step": self.stepper.last_step})
        pause = self.pausing and epoch + 1 == self.end_epoch_index  # resumed exactly: float32, no rounding
        self.saved = [save_checkpoint(self.last, **common, full_precision=pause)]
        if self.best_fitness == fi:
            self.saved.append(save_checkpoint(self.best, **common))
        if cfg.save_period > 0 and epoch % cfg.save_period == 0:
            self.saved.append(save_checkpoint(self.wdir / f"epoch{epoch}.pt", **common))
        self.fire("on_model_save")

    # ---- the end -----------------------------------------------------------------------------------------------
    def _finish(self, stop: _Stop | None) -> None:
        if stop is not None and stop.by_callback:
            log.info(f"Training stopped after epoch {self.epoch}: {stop.reason}")
            self.results.pruned = stop.pruned
            self.status = "KILLED" if stop.pruned else "STOPPED"
        elif self.pausing and self.results.epochs_completed == self.end_epoch_index:
            log.info(f"Paused after epoch {self.epoch} of {self.cfg.epochs} (stop_epoch={self.cfg.stop_epoch}); "
                     f"continue with resume={self.last}")
            self.results.paused = True
            self.status = "STOPPED"
        else:
            self.finish()
            self.status = "FINISHED"
        self._fill_results()
        self.fire("on_train_end")
        log.info(f"Results saved to {self.save_dir}\n  weights: {self.last} and {self.best}\n  metrics: "
                 f"{self.csv_path}" + (f"\n  MLflow run: {self.results.mlflow_run_id}"
                                       if self.results.mlflow_run_id else ""))

    def finish(self) -> None:
        """End of training (rank 0): strip optimizers, validate ``best.pt`` with plots and the per-class table."""
        cfg = self.cfg
        log.info(f"\n{cfg.epochs - self.start_epoch} epochs completed in "
                 f"{(time.time() - self.t_start) / 3600:.3f} hours.")
        for f in (self.last, self.best):
            if f.exists():
                strip_optimizer(f)
        if self.best.exists() and not cfg.noval:
            best_model, _ = load_model(self.best, fuse=True)
            best_model.to(self.device, memory_format=torch.channels_last)
            log.info(f"\nValidating {self.best}...")
            self.val_res = validate(best_model, self.val_loader, self.names, conf_thres=cfg.conf_thres,
                                    iou_thres=cfg.iou_thres, max_det=cfg.max_det, single_cls=cfg.single_cls,
                                    half=self.half_val, compute_loss=self.compute_loss, save_dir=self.save_dir,
                                    plots=not cfg.noplots, verbose=True)
            for line in self.val_res.table:
                log.info(line)

    def _fill_results(self) -> None:
        r, v = self.results, self.val_res
        if v is not None:
            r.precision, r.recall, r.map50, r.map = v.metrics
            r.val_losses = tuple(v.losses)
            r.fitness = float(v.fitness)
        r.best_fitness = float(self.best_fitness)
        r.last = str(self.last) if self.last.exists() else None
        r.best = str(self.best) if self.best.exists() else None

    def _fire_end_safely(self) -> None:
        """A failed run still tells its callbacks (rank 0), without hiding the original error."""
        try:
            if self.main and hasattr(self, "save_dir"):
                self.fire("on_train_end")
        except Exception as e:
            log.warning(f"WARNING: a callback failed while the run was failing: {e}")
