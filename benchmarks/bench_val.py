"""Validation parity and speed, ours vs upstream YOLOv5 7.0.14, on COCO128 with the official yolov5n.pt.

    python benchmarks/bench_val.py --imgsz 640 320 --repeats 2

Runs each side as its own process (alternating, so machine load hits both alike) and prints P, R, mAP50,
mAP50-95 and the per-image pre-process / inference / NMS times.  Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream import ROOT, SHARED, coco128_yaml, run_upstream  # noqa: E402

WEIGHTS = SHARED / "weights" / "yolov5n.pt"


def ours(imgsz: int, batch: int, workdir: Path) -> dict:
    env = dict(os.environ, DATASETS_DIR=str(SHARED / "datasets"))
    cmd = [sys.executable, "-m", "yolo.val", f"weights={WEIGHTS}", "data=coco128", f"imgsz={imgsz}",
           f"batch_size={batch}", "device=cpu", "plots=false", f"hydra.run.dir={workdir}/ours_{imgsz}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ours failed:\n{out.stdout}\n{out.stderr}")
    text = out.stdout + out.stderr
    row = re.search(r"^\s*all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    speed = re.search(r"Speed: ([\d.]+)ms pre-process, ([\d.]+)ms inference, ([\d.]+)ms NMS", text)
    return {"P": float(row[3]), "R": float(row[4]), "mAP50": float(row[5]), "mAP50-95": float(row[6]),
            "speed": tuple(float(x) for x in speed.groups())}


def upstream(imgsz: int, batch: int, workdir: Path) -> dict:
    yaml = coco128_yaml(workdir)
    code = (f"from yolov5 import val\nimport json\n"
            f"r, maps, *_, t = val.run(data='{yaml}', weights='{WEIGHTS}', imgsz={imgsz}, batch_size={batch}, "
            f"conf_thres=0.001, iou_thres=0.6, device='cpu', workers=2, project='{workdir}', name='up', plots=False)\n"
            f"print('RESULT', json.dumps({{'r': list(map(float, r)), 't': list(map(float, t))}}))")
    out = run_upstream(code, workdir)
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m:
        raise SystemExit(f"upstream failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    d = json.loads(m[1])
    p, r, m50, m95 = d["r"][:4]
    return {"P": p, "R": r, "mAP50": m50, "mAP50-95": m95, "speed": tuple(d["t"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 320])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_val_"))
    for imgsz in args.imgsz:
        runs = {"ours": [], "upstream": []}
        for _ in range(args.repeats):
            runs["upstream"].append(upstream(imgsz, args.batch, work))
            runs["ours"].append(ours(imgsz, args.batch, work))
        print(f"\nimgsz {imgsz}, batch {args.batch}, CPU threads {os.cpu_count()}, {args.repeats} runs each (median ms)")
        print(f"{'':10}{'P':>9}{'R':>9}{'mAP50':>9}{'mAP50-95':>10}{'pre':>8}{'infer':>8}{'NMS':>8}{'total':>8}")
        for side, rs in runs.items():
            sp = [statistics.median(r["speed"][i] for r in rs) for i in range(3)]
            r0 = rs[0]
            print(f"{side:10}{r0['P']:9.5f}{r0['R']:9.5f}{r0['mAP50']:9.5f}{r0['mAP50-95']:10.5f}"
                  f"{sp[0]:8.1f}{sp[1]:8.1f}{sp[2]:8.1f}{sum(sp):8.1f}")


if __name__ == "__main__":
    main()
