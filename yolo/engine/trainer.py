"""The training run: upstream YOLOv5's recipe as one function, ``train(cfg, callbacks) -> TrainResults``.

Warmup, nominal-batch accumulation, one-cycle/linear LR, EMA, AMP (CUDA), gradient clipping, multi-scale,
autoanchor, layer freezing, early stopping, ``last.pt``/``best.pt`` every epoch, resume, and a final validation
of ``best.pt``.  Tracking (MLflow) and plots observe the run; neither can stop it.  Under ``torchrun`` the same
function runs in every process of a DDP run (:mod:`yolo.engine.distributed`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm import tqdm

from yolo.config import check_train_config
from yolo.engine import distributed, results_csv
from yolo.engine.callbacks import CallbackList, StopTraining
from yolo.engine.distributed import DistInfo, TrainTrace
from yolo.engine.optim import (
    accumulate_steps,
    apply_warmup,
    build_optimizer,
    lr_lambda,
    scaled_weight_decay,
    warmup_iterations,
)
from yolo.engine.setup import (
    check_img_size,
    hydra_output_dir,
    increment_dir,
    init_seeds,
)
from yolo.models.yolo import to_plain

log = logging.getLogger("yolo")

PROGRESS_HEADER = ("%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")


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


def _find_resume_checkpoint(resume, project: str) -> Path:
    """``resume=true`` → the newest ``last.pt`` under ``project``; ``resume=path`` → that file."""
    from yolo.checkpoint import CheckpointError

    if isinstance(resume, str) and resume.lower() not in ("true", "1", "yes"):
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"resume={resume}: no such checkpoint")
        return path
    candidates = sorted(Path(project).glob("**/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"resume=true: no last.pt found under {project}/")
    return candidates[-1]


class _Tracking:
    """Thin adapter over :mod:`yolo.tracking` so the trainer works with MLflow off or broken."""

    def __init__(self, cfg, save_dir: Path, resume_run_id: str | None, enabled: bool = True):
        self.tracker = None
        if not (enabled and cfg.mlflow.enabled):
            return
        try:
            from yolo.tracking import start_training_run

            self.tracker = start_training_run(cfg, save_dir, resume_run_id)
        except Exception as e:  # tracking must never kill a run
            from yolo.utils.redact import redact_text

            log.warning(redact_text(f"WARNING: MLflow tracking disabled: {e}"))
            self.tracker = None

    @property
    def run_id(self) -> str | None:
        return getattr(self.tracker, "run_id", None) if self.tracker else None

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if self.tracker is not None:
                try:
                    return getattr(self.tracker, name)(*args, **kwargs)
                except Exception as e:
                    log.warning(f"WARNING: MLflow {name} failed: {e}")
        return call


def train(cfg, callbacks: Iterable[Any] = (), save_dir: str | Path | None = None) -> TrainResults:
    """Train a detector as configured by ``cfg`` (a validated :class:`yolo.config.TrainConfig`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is one process of a DDP run (see
    :mod:`yolo.engine.distributed`): each process trains on its share of every epoch with ``batch_size /
    WORLD_SIZE`` images per step; rank 0 alone validates, plots, saves checkpoints, logs to MLflow and calls the
    ``callbacks``; every process returns rank 0's results.
    """
    check_train_config(cfg)  # every number, key and choice, before anything is read
    info = DistInfo.from_env()
    try:
        with distributed.quiet_unless_main(info):
            return _train(cfg, CallbackList(callbacks), save_dir, info)
    finally:
        distributed.shutdown()


def _resume(cfg, save_dir):
    """``(cfg, checkpoint or None, save_dir)``: a resumed run takes its checkpoint's config and folder."""
    from yolo.checkpoint import CheckpointError, load_checkpoint
    from yolo.config import TrainConfig

    if cfg.resume in (False, None, "", "false", "False"):
        return cfg, None, save_dir
    ckpt_path = _find_resume_checkpoint(cfg.resume, cfg.project)
    ckpt = load_checkpoint(ckpt_path)
    if not ckpt.config:
        raise CheckpointError(f"{ckpt_path}: checkpoint holds no training config, cannot resume")
    device = cfg.device  # where to run is the caller's choice (under torchrun the process group is already on it)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt.config)
    cfg.resume, cfg.device = str(ckpt_path), device
    log.info(f"Resuming training from {ckpt_path} (epoch {ckpt.epoch + 1} of {cfg.epochs})")
    return cfg, ckpt, ckpt_path.parent.parent


def _run_dir(cfg, save_dir, info: DistInfo) -> Path:
    """The run folder: the one given, Hydra's, or a fresh ``project/name{N}``; under DDP always rank 0's."""
    if info.is_main:
        save_dir = Path(save_dir or hydra_output_dir() or increment_dir(Path(cfg.project) / cfg.name))
    return distributed.shared_path(save_dir, info)


def _train(cfg, callbacks: CallbackList, save_dir, info: DistInfo) -> TrainResults:
    from yolo.checkpoint import load_checkpoint, save_checkpoint
    from yolo.models.transfer import transfer_weights
    from yolo.data.config import ensure_dataset, load_data_config
    from yolo.data.loader import create_dataloader
    from yolo.ema import ModelEMA
    from yolo.loss import ComputeLoss, scale_loss_gains
    from yolo.models import build_model
    from yolo.val import validate

    t_start = time.time()
    cfg, resume_ckpt, save_dir = _resume(cfg, save_dir)
    distributed.check_config(cfg, info)
    device = distributed.setup(cfg.device, info)
    main = info.is_main
    save_dir = _run_dir(cfg, save_dir, info)
    wdir = save_dir / "weights"
    last, best = wdir / "last.pt", wdir / "best.pt"
    hyp = cfg.hyp
    if main:
        wdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(hyp, save_dir / "hyp.yaml")
        OmegaConf.save(cfg, save_dir / "config.yaml", resolve=True)

    init_seeds(cfg.seed + 1, deterministic=cfg.deterministic)
    use_amp = bool(cfg.amp) and device.type == "cuda"
    py_rng = random.Random(cfg.seed)

    # ---- data config (one process per machine downloads or generates the dataset) ------------------------------
    from yolo.config import data_source

    with distributed.local_main_first(info):
        data = load_data_config(data_source(cfg.data), cfg.datasets_dir)
        ensure_dataset(data)
    nc = 1 if cfg.single_cls else data.nc
    names = ["item"] if cfg.single_cls and len(data.names) != 1 else list(data.names)

    # ---- model -------------------------------------------------------------------------------------------------
    weights_ckpt = resume_ckpt or (load_checkpoint(cfg.weights) if cfg.weights else None)
    model_cfg = to_plain(cfg.model) if cfg.model is not None else None
    if model_cfg is None:
        if weights_ckpt is None:
            raise ValueError("no model: choose model=yolov5n|s|m|l|x or give weights=path/to/checkpoint.pt")
        model_cfg = dict(weights_ckpt.model_yaml)
    if hyp.anchors:
        model_cfg["anchors"] = int(round(hyp.anchors))
    # NHWC (channels_last) convolutions are markedly faster on CPU (oneDNN) and on recent GPUs
    model = build_model(model_cfg, nc=nc).to(device, memory_format=torch.channels_last)
    if weights_ckpt is not None:
        # a chosen architecture or anchor count brings its own anchors (upstream's rule); resume restores all
        exclude = ["anchor"] if (cfg.model is not None or hyp.anchors) and resume_ckpt is None else []
        transfer_weights(model, weights_ckpt.state_dict, exclude=exclude, source=cfg.weights or cfg.resume)
    if cfg.freeze:
        frozen = freeze_layers(model, list(cfg.freeze))
        log.info(f"Freezing {len(frozen)} parameter tensors of layers {list(cfg.freeze)}")
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(cfg.imgsz, gs, floor=gs * 2)
    batch_size = cfg.batch_size  # the global batch: DDP processes take batch_size / WORLD_SIZE each

    # ---- optimizer, schedule, EMA (rank 0 keeps the EMA) -------------------------------------------------------
    accumulate = accumulate_steps(batch_size)
    decay = scaled_weight_decay(hyp.weight_decay, batch_size)
    optimizer = build_optimizer(model, cfg.optimizer.name, hyp.lr0, hyp.momentum, decay, cfg.optimizer.nesterov)
    lf = lr_lambda(hyp.lrf, cfg.epochs, cfg.cos_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model) if main else None
    start_epoch, best_fitness = 0, 0.0
    if resume_ckpt is not None:
        if resume_ckpt.optimizer:
            optimizer.load_state_dict(resume_ckpt.optimizer)
        if ema is not None and resume_ckpt.ema_state_dict:
            ema.ema.load_state_dict({k: v.float() if v.is_floating_point() else v
                                     for k, v in resume_ckpt.ema_state_dict.items()})
            ema.updates = int(resume_ckpt.updates or 0)
        best_fitness = float(resume_ckpt.best_fitness or 0.0)
        start_epoch = resume_ckpt.epoch + 1
        if start_epoch >= cfg.epochs:
            log.info(f"{resume_ckpt} already finished {cfg.epochs} epochs; nothing to resume")
    scheduler.last_epoch = start_epoch - 1

    # ---- loaders (the label cache is written once per machine; rank 0 alone validates) -------------------------
    hyp_dict = to_plain(hyp)
    with distributed.local_main_first(info):
        train_loader, dataset = create_dataloader(
            data.train, imgsz, batch_size, gs, hyp=hyp_dict, augment=True, rect=cfg.rect, workers=cfg.workers,
            shuffle=not cfg.rect, seed=cfg.seed, cache=cfg.cache, image_weights=cfg.image_weights,
            single_cls=cfg.single_cls, nc=data.nc, prefix="train: ", rank=info.rank, world_size=info.world_size)
    max_label = max((int(lb[:, 0].max()) for lb in dataset.labels if len(lb)), default=-1)
    if max_label >= nc:
        raise ValueError(f"label class {max_label} exceeds nc={nc} in {cfg.data}")
    val_loader = None
    if main:
        val_loader, _ = create_dataloader(
            data.val, imgsz, batch_size // info.world_size * 2, gs, hyp=hyp_dict, augment=False, rect=True,
            pad=0.5, workers=cfg.workers * 2, shuffle=False, seed=cfg.seed, cache=None if cfg.noval else cfg.cache,
            single_cls=cfg.single_cls, nc=data.nc, prefix="val: ")

    if main and resume_ckpt is None:
        if not cfg.noautoanchor:
            from yolo.autoanchor import check_anchors
            check_anchors(dataset, model, thr=hyp.anchor_t, imgsz=imgsz, rng=np.random.default_rng(cfg.seed))
        model.half().float()  # pre-reduce anchor precision, as upstream does
        ema = ModelEMA(model)
    if main and not cfg.noplots and resume_ckpt is None:
        _plot_labels_background(dataset, names, save_dir)

    # ---- loss gains and model attributes; DDP copies rank 0's weights and anchors to every process -------------
    nl = model.detect.nl
    loss_hyp = scale_loss_gains(hyp_dict, nl, nc, imgsz, label_smoothing=cfg.label_smoothing)
    model.nc, model.names, model.hyp = nc, names, loss_hyp
    model.class_weights = _class_weights(dataset.labels, nc).to(device) * nc
    net = model
    model = distributed.wrap_model(model, device, info, sync_bn=cfg.sync_bn)
    compute_loss = ComputeLoss(model, loss_hyp)

    # ---- tracking and callbacks (rank 0) -----------------------------------------------------------------------
    run_id = resume_ckpt.extra.get("mlflow_run_id") if resume_ckpt else None
    tracking = _Tracking(cfg, save_dir, run_id, enabled=main)
    csv_path = save_dir / "results.csv"
    if main:
        results_csv.truncate(csv_path, start_epoch)
        callbacks.fire("on_train_start", SimpleNamespace(save_dir=save_dir, epochs=cfg.epochs, start_epoch=start_epoch,
                                                         nc=nc, names=names, imgsz=imgsz, cfg=cfg,
                                                         resumed=resume_ckpt is not None))
    trace = TrainTrace.from_env(info, dataset.im_files)
    if trace is not None:
        trace.weights("start", model)

    nb = len(train_loader)
    nw = warmup_iterations(hyp.warmup_epochs, nb)
    last_opt_step = -1
    maps = np.zeros(nc)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    stopper = EarlyStopping(cfg.patience)
    stopper.best_fitness = best_fitness
    results = TrainResults(save_dir=str(save_dir), best_fitness=best_fitness, mlflow_run_id=tracking.run_id)
    val_res = None
    log.info(f"Image sizes {imgsz} train, {imgsz} val\nUsing {getattr(train_loader, 'num_workers', 0)} dataloader "
             f"workers\nLogging results to {save_dir}\nStarting training for {cfg.epochs} epochs...")

    epoch = start_epoch - 1
    stopped_by: StopTraining | None = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            if cfg.image_weights:
                cw = net.class_weights.cpu().numpy() * (1 - maps) ** 2 / nc
                dataset.update_image_weights(cw)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            mloss = torch.zeros(3, device=device)
            log.info(PROGRESS_HEADER)
            pbar = tqdm(enumerate(train_loader), total=nb, bar_format="{l_bar}{bar:10}{r_bar}", disable=not main)
            t_epoch = time.perf_counter()
            optimizer.zero_grad()
            for i, (imgs, targets, paths, _) in pbar:
                ni = i + nb * epoch
                if trace is not None:
                    trace.batch(epoch, paths)
                imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                imgs = imgs.float() / 255
                if ni <= nw:
                    accumulate = apply_warmup(optimizer, ni, nw, lf(epoch), hyp, batch_size)
                if cfg.multi_scale:
                    imgs = _multi_scale(imgs, imgsz, gs, py_rng)
                step_now = ni - last_opt_step >= accumulate
                with distributed.gradient_sync(model, step_now):
                    with torch.autocast(device_type=device.type, enabled=use_amp):
                        pred = model(imgs)
                        loss, loss_items = compute_loss(pred, targets.to(device))
                    # DDP averages gradients over the processes; scaling restores the sum over the global batch
                    scaler.scale(loss * info.world_size).backward()
                if step_now:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad()
                    if ema is not None:
                        ema.update(model)
                    if trace is not None and last_opt_step < 0:
                        trace.weights("first_step", model)
                    last_opt_step = ni
                mloss = (mloss * i + loss_items) / (i + 1)
                if main:
                    mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                    pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                        f"{epoch}/{cfg.epochs - 1}", mem, *mloss, targets.shape[0], imgs.shape[-1]))
                    if ni < 3 and not cfg.noplots and epoch == start_epoch:
                        _plot_batch_background(imgs, targets, paths, save_dir / f"train_batch{ni}.jpg", names)
            lr = [g["lr"] for g in optimizer.param_groups]
            scheduler.step()
            epoch_train_s = time.perf_counter() - t_epoch
            if trace is not None:
                trace.weights(f"epoch{epoch}", model)

            # ---- end of epoch (rank 0): validate, record, save; then every process learns whether to stop -----
            verdict: _Stop | None = None  # rank 0's decision to stop after this epoch
            if main:
                ema.update_attr(model, include=["yaml", "nc", "hyp", "names", "stride", "class_weights"])
                final_epoch = (epoch + 1 == cfg.epochs) or stopper.possible_stop
                if not cfg.noval or final_epoch:
                    val_res = validate(ema.ema, val_loader, names, conf_thres=cfg.conf_thres,
                                       iou_thres=cfg.iou_thres, max_det=cfg.max_det, single_cls=cfg.single_cls,
                                       half=use_amp, compute_loss=compute_loss, plots=False)
                    maps = val_res.maps
                row = _epoch_row(mloss, val_res, lr)
                fi = float(val_res.fitness) if val_res is not None else 0.0
                stop = stopper(epoch=epoch, fitness=fi)
                if fi > best_fitness:
                    best_fitness = fi
                results_csv.append_row(csv_path, epoch, row)
                metrics = {**row, "fitness": fi, "best_fitness": best_fitness, "time/epoch_train_s": epoch_train_s}
                results.history.append({"epoch": epoch, **metrics})
                tracking.log_metrics(metrics, step=epoch)

                if not cfg.nosave or final_epoch:
                    extra = {"mlflow_run_id": tracking.run_id, "save_dir": str(save_dir)}
                    common = dict(model=model, ema=ema.ema, optimizer=optimizer, epoch=epoch,
                                  best_fitness=best_fitness, updates=ema.updates, config=to_plain(cfg), extra=extra)
                    save_checkpoint(last, **common)
                    if best_fitness == fi:
                        save_checkpoint(best, **common)
                    if cfg.save_period > 0 and epoch % cfg.save_period == 0:
                        save_checkpoint(wdir / f"epoch{epoch}.pt", **common)
                try:
                    callbacks.fire("on_fit_epoch_end", SimpleNamespace(epoch=epoch, metrics=metrics,
                                                                       best_fitness=best_fitness, save_dir=save_dir))
                except StopTraining as e:
                    verdict = _Stop(str(e), e.pruned, by_callback=True)
                if verdict is None and stop:
                    verdict = _Stop("early stopping", pruned=False, by_callback=False)
            verdict = distributed.broadcast(verdict, info)
            results.epochs_completed = epoch + 1
            if verdict is not None:
                results.stopped_early = True
                if verdict.by_callback:
                    stopped_by = StopTraining(verdict.reason, pruned=verdict.pruned)
                break
    except BaseException:
        tracking.end(status="FAILED")
        raise

    if main:
        if stopped_by is not None:
            _stopped_by_callback(results, stopped_by, epoch, tracking, val_res, best_fitness, last, best)
        else:
            _finish(cfg, results, tracking, callbacks, save_dir, val_loader, val_res, best_fitness, names, device,
                    use_amp, compute_loss, t_start, start_epoch)
    return TrainResults(**distributed.broadcast(results.as_dict(), info))


def _stopped_by_callback(results: TrainResults, e: StopTraining, epoch: int, tracking: _Tracking, val_res,
                         best_fitness: float, last: Path, best: Path) -> None:
    """A callback ended the run (e.g. evolution's pruner): no stripping, no final validation."""
    results.pruned = e.pruned
    log.info(f"Training stopped after epoch {epoch}: {e}")
    tracking.end(status="KILLED" if e.pruned else "FINISHED")
    _fill_results(results, val_res, best_fitness, last, best)


def _finish(cfg, results: TrainResults, tracking: _Tracking, callbacks: CallbackList, save_dir: Path, val_loader,
            val_res, best_fitness: float, names, device, use_amp: bool, compute_loss, t_start: float,
            start_epoch: int) -> None:
    """End of training (rank 0): strip optimizers, validate ``best.pt``, plot, upload artifacts, end the run."""
    from yolo.checkpoint import load_model, strip_optimizer
    from yolo.val import validate

    last, best = save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt"
    csv_path = save_dir / "results.csv"
    log.info(f"\n{cfg.epochs - start_epoch} epochs completed in {(time.time() - t_start) / 3600:.3f} hours.")
    for f in (last, best):
        if f.exists():
            strip_optimizer(f)
    if best.exists() and not cfg.noval:
        best_model, _ = load_model(best, fuse=True)
        best_model.to(device, memory_format=torch.channels_last)
        log.info(f"\nValidating {best}...")
        val_res = validate(best_model, val_loader, names, conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                           max_det=cfg.max_det, single_cls=cfg.single_cls, half=use_amp,
                           compute_loss=compute_loss, save_dir=save_dir, plots=not cfg.noplots, verbose=True)
        for line in val_res.table:
            log.info(line)
    _fill_results(results, val_res, best_fitness, last, best)
    if not cfg.noplots:
        _plot_results(csv_path, save_dir)
    _log_artifacts(tracking, save_dir, best if cfg.mlflow.log_weights else None)
    tracking.end(status="FINISHED")
    results.mlflow_run_id = tracking.run_id
    log.info(f"Results saved to {save_dir}\n  weights: {last} and {best}\n  metrics: {csv_path}"
             + (f"\n  MLflow run: {tracking.run_id}" if tracking.run_id else ""))
    callbacks.fire("on_train_end", SimpleNamespace(results=results, status="FINISHED", save_dir=save_dir))


def _fill_results(results: TrainResults, val_res, best_fitness: float, last: Path, best: Path) -> None:
    if val_res is not None:
        results.precision, results.recall, results.map50, results.map = val_res.metrics
        results.val_losses = tuple(val_res.losses)
        results.fitness = float(val_res.fitness)
    results.best_fitness = float(best_fitness)
    results.last = str(last) if last.exists() else None
    results.best = str(best) if best.exists() else None


def _epoch_row(mloss: torch.Tensor, val_res, lr: list[float]) -> dict[str, float]:
    vals = list(mloss.cpu().tolist())
    if val_res is not None:
        vals += list(val_res.metrics) + list(val_res.losses)
    else:
        vals += [0.0] * 7
    vals += list(lr)
    return results_csv.columns_for(vals)


def _multi_scale(imgs: torch.Tensor, imgsz: int, gs: int, rng: random.Random) -> torch.Tensor:
    size = rng.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = size / max(imgs.shape[2:])
    if sf != 1:
        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
        imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
    return imgs


def _class_weights(labels, nc: int) -> torch.Tensor:
    """Inverse class frequency, normalised (upstream's labels_to_class_weights)."""
    if not len(labels):
        return torch.ones(nc) / nc
    present = [lb[:, 0] for lb in labels if len(lb)]
    classes = np.concatenate(present, 0).astype(int) if present else np.zeros(0, int)
    weights = np.bincount(classes, minlength=nc).astype(float)
    weights[weights == 0] = 1
    weights = 1 / weights
    weights /= weights.sum()
    return torch.from_numpy(weights).float()


def _plot_labels_background(dataset, names, save_dir: Path) -> None:
    try:
        from yolo.data.plots import plot_labels, run_in_background

        present = [lb for lb in dataset.labels if len(lb)]
        labels = np.concatenate(present, 0) if present else np.zeros((0, 5))
        run_in_background(plot_labels, labels, names, save_dir / "labels.jpg")
    except Exception as e:
        log.warning(f"WARNING: labels plot failed: {e}")


def _plot_batch_background(imgs, targets, paths, path: Path, names) -> None:
    try:
        from yolo.data.plots import plot_images, run_in_background

        run_in_background(plot_images, (imgs.detach().cpu() * 255).to(torch.uint8), targets.cpu(), list(paths),
                          path, names)
    except Exception as e:
        log.warning(f"WARNING: batch plot failed: {e}")


def _plot_results(csv_path: Path, save_dir: Path) -> None:
    try:
        from yolo.plots import plot_results

        plot_results(csv_path, save_dir / "results.png")
    except Exception as e:
        log.warning(f"WARNING: results plot failed: {e}")


def _log_artifacts(tracking: _Tracking, save_dir: Path, best: Path | None) -> None:
    for name in ("config.yaml", "hyp.yaml", "results.csv", "results.png", "labels.jpg", "confusion_matrix.png",
                 "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        if (save_dir / name).exists():
            tracking.log_artifact(save_dir / name)
    hydra_dir = save_dir / ".hydra"
    if hydra_dir.is_dir():
        tracking.log_artifacts(hydra_dir, artifact_path="hydra")
    if best is not None and best.exists():
        tracking.log_artifact(best, artifact_path="weights")
