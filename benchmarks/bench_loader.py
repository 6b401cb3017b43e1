"""Training-loader throughput, ours vs upstream YOLOv5 7.0.14, on COCO128 (not part of CI).

    python benchmarks/bench_loader.py            # 3 timed epochs after a warm-up, 2 rounds, + RAM-cache RSS
    python benchmarks/bench_loader.py --quick    # 1 timed epoch, 1 round, no RSS run

Both sides: imgsz 640, batch 16, 2 workers, shuffle, no image cache, mosaic on with hyp.scratch-low's
augmentation values. Each measurement runs in its own process, alternating ours / upstream so that machine
load hits both alike; images/s = images delivered / wall time of the timed epochs (the consumer does nothing).
On a busy machine wall-clock rates swing with other load; the CPU time of the main process and its workers per
image (from /proc) is reported next to them and is the steadier comparison.
The memory runs build our loader with ``cache='ram'`` (and, for reference, without a cache) and report the
peak resident memory of the main process and of main + workers (RSS, and PSS: shared pages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream import ROOT, SHARED, linked_coco128, run_upstream  # noqa: E402

IMAGES = SHARED / "datasets" / "coco128" / "images" / "train2017"
HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0,
           flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.0)
SETTINGS = dict(imgsz=640, batch=16, workers=2)

# the timing loop, shared by both sides (``create_dataloader`` differs only in its keyword names)
TIMING = """
import os, time, json
from pathlib import Path

def cpu_seconds(pid=os.getpid()):
    # user + system CPU time of a process and all its descendants (the loader's workers)
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
        kids = [int(c) for t in Path(f'/proc/{pid}/task').iterdir() for c in (t / 'children').read_text().split()]
    except OSError:
        return 0.0
    return own + sum(cpu_seconds(k) for k in kids)

def run(loader, epochs):
    for _ in loader:  # warm-up epoch: worker start, page cache
        pass
    n, t, c = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for imgs, *_ in loader:
            n += imgs.shape[0]
    dt, dc = time.perf_counter() - t, cpu_seconds() - c
    print('RESULT', json.dumps({'images': n, 'seconds': dt, 'img_per_s': n / dt, 'cpu_ms_per_img': 1e3 * dc / n}),
          flush=True)
"""

UPSTREAM = """
from yolov5.utils.dataloaders import create_dataloader
loader, _ = create_dataloader({path!r}, {imgsz}, {batch}, 32, hyp={hyp!r}, augment=True, workers={workers},
                              shuffle=True, cache={cache!r}, prefix='')
run(loader, {epochs})
"""

OURS = """
import sys; sys.path.insert(0, {root!r})
from yolo.data.loader import create_dataloader
loader, _ = create_dataloader({path!r}, {imgsz}, {batch}, 32, hyp={hyp!r}, augment=True, workers={workers},
                              shuffle=True, cache={cache!r}, seed=0)
run(loader, {epochs})
"""


def _result(out: subprocess.CompletedProcess, who: str) -> dict:
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{who} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def run_ours(epochs: int, workdir: Path, cache=None, watch_memory: bool = False) -> dict:
    code = TIMING + OURS.format(root=str(ROOT), path=str(IMAGES), hyp=HYP, epochs=epochs, cache=cache, **SETTINGS)
    env = dict(os.environ, YOLO_CACHE_DIR=str(workdir / "cache"))  # shared/ is read-only: label cache here
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = MemoryWatcher(proc.pid).start() if watch_memory else None
    stdout, stderr = proc.communicate()
    result = _result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "ours")
    if peak:
        result.update(peak.stop())
    return result


def run_theirs(epochs: int, workdir: Path, cache=None) -> dict:
    code = TIMING + UPSTREAM.format(path=str(linked_coco128(workdir)), hyp=HYP, epochs=epochs, cache=cache,
                                    **SETTINGS)
    return _result(run_upstream(code, workdir), "upstream")


class MemoryWatcher:
    """Samples RSS / PSS of a process and its children every 50 ms (Linux /proc)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, {"main_rss_mb": 0.0, "total_rss_mb": 0.0, "total_pss_mb": 0.0}, False
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> MemoryWatcher:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop = True
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}

    def _loop(self) -> None:
        while not self._stop:
            pids = [self.pid, *_children(self.pid)]
            rss = [_status_kb(p, "VmRSS") for p in pids]
            pss = [_pss_kb(p) for p in pids]
            self.peak["main_rss_mb"] = max(self.peak["main_rss_mb"], rss[0] / 1024)
            self.peak["total_rss_mb"] = max(self.peak["total_rss_mb"], sum(rss) / 1024)
            self.peak["total_pss_mb"] = max(self.peak["total_pss_mb"], sum(pss) / 1024)
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _status_kb(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _pss_kb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 timed epoch, 1 round, no RAM-cache run")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours/upstream rounds")
    ap.add_argument("--no-upstream", action="store_true", help="measure ours only")
    ap.add_argument("--cache", choices=["none", "ram"], default="none",
                    help="image cache mode, the same on both sides (default: none)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path) -> None:
    epochs, rounds = (1, 1) if args.quick else (args.epochs, args.rounds)
    print(f"COCO128 train loader, imgsz {SETTINGS['imgsz']}, batch {SETTINGS['batch']}, {SETTINGS['workers']} "
          f"workers, mosaic + scratch-low augmentation, cache={args.cache}; {epochs} timed epoch(s) x {rounds} "
          f"round(s); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    sides = [("ours", run_ours)] + ([] if args.no_upstream else [("upstream", run_theirs)])
    results = {who: [] for who, _ in sides}
    for r in range(rounds):
        print(f"  round {r + 1}:", end="", flush=True)
        for who, fn in sides:
            res = fn(epochs, workdir, cache=None if args.cache == "none" else args.cache)
            results[who].append(res)
            print(f"  {who} {res['img_per_s']:6.1f} img/s ({res['cpu_ms_per_img']:5.1f} CPU-ms/img)", end="",
                  flush=True)
        print(flush=True)
    summary = {who: (statistics.median(x["img_per_s"] for x in rs), statistics.median(x["cpu_ms_per_img"] for x in rs))
               for who, rs in results.items()}
    print("median: " + ", ".join(f"{who} {v[0]:.1f} img/s, {v[1]:.1f} CPU-ms/img" for who, v in summary.items()))
    if len(summary) == 2:
        (o_ips, o_cpu), (t_ips, t_cpu) = summary["ours"], summary["upstream"]
        print(f"ours / upstream: {o_ips / t_ips:.2f}x images/s (wall clock), {t_cpu / o_cpu:.2f}x less CPU per image")
    if not args.quick and args.cache == "none":
        for cache in ("ram", None):
            mem = run_ours(1, workdir, cache=cache, watch_memory=True)
            print(f"ours cache={cache!r}: {mem['img_per_s']:.1f} img/s; peak RSS main {mem['main_rss_mb']:.0f} MB, "
                  f"main + workers RSS {mem['total_rss_mb']:.0f} MB, PSS {mem['total_pss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
