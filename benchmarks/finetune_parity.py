"""Fine-tune parity with upstream YOLOv5 7.0.14 (not part of CI).

    python benchmarks/finetune_parity.py                    # ours, amp=auto, seeds 0 1 2
    python benchmarks/finetune_parity.py --amp off --upstream

The official ``yolov5n.pt`` fine-tuned on COCO128 at imgsz 320, batch 16, 3 epochs, hyp scratch-low, 2 workers,
once per seed; reported: P, R, mAP50 and mAP50-95 of the validation after the last epoch, and the mean over the
seeds.  ``--upstream`` runs upstream's ``train.run`` with the same settings (its own venv, see ``upstream.py``);
without it the upstream means measured for this project (seeds 0, 1, 2) are the reference.
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
UPSTREAM_MEAN = {"map50": 0.43065, "map": 0.24959}  # upstream 7.0.14, seeds 0, 1, 2, after epoch 3
TOLERANCE = 0.012


def ours(seed: int, amp: str, work: Path) -> dict:
    code = f"""
import json, sys
sys.argv = ['run_train.py']
import yolo.config
from hydra import compose, initialize_config_dir
from yolo.train import train
with initialize_config_dir(version_base='1.3', config_dir='{ROOT / 'conf'}'):
    cfg = compose('train', ['model=yolov5n', 'weights={WEIGHTS}', 'data=coco128', 'imgsz=320', 'batch_size=16',
                            'epochs=3', 'workers=2', 'device=cpu', 'noplots=true', 'mlflow.enabled=false',
                            'seed={seed}', 'amp={amp}', 'project={work / 'ours'}'])
h = train(cfg).history[-1]
print('RESULT', json.dumps({{k: h['metrics/' + n] for k, n in (('p', 'precision'), ('r', 'recall'),
                                                           ('map50', 'mAP_0.5'), ('map', 'mAP_0.5:0.95'))}}))
"""
    env = dict(os.environ, DATASETS_DIR=str(SHARED / "datasets"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m:
        raise SystemExit(f"ours failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(m[1])


def upstream(seed: int, work: Path) -> dict:
    code = f"""
import json
from yolov5 import train
opt = train.run(data='{coco128_yaml(work)}', weights='{WEIGHTS}', imgsz=320, batch_size=16, epochs=3, workers=2,
                device='cpu', noplots=True, seed={seed}, project='{work / 'up'}', name='s{seed}', exist_ok=True)
import csv
rows = list(csv.reader(open('{work / 'up'}/s{seed}/results.csv')))
last = [float(x) for x in rows[-1]]
print('RESULT', json.dumps({{'p': last[4], 'r': last[5], 'map50': last[6], 'map': last[7]}}))
"""
    out = run_upstream(code, work)
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m:
        raise SystemExit(f"upstream failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(m[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--amp", default="auto", help="our precision setting")
    ap.add_argument("--upstream", action="store_true", help="also run upstream (else its measured means)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finetune_parity_"))
    sides = [(f"ours amp={args.amp}", lambda s: ours(s, args.amp, work))]
    if args.upstream:
        sides.append(("upstream", lambda s: upstream(s, work)))
    means = {}
    for side, fn in sides:
        rows = []
        for seed in args.seeds:
            r = fn(seed)
            rows.append(r)
            print(f"{side:16} seed {seed}: P {r['p']:.4f}  R {r['r']:.4f}  mAP50 {r['map50']:.4f}  "
                  f"mAP50-95 {r['map']:.4f}", flush=True)
        means[side] = {k: statistics.mean(r[k] for r in rows) for k in ("p", "r", "map50", "map")}
    ref = means.get("upstream", UPSTREAM_MEAN)
    for side, m in means.items():
        d50, d = m["map50"] - ref["map50"], m["map"] - ref["map"]
        ok = abs(d50) <= TOLERANCE and abs(d) <= TOLERANCE
        print(f"{side:16} mean: mAP50 {m['map50']:.5f} ({d50:+.5f})  mAP50-95 {m['map']:.5f} ({d:+.5f})  "
              f"{'within' if ok else 'OUTSIDE'} ±{TOLERANCE} of upstream's {ref['map50']:.5f}/{ref['map']:.5f}")


if __name__ == "__main__":
    main()
