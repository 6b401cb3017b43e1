"""Predict's label files scored like val: are ``python -m yolo.predict``'s boxes val's boxes?

    python benchmarks/predict_consistency.py [--imgsz 640] [--no-val] [--no-multi-label]

1. ``python -m yolo.predict`` on COCO128 (``conf_thres=0.001 iou_thres=0.6 max_det=300 save_txt=true
   save_conf=true save_img=false``); its ``labels/<stem>.txt`` files are read back (normalised ``cx cy w h`` →
   original pixels through the sizes in ``predictions.json``) and scored against COCO128's labels with val's
   metric code (``yolo.metrics.match_predictions`` at IoU 0.50:0.05:0.95, ``ap_per_class``);
2. ``python -m yolo.val ... batch_size=32`` on the same weights and data (``--no-val``: the figures measured
   when this script was written are printed instead);
3. the same predictions through the API with val's multi-label NMS (``Predictor(multi_label=True)``), scored the
   same way: what is left between this row and val's is the pre-processing (each image letterboxed on its own
   to the smallest multiple of the stride, vs val's rectangular batches: the shape of a batch of 32 images
   sorted by aspect ratio, plus half a stride of padding);
4. the API with val's pre-processing too (each image resized and letterboxed to the shape val gives its batch):
   this row reproduces val's figures exactly, so the metric code, the model path, NMS and the mapping of boxes
   back to original pixels agree, and the differences above are pre-processing and NMS mode only.

Not part of CI; a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from yolo.data.augment import letterbox  # noqa: E402
from yolo.data.dataset import rect_batch_shapes  # noqa: E402
from yolo.data.labels import list_image_files, read_label_file, scan_dataset  # noqa: E402
from yolo.metrics import ap_per_class, match_predictions  # noqa: E402
from yolo.predictor import Predictor  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "datasets" / "coco128"
IMAGES = COCO128 / "images" / "train2017"
VAL_640 = (0.5715, 0.5082, 0.5597, 0.3608)  # python -m yolo.val (and upstream's val.py) at 640, batch 32
IOUV = torch.linspace(0.5, 0.95, 10)
NAMES = ("P", "R", "mAP50", "mAP50-95")


def ground_truth(stem: str, w: int, h: int) -> np.ndarray:
    """COCO128's labels of one image as (m, 5) ``cls, x1, y1, x2, y2`` in pixels, read as val reads them
    (duplicate rows dropped, coordinates clipped to [0, 1]); an image without a label file has none (two of
    COCO128's 128 label files belong to no image: 929 instances, as val counts)."""
    rows = read_label_file(str(COCO128 / "labels" / "train2017" / f"{stem}.txt"), nc=80)[0].astype(np.float64)
    return np.concatenate((rows[:, :1], xywhn_to_xyxy(rows[:, 1:5], w, h)), 1)


def xywhn_to_xyxy(b: np.ndarray, w: int, h: int) -> np.ndarray:
    cx, cy, bw, bh = b[:, 0] * w, b[:, 1] * h, b[:, 2] * w, b[:, 3] * h
    return np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1)


def read_label_predictions(run_dir: Path) -> dict[str, tuple[np.ndarray, int, int]]:
    """path → ((n, 6) ``x1, y1, x2, y2, conf, cls`` in pixels from ``labels/<stem>.txt``, width, height)."""
    out = {}
    for rec in json.loads((run_dir / "predictions.json").read_text()):
        w, h, stem = rec["width"], rec["height"], Path(rec["path"]).stem
        f = run_dir / "labels" / f"{stem}.txt"
        rows = np.loadtxt(f, ndmin=2) if f.is_file() else np.zeros((0, 6))
        det = np.concatenate((xywhn_to_xyxy(rows[:, 1:5], w, h), rows[:, 5:6], rows[:, :1]), 1)
        out[rec["path"]] = (det[np.argsort(-det[:, 4], kind="stable")], w, h)
    return out


def score(predictions: dict[str, tuple[np.ndarray, int, int]]) -> tuple[float, float, float, float]:
    """P, R, mAP50, mAP50-95 of per-image detections against COCO128's labels, as val scores them."""
    stats = []
    for path, (det, w, h) in predictions.items():
        labels = ground_truth(Path(path).stem, w, h)
        if len(det) == 0:
            if len(labels):
                stats.append((np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), labels[:, 0]))
            continue
        correct = (match_predictions(torch.tensor(det, dtype=torch.float32),
                                     torch.tensor(labels, dtype=torch.float32), IOUV)
                   if len(labels) else np.zeros((len(det), 10), bool))
        stats.append((correct, det[:, 4], det[:, 5], labels[:, 0]))
    tp, conf, pred_cls, target_cls = (np.concatenate(x, 0) for x in zip(*stats))
    ap = ap_per_class(tp, conf, pred_cls, target_cls)
    return float(ap.p.mean()), float(ap.r.mean()), float(ap.ap[:, 0].mean()), float(ap.ap.mean(1).mean())


def run(cmd: list[str]) -> str:
    env = dict(os.environ, DATASETS_DIR=str(SHARED / "datasets"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def predict_figures(imgsz: int, workdir: Path) -> tuple[tuple[float, ...], str]:
    run_dir = workdir / "predict"
    text = run(["-m", "yolo.predict", f"weights={WEIGHTS}", f"source={IMAGES}", f"imgsz={imgsz}", "device=cpu",
                "conf_thres=0.001", "iou_thres=0.6", "max_det=300", "save_txt=true", "save_conf=true",
                "save_img=false", f"hydra.run.dir={run_dir}"])
    speed = re.search(r"Speed: .*", text)
    return score(read_label_predictions(run_dir)), speed[0] if speed else ""


def val_figures(imgsz: int, workdir: Path) -> tuple[float, ...]:
    text = run(["-m", "yolo.val", f"weights={WEIGHTS}", "data=coco128", f"imgsz={imgsz}", "batch_size=32",
                "device=cpu", "plots=false", f"hydra.run.dir={workdir / 'val'}"])
    row = re.search(r"^\s*all\s+\d+\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    return tuple(float(x) for x in row.groups())


def multi_label_figures(imgsz: int) -> tuple[float, ...]:
    """The same per-image letterbox with val's multi-label NMS, through the API (boxes kept unrounded)."""
    predictor = Predictor(WEIGHTS, imgsz=imgsz, conf_thres=0.001, iou_thres=0.6, max_det=300, device="cpu",
                          multi_label=True)
    paths = sorted(str(p) for p in IMAGES.iterdir() if p.suffix.lower() == ".jpg")
    preds = {}
    for det in predictor(paths):
        d = np.concatenate((det.boxes, det.scores[:, None], det.classes[:, None].astype(np.float32)), 1)
        preds[det.path] = (d, det.shape[1], det.shape[0])
    return score(preds)


class ValPreprocessing(Predictor):
    """A predictor whose next image is pre-processed as val's loader does for a batch of shape ``target``."""

    target: tuple[int, int] = (640, 640)

    def preprocess(self, image):
        h0, w0 = image.shape[:2]
        r = self.imgsz / max(h0, w0)
        if r != 1:  # val's load_image: long side to imgsz, area interpolation when shrinking
            image = cv2.resize(image, (math.ceil(w0 * r), math.ceil(h0 * r)),
                               interpolation=cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA)
        h, w = image.shape[:2]
        im, ratio, pad = letterbox(image, self.target, auto=False, scaleup=False)
        return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1]), ((h / h0 * ratio[0], w / w0 * ratio[1]), pad)


def val_preprocessing_figures(imgsz: int, batch: int = 32) -> tuple[float, ...]:
    """The API with val's multi-label NMS and val's pre-processing (its rectangular batch shapes, pad 0.5)."""
    scan = scan_dataset(list_image_files(str(IMAGES)), 80, None, workers=1)
    order, shapes = rect_batch_shapes(scan.shapes, batch, imgsz, 32, 0.5)
    shape_of = {scan.im_files[i]: tuple(int(x) for x in shapes[k // batch]) for k, i in enumerate(order)}
    predictor = ValPreprocessing(WEIGHTS, imgsz=imgsz, conf_thres=0.001, iou_thres=0.6, max_det=300,
                                 device="cpu", multi_label=True)
    preds = {}
    for f in scan.im_files:
        predictor.target = shape_of[f]
        det = predictor(f)[0]
        d = np.concatenate((det.boxes, det.scores[:, None], det.classes[:, None].astype(np.float32)), 1)
        preds[det.path] = (d, det.shape[1], det.shape[0])
    return score(preds)


def upstream_detect_figures(imgsz: int, workdir: Path) -> tuple[float, ...]:
    """Upstream's own ``detect.py`` (PyPI yolov5 7.0.14, its venv: ``benchmarks/upstream.py``) with the same
    settings, its ``labels/*.txt`` scored the same way: the gap between detect.py and val.py is upstream's too."""
    from upstream import run_upstream

    out = workdir / "upstream"
    code = (f"from yolov5 import detect\n"
            f"detect.run(weights={str(WEIGHTS)!r}, source={str(IMAGES)!r}, imgsz=({imgsz}, {imgsz}), "
            f"conf_thres=0.001, iou_thres=0.6, max_det=300, device='cpu', save_txt=True, save_conf=True, "
            f"nosave=True, project={str(out)!r}, name='exp', exist_ok=True)\n")
    p = run_upstream(code, workdir)
    if p.returncode:
        raise SystemExit(f"upstream detect.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    preds = {}
    for img in sorted(Path(IMAGES).glob("*.jpg")):
        h, w = cv2.imread(str(img)).shape[:2]
        f = out / "exp" / "labels" / f"{img.stem}.txt"
        rows = np.loadtxt(f, ndmin=2) if f.is_file() else np.zeros((0, 6))
        det = np.concatenate((xywhn_to_xyxy(rows[:, 1:5], w, h), rows[:, 5:6], rows[:, :1]), 1)
        preds[str(img)] = (det[np.argsort(-det[:, 4], kind="stable")], w, h)
    return score(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--no-val", action="store_true", help="print val's recorded figures instead of running it")
    ap.add_argument("--no-multi-label", action="store_true", help="skip the multi-label API rows")
    ap.add_argument("--upstream", action="store_true", help="also upstream's detect.py, scored the same way")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, speed = predict_figures(args.imgsz, Path(tmp))
        rows.append(("predict (labels/*.txt)", ours))
        if not args.no_multi_label:
            rows.append(("predict API, multi-label NMS", multi_label_figures(args.imgsz)))
            rows.append(("API, multi-label, val's letterbox", val_preprocessing_figures(args.imgsz)))
        if args.upstream:
            rows.append(("upstream detect.py (labels/*.txt)", upstream_detect_figures(args.imgsz, Path(tmp))))
        if args.no_val:
            val = VAL_640
        else:
            val = val_figures(args.imgsz, Path(tmp))
        rows.append(("val" + (" (recorded)" if args.no_val else ""), val))
    print(f"COCO128, yolov5n.pt, imgsz {args.imgsz}, conf 0.001, IoU 0.6, max_det 300")
    print(f"{'':40s}" + "".join(f"{n:>10s}" for n in NAMES))
    for name, figures in rows:
        print(f"{name:40s}" + "".join(f"{x:10.4f}" for x in figures))
    for name, figures in rows[:-1]:
        print(f"{name + ' - val':40s}" + "".join(f"{a - b:+10.4f}" for a, b in zip(figures, val)))
    print(f"predict {speed}")


if __name__ == "__main__":
    main()
