"""Inference speed of an exported model against PyTorch: yolov5n at 640, batch 1, on the CPU.

    python benchmarks/bench_export.py [--imgsz 640] [--batch 1] [--n 50] [--rounds 3] [--threads N]
        [--formats onnx torchscript]

Exports ``yolov5n.pt`` (static shape) into a temporary folder with ``python -m yolo.export``'s library function,
then times forward passes of each backend as val runs them (``yolo.runtime.load_inference_model``: the fused
PyTorch model in eval mode, the onnxruntime session, the TorchScript module), alternating the backends over
``--rounds`` rounds so that machine load hits all alike, and prints the median milliseconds per forward pass
(pre-processing and NMS excluded). Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from omegaconf import OmegaConf  # noqa: E402

from yolo.config import ExportConfig  # noqa: E402
from yolo.export import export  # noqa: E402
from yolo.runtime import load_inference_model  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "yolov5n.pt"


def time_model(model, im: torch.Tensor, n: int) -> list[float]:
    """Milliseconds of each of ``n`` forward passes."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            model(im)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n", type=int, default=50, help="timed forward passes per backend and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["onnx", "torchscript"], choices=["onnx", "torchscript"])
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: theirs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # PyTorch as val runs it: fused, eval mode, channels-last (NHWC) weights and input
    models = {"pytorch": load_inference_model(args.weights, "cpu").model.eval().to(memory_format=torch.channels_last)}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), {
                "weights": str(args.weights), "format": fmt, "imgsz": args.imgsz, "batch_size": args.batch,
                "output": str(Path(tmp) / f"model.{fmt}")})
            models[fmt] = load_inference_model(export(cfg).path, "cpu", threads=args.threads).model
        im = torch.rand(args.batch, 3, args.imgsz, args.imgsz, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                x = im.contiguous(memory_format=torch.channels_last) if name == "pytorch" else im
                time_model(model, x, args.warmup)
                times[name] += time_model(model, x, args.n)

    base = statistics.median(times["pytorch"])
    print(f"\nyolov5n forward pass, input ({args.batch}, 3, {args.imgsz}, {args.imgsz}), CPU, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} rounds x {args.n} passes")
    print(f"{'backend':>12} {'median ms':>10} {'min ms':>8} {'p10 ms':>8} {'p90 ms':>8} {'vs pytorch':>11}")
    for name, t in times.items():
        q = statistics.quantiles(t, n=10)
        med = statistics.median(t)
        print(f"{name:>12} {med:10.1f} {min(t):8.1f} {q[0]:8.1f} {q[-1]:8.1f} {med / base:10.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (medians mean little on a busy machine)")


if __name__ == "__main__":
    main()
