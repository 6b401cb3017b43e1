"""Validation: run a detector over a dataset split and score it like upstream's val.py.

``validate`` is the library function (training calls it every epoch); ``run`` builds model and data from a
config; ``python -m yolo.val weights=... data=coco128 imgsz=640 batch_size=32`` is the command-line entry.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from yolo.boxes import scale_boxes, xywh2xyxy, xyxy2xywh
from yolo.cli import CONF_DIR, exit_on_user_error, run_hydra_main
from yolo.config import check_val_config, data_source  # also registers the config schema that the entry composes
from yolo.data.config import DatasetError, ensure_dataset, load_data_config
from yolo.data.loader import create_dataloader
from yolo.data.plots import plot_images
from yolo.device import select_device, sync_time
from yolo.engine.precision import Precision
from yolo.engine.precision import choose as choose_precision
from yolo.engine.setup import check_img_size, hydra_output_dir
from yolo.errors import ConfigError
from yolo.metrics import ConfusionMatrix, ap_per_class, fitness, match_predictions
from yolo.nms import non_max_suppression
from yolo.plots import plot_ap_curves, plot_confusion_matrix
from yolo.runtime import InferenceModel, load_inference_model
from yolo.utils.progress import progress

log = logging.getLogger("yolo")

TABLE_HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW_FORMAT = "%22s" + "%11i" * 2 + "%11.4f" * 4
PLOT_BATCHES = 3  # val_batch0-2_labels.jpg / _pred.jpg, as upstream
PLOT_CONF = 0.25  # predictions drawn in val_batch*_pred.jpg


@dataclass
class ValResults:
    """What one validation pass measured."""

    precision: float
    recall: float
    map50: float
    map: float
    fitness: float
    losses: tuple[float, float, float] = (0.0, 0.0, 0.0)  # box, obj, cls (zeros when no loss was computed)
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-class mAP50-95, len nc
    speed_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pre-process, inference, NMS per image
    images: int = 0
    instances: int = 0
    table: list[str] = field(default_factory=list)
    confusion_matrix: np.ndarray | None = None

    @property
    def metrics(self) -> tuple[float, float, float, float]:
        return self.precision, self.recall, self.map50, self.map

    def as_dict(self) -> dict[str, float]:
        """Metrics under upstream's results.csv / MLflow names."""
        return {
            "metrics/precision": self.precision,
            "metrics/recall": self.recall,
            "metrics/mAP_0.5": self.map50,
            "metrics/mAP_0.5:0.95": self.map,
            "val/box_loss": self.losses[0],
            "val/obj_loss": self.losses[1],
            "val/cls_loss": self.losses[2],
            "fitness": self.fitness,
        }


def _label_boxes_to_native(labels: torch.Tensor, input_hw: Sequence[int], native_hw, ratio_pad) -> torch.Tensor:
    """Labels (n, 5) cls+cxcywh normalised to the network input → cls+xyxy in original-image pixels."""
    h, w = input_hw
    boxes = xywh2xyxy(labels[:, 1:5] * torch.tensor((w, h, w, h), dtype=labels.dtype, device=labels.device))
    scale_boxes(input_hw, boxes, native_hw, ratio_pad)
    return torch.cat((labels[:, :1], boxes), 1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's device (an exported model's backend has only a buffer)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def forward(model: torch.nn.Module, im: torch.Tensor, precision: Precision | None = None):
    """The model's (inference, training) outputs for ``im``; under autocast when ``precision`` asks, as fp32."""
    if precision is None or not precision.enabled:
        return model(im)
    with precision.autocast():
        out, train_out = model(im)
    return out.float(), [x.float() for x in train_out]


def validate(
    model: torch.nn.Module,
    dataloader,
    names: Sequence[str],
    *,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    single_cls: bool = False,
    half: bool = False,
    precision: Precision | None = None,
    compute_loss: Callable | None = None,
    save_dir: Path | None = None,
    plots: bool = False,
    verbose: bool = False,
    save_json: bool = False,
    desc: str = "",
    on_batch_end: Callable[[int, torch.Tensor, torch.Tensor, list, list], None] | None = None,
) -> ValResults:
    """Score ``model`` on ``dataloader`` (batches of ``(images uint8, targets (n,6), paths, shapes)``).

    Predictions go through multi-label NMS, are rescaled to each original image and matched against the labels
    at IoU 0.50:0.05:0.95 with upstream's rules; AP uses upstream's 101-point interpolation.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    model.to(memory_format=torch.channels_last)  # NHWC convolutions: markedly faster on CPU (oneDNN)
    use_half = half and device.type == "cuda"
    nc = 1 if single_cls else len(names)
    iouv = torch.linspace(0.5, 0.95, 10, device=device)
    confusion = ConfusionMatrix(nc=nc)
    loss = torch.zeros(3, device=device)
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    jdict: list[dict] = []
    dt = [0.0, 0.0, 0.0]
    seen = 0

    bar = progress(dataloader, desc=desc or TABLE_HEADER, bar_format="{l_bar}{bar:10}{r_bar}", leave=False)
    for batch_i, (im, targets, paths, shapes) in enumerate(bar):
        t0 = sync_time(device)
        im = im.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        im = im.half() if use_half else im.float()
        im /= 255
        targets = targets.to(device)
        bs, _, height, width = im.shape
        t1 = sync_time(device)

        out, train_out = forward(model, im, precision)
        t2 = sync_time(device)
        if compute_loss is not None:
            loss += compute_loss(train_out, targets)[1]

        preds = non_max_suppression(out.float(), conf_thres, iou_thres, multi_label=True, agnostic=single_cls,
                                    max_det=max_det)
        t3 = sync_time(device)
        dt[0] += t1 - t0
        dt[1] += t2 - t1
        dt[2] += t3 - t2

        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:]
            if single_cls:
                labels[:, 0] = 0
                pred[:, 5] = 0
            nl, npr = labels.shape[0], pred.shape[0]
            native_hw, ratio_pad = shapes[si][0], shapes[si][1]
            seen += 1
            if npr == 0:
                if nl:
                    stats.append((np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), labels[:, 0].cpu().numpy()))
                    if plots:
                        confusion.process_batch(None, _label_boxes_to_native(labels, (height, width), native_hw,
                                                                             ratio_pad).cpu())
                continue
            predn = pred.clone()
            scale_boxes((height, width), predn[:, :4], native_hw, ratio_pad)
            if nl:
                labelsn = _label_boxes_to_native(labels, (height, width), native_hw, ratio_pad)
                correct = match_predictions(predn, labelsn, iouv)
                if plots:
                    confusion.process_batch(predn.cpu(), labelsn.cpu())
            else:
                correct = np.zeros((npr, 10), bool)
            stats.append((np.asarray(correct), pred[:, 4].cpu().numpy(), pred[:, 5].cpu().numpy(),
                          labels[:, 0].cpu().numpy()))
            if save_json:
                jdict.extend(_to_json(predn, Path(paths[si])))
        if plots and save_dir is not None and batch_i < PLOT_BATCHES:
            plot_val_batch(batch_i, im, targets, paths, preds, names, save_dir)
        if on_batch_end is not None:
            on_batch_end(batch_i, im, targets, paths, preds)

    results = _summarise(stats, names, nc, seen, loss.cpu() / max(len(dataloader), 1), dt, confusion,
                         save_dir if plots else None, verbose)
    if save_json and save_dir is not None:
        (Path(save_dir) / "predictions.json").write_text(json.dumps(jdict))
    if was_training:
        model.train()
    return results


def preds_as_targets(preds: Sequence[torch.Tensor]) -> torch.Tensor:
    """NMS output (per image ``(n, 6)`` xyxy in input pixels, conf, cls) as plot targets: ``(n, 7)``
    ``image_index, cls, cx, cy, w, h, conf``."""
    rows = [torch.cat((torch.full_like(p[:, :1], i), p[:, 5:6], xyxy2xywh(p[:, :4]), p[:, 4:5]), 1)
            for i, p in enumerate(preds) if len(p)]
    return torch.cat(rows, 0).float().cpu() if rows else torch.zeros((0, 7))


def plot_val_batch(batch_i: int, im: torch.Tensor, targets: torch.Tensor, paths: Sequence[str],
                   preds: Sequence[torch.Tensor], names: Sequence[str], save_dir: Path) -> None:
    """``val_batch{i}_labels.jpg`` (the labels) and ``val_batch{i}_pred.jpg`` (predictions above conf 0.25) of one
    batch, with class names; a failure is a warning, never the validation's end."""
    try:
        images = im.detach().float().cpu()
        plot_images(images, targets.detach().float().cpu(), list(paths),
                    Path(save_dir) / f"val_batch{batch_i}_labels.jpg", list(names))
        plot_images(images, preds_as_targets(preds), list(paths), Path(save_dir) / f"val_batch{batch_i}_pred.jpg",
                    list(names), conf_thres=PLOT_CONF)
    except Exception as e:  # noqa: BLE001 - a plot must never end a validation
        log.warning(f"WARNING: val batch plot failed: {e}")


def _to_json(predn: torch.Tensor, path: Path) -> list[dict]:
    stem = path.stem
    image_id = int(stem) if stem.isnumeric() else stem
    box = xyxy2xywh(predn[:, :4].clone())
    box[:, :2] -= box[:, 2:] / 2
    return [{"image_id": image_id, "category_id": int(p[5]), "bbox": [round(float(x), 3) for x in b],
             "score": round(float(p[4]), 5)} for p, b in zip(predn.tolist(), box.tolist())]


def _summarise(stats, names, nc, seen, loss, dt, confusion, save_dir, verbose) -> ValResults:
    if stats:
        tp, conf, pred_cls, target_cls = (np.concatenate(x, 0) for x in zip(*stats))
    else:
        tp, conf, pred_cls, target_cls = np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0)
    nt = np.bincount(target_cls.astype(int), minlength=nc)
    maps = np.zeros(nc)
    mp = mr = map50 = mean_ap = 0.0
    rows: list[str] = []
    if len(tp) and tp.any():
        ap = ap_per_class(tp, conf, pred_cls, target_cls)
        if save_dir is not None:
            plot_ap_curves(ap, save_dir, list(names))
        ap50, ap_all = ap.ap[:, 0], ap.ap.mean(1)
        mp, mr, map50, mean_ap = ap.p.mean(), ap.r.mean(), ap50.mean(), ap_all.mean()
        maps += mean_ap
        for i, c in enumerate(ap.classes):
            maps[int(c)] = ap_all[i]
        if verbose:
            rows = [ROW_FORMAT % (names[int(c)], seen, nt[int(c)], ap.p[i], ap.r[i], ap50[i], ap_all[i])
                    for i, c in enumerate(ap.classes)]
    elif nt.sum() == 0:
        log.warning("WARNING: no labels found in the validation set, cannot compute metrics without labels")
    all_row = ROW_FORMAT % ("all", seen, nt.sum(), mp, mr, map50, mean_ap)
    speed = tuple(x / max(seen, 1) * 1e3 for x in dt)
    if save_dir is not None:
        plot_confusion_matrix(confusion.matrix, list(names), Path(save_dir) / "confusion_matrix.png")
    return ValResults(
        precision=float(mp), recall=float(mr), map50=float(map50), map=float(mean_ap),
        fitness=float(fitness(np.array([mp, mr, map50, mean_ap]))),
        losses=tuple(float(x) for x in loss), maps=maps, speed_ms=speed, images=seen, instances=int(nt.sum()),
        table=[TABLE_HEADER, all_row, *rows], confusion_matrix=confusion.matrix,
    )


def load_weights(cfg) -> torch.nn.Module:
    """The model ``cfg.weights`` holds, loaded strictly into its own architecture (or ``cfg.model``, ``cfg.nc``):
    a missing file, a tensor that does not fit or a NaN weight is one :class:`~yolo.errors.CheckpointError`."""
    return load_val_model(cfg, torch.device("cpu")).model


def load_val_model(cfg, device: torch.device) -> InferenceModel:
    """``cfg.weights`` through :func:`yolo.runtime.load_inference_model`: a PyTorch checkpoint (strict, on the CPU
    until ``run`` moves it), or an exported ``.onnx``/``.torchscript`` file ready on ``device``."""
    if OmegaConf.is_missing(cfg, "weights") or not cfg.weights:
        raise ConfigError("weights: required: give the checkpoint to validate, e.g. weights=path/to/best.pt")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else None
    return load_inference_model(cfg.weights, device, model_cfg=model_cfg, nc=cfg.nc, fuse=cfg.fuse)


def val_batching(loaded: InferenceModel, imgsz: int, batch_size: int, weights: str) -> tuple[int, bool]:
    """``(batch_size, rect)``: rectangular batches for a model that takes any shape; for a fixed-shape export,
    square ``imgsz`` images (padded, as upstream's val does for such files) in batches of its fixed size."""
    if loaded.input_shape is None:
        return batch_size, True
    b, _, h, w = loaded.input_shape
    if (h, w) != (imgsz, imgsz):
        raise ConfigError(f"imgsz: {weights} takes a fixed {h}x{w} input, got imgsz={imgsz}: pass imgsz={h}, or "
                          f"export with dynamic=true")
    if batch_size != b:
        log.warning(f"WARNING: batch_size={batch_size}: {weights} takes a fixed batch of {b}, using batch_size={b}")
    log.info(f"{weights} has a fixed input shape {loaded.input_shape}: square {imgsz}x{imgsz} images, no "
             f"rectangular batches (export with dynamic=true for those)")
    return b, False


def run(cfg) -> ValResults:
    """Validate ``cfg.weights`` on ``cfg.data`` (a :class:`yolo.config.ValConfig`). The weights are loaded and
    checked before any data is read."""
    check_val_config(cfg)
    device = select_device(cfg.device)
    loaded = load_val_model(cfg, device)
    model = loaded.model
    amp = choose_precision(cfg.amp, device)  # an impossible choice fails before any data is read
    if amp.enabled and loaded.backend != "pytorch":
        raise ConfigError(f"amp: mixed precision applies to PyTorch weights; {cfg.weights} runs as exported")
    stride = loaded.stride
    imgsz = check_img_size(cfg.imgsz, stride)
    batch_size, rect = val_batching(loaded, imgsz, cfg.batch_size, cfg.weights)
    data = ensure_dataset(load_data_config(data_source(cfg.data), cfg.datasets_dir))
    split = data.split(cfg.split)
    if not cfg.single_cls and len(loaded.names) != data.nc:
        raise DatasetError(f"{cfg.weights} predicts {len(loaded.names)} classes but {data.source or data.path} has "
                           f"nc={data.nc}: pass the data config the weights were trained on")
    model.to(device)
    if amp.enabled:
        log.info(amp.describe())
    if cfg.half and device.type == "cuda":
        model.half()
    loader, _ = create_dataloader(split, imgsz, batch_size, stride, augment=False, rect=rect, pad=0.5,
                                  workers=cfg.workers, shuffle=False, single_cls=cfg.single_cls, nc=data.nc,
                                  prefix="val: ")
    save_dir = hydra_output_dir()
    res = validate(model, loader, data.names, conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                   max_det=cfg.max_det, single_cls=cfg.single_cls, half=cfg.half, precision=amp,
                   save_dir=save_dir, plots=cfg.plots, verbose=cfg.verbose, save_json=cfg.save_json)
    for line in res.table:
        log.info(line)
    pre, inf, nms = res.speed_ms
    log.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image at shape "
             f"({batch_size}, 3, {imgsz}, {imgsz})")
    if save_dir is not None:
        log.info(f"Results saved to {save_dir}")
    return res


def main() -> None:
    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="val")
    def _main(cfg) -> float:
        with exit_on_user_error():
            return run(cfg).fitness

    run_hydra_main(_main)


if __name__ == "__main__":
    main()
