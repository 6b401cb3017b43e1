"""Training speed, ours vs upstream YOLOv5 7.0.14, on CPU (not part of CI).

    python benchmarks/bench_train.py --models yolov5n yolov5s --epochs 3 --rounds 2 --amp auto off

Both sides train from scratch on COCO128 at imgsz 320, batch 16, 2 workers, hyp scratch-low, no plots, each in its
own process, alternating.  Images/s = 128 images / the training time of an epoch (the batch loop only, validation
excluded), median over the epochs after the first.  Peak memory is the largest resident set of any process of the
run (main or loader worker), from getrusage.  Ours runs once per ``--amp`` value (``auto``: bf16 autocast on a CPU
with fast bf16, fp32 elsewhere; ``off``: fp32) and ``--cache`` value (default: the config's ``cache=auto``, which
keeps COCO128's resized images in RAM, 30 MB at 320; ``none``: decoded by the loader workers every epoch, as
upstream's default does); upstream trains in fp32 on a CPU (its AMP is CUDA only) with no cache.  With
``--rounds N`` the whole sequence repeats N times and the summary gives the median of the rounds.  ``--baseline
PATH`` adds another checkout of this project (an earlier commit, e.g. from ``git worktree add``) to the alternation,
in fp32 when it predates the ``amp`` setting, for before/after figures of a change.
"""

from __future__ import annotations

import argparse
import functools
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

N_IMAGES = 128


def ours(model: str, epochs: int, work: Path, amp: str = "auto", root: Path = ROOT, cache: str | None = None) -> dict:
    has_amp = "amp" in (root / "yolo" / "config.py").read_text()
    amp_override = f"'amp={amp}', " if has_amp else ""
    amp_override += f"'cache={cache}', " if cache else ""
    code = f"""
import json, sys
sys.argv = ['run_train.py']
# this checkout, not the one installed in the venv (an editable install's finder would take precedence)
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path.insert(0, '{root}')
import yolo.config
from hydra import compose, initialize_config_dir
try:
    from yolo.train import train
except ImportError:  # a baseline from before the trainer had its own module
    from yolo.engine.trainer import train
with initialize_config_dir(version_base='1.3', config_dir='{root / 'conf'}'):
    cfg = compose('train', ['model={model}', 'data=coco128', 'imgsz=320', 'batch_size=16', 'epochs={epochs}',
                            'workers=2', 'device=cpu', 'noplots=true', 'mlflow.enabled=false', {amp_override}
                            'project={work / 'ours'}'])
r = train(cfg)
import resource
rss = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
print('RESULT', json.dumps({{'epoch_s': [h['time/epoch_train_s'] for h in r.history], 'rss_mb': rss}}))
"""
    env = dict(os.environ, DATASETS_DIR=str(SHARED / "datasets"))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m:
        raise SystemExit(f"ours failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(m[1])


def upstream(model: str, epochs: int, work: Path) -> dict:
    yaml = coco128_yaml(work)
    code = f"""
import json, time
from yolov5.utils import callbacks as cb
stamps = []
_run = cb.Callbacks.run
def run(self, hook, *a, **k):
    if hook in ('on_train_epoch_start', 'on_train_epoch_end'):
        stamps.append((hook, time.perf_counter()))
    return _run(self, hook, *a, **k)
cb.Callbacks.run = run
from yolov5 import train
train.run(data='{yaml}', cfg='{model}.yaml', weights='', imgsz=320, batch_size=16, epochs={epochs}, workers=2,
          device='cpu', noplots=True, project='{work / 'up'}', name='{model}', exist_ok=True)
starts = [t for h, t in stamps if h == 'on_train_epoch_start']
ends = [t for h, t in stamps if h == 'on_train_epoch_end']
import resource
rss = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
print('RESULT', json.dumps({{'epoch_s': [e - s for s, e in zip(starts, ends)], 'rss_mb': rss}}))
"""
    out = run_upstream(code, work)
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m:
        raise SystemExit(f"upstream failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(m[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov5s"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--amp", nargs="+", default=["auto", "off"], help="our precision settings to run")
    ap.add_argument("--cache", nargs="+", default=[None], help="our image cache settings (default: the config's)")
    ap.add_argument("--baseline", type=Path, help="another checkout of ours to run too (before/after a change)")
    ap.add_argument("--no-upstream", action="store_true", help="leave upstream out (ratios are then to the first side)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    sides = [] if args.no_upstream else [("upstream", upstream)]
    if args.baseline:
        sides.append(("baseline", functools.partial(ours, amp="off", root=args.baseline.resolve())))
    sides += [(f"ours amp={a}" + (f" cache={c}" if c else ""), functools.partial(ours, amp=a, cache=c))
              for a in args.amp for c in args.cache]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print(f"{'model':10}{'side':26}{'img/s':>8}{'peak RSS MB':>13}  epoch seconds")
    for _ in range(args.rounds):
        for model in args.models:
            for side, fn in sides:
                r = fn(model, args.epochs, work)
                times = r["epoch_s"][1:] or r["epoch_s"]
                ips = N_IMAGES / statistics.median(times)
                runs.setdefault((model, side), []).append((ips, r["rss_mb"]))
                print(f"{model:10}{side:26}{ips:8.1f}{r['rss_mb']:13.0f}  {[round(t, 1) for t in r['epoch_s']]}",
                      flush=True)
    print(f"\nmedians of {args.rounds} round(s); ratio = side / {sides[0][0]}")
    for model in args.models:
        up = statistics.median(ips for ips, _ in runs[(model, sides[0][0])])
        for side, _ in sides:
            ips = statistics.median(v for v, _ in runs[(model, side)])
            rss = max(m for _, m in runs[(model, side)])
            print(f"{model:10}{side:26}{ips:8.1f} img/s  ratio {ips / up:5.2f}  peak RSS {rss:6.0f} MB")


if __name__ == "__main__":
    main()
