"""Mixed precision on a CUDA GPU, in under 8 minutes (not part of CI).

    DATASETS_DIR=../shared/datasets python benchmarks/gpu_amp.py --weights ../shared/weights/yolov5n.pt

1. upstream's AMP check on yolov5s (fp16 autocast against fp32 on a fixed input): the disagreement and the verdict;
2. yolov5s trained from scratch on COCO128 at 640, batch 16, with ``amp=auto`` (fp16 + GradScaler) and with
   ``amp=off``: images/s of the batch loop (median over the epochs after the first) and peak GPU memory;
3. validation of the official yolov5n checkpoint on COCO128 at 640 in fp16 (``half=true``) against fp32:
   P, R, mAP50, mAP50-95 of both and their difference.
Prints one JSON line per step (``RESULT {...}``). Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

import yolo.config  # noqa: E402,F401  (registers the schemas)
from yolo.engine import precision  # noqa: E402
from yolo.models import build_model  # noqa: E402


def report(step: str, **figures) -> None:
    print("RESULT", json.dumps({"step": step, **figures}), flush=True)


def amp_check() -> None:
    model = build_model("yolov5s", nc=80).cuda().to(memory_format=torch.channels_last)
    p = precision.choose("auto", torch.device("cuda", 0))
    score, box = precision.amp_disagreement(model, p, imgsz=640)
    kept = precision.check_amp(model, p, imgsz=640)
    report("amp_check", mode=p.mode, score_diff=score, box_diff=box, passed=kept.enabled)


def train_speed(amp: str, epochs: int, work: Path) -> None:
    from yolo.train import train

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", ["model=yolov5s", "data=coco128", "imgsz=640", "batch_size=16", f"epochs={epochs}",
                                "workers=4", "device=0", "noplots=true", "mlflow.enabled=false", f"amp={amp}",
                                f"project={work}", f"name={amp}"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = train(cfg)
    secs = [h["time/epoch_train_s"] for h in res.history]
    ips = 128 / statistics.median(secs[1:] or secs)
    report("train", amp=amp, img_per_s=round(ips, 1), epoch_s=[round(s, 2) for s in secs],
           peak_gpu_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2), wall_s=round(time.time() - t0, 1),
           map50=round(res.map50, 4))


def val_parity(weights: str) -> None:
    from yolo.val import run

    out = {}
    for half in (False, True):
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("val", [f"weights={weights}", "data=coco128", "imgsz=640", "batch_size=32", "device=0",
                                  f"half={str(half).lower()}", "plots=false"])
        t0 = time.time()
        r = run(cfg)
        out["fp16" if half else "fp32"] = [round(float(x), 5) for x in r.metrics] + [round(time.time() - t0, 1)]
    diff = [round(a - b, 5) for a, b in zip(out["fp16"][:4], out["fp32"][:4])]
    report("val", fp32=out["fp32"], fp16=out["fp16"], fp16_minus_fp32=diff)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "yolov5n.pt"))
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    amp_check()
    with tempfile.TemporaryDirectory() as work:
        for amp in ("auto", "off"):
            train_speed(amp, args.epochs, Path(work))
    val_parity(args.weights)


if __name__ == "__main__":
    main()
