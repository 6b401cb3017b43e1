"""``yolo.train.train`` that records this process's resident memory after each generation (tests only:
``evolve.train_fn=rss_train:train``, with ``YOLO_RSS_LOG`` naming the file that gets one ``VmRSS`` kB per line)."""

from __future__ import annotations

import gc
import os

from yolo.train import train as real_train


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def train(cfg, callbacks=(), save_dir=None):
    try:
        return real_train(cfg, callbacks=callbacks, save_dir=save_dir)
    finally:
        gc.collect()
        with open(os.environ["YOLO_RSS_LOG"], "a") as f:
            f.write(f"{rss_kb()}\n")
