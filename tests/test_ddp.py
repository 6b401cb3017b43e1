"""DDP training: two gloo processes on the CPU launched through torchrun, and the pieces it is built from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, train_overrides

from yolo.engine.distributed import DDPConfigError, DistInfo, check_config


def torchrun(args: list[str], env: dict[str, str], nproc: int = 2, timeout: float = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "run_train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_traces(folder: Path, world_size: int) -> list[dict]:
    traces = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [t["rank"] for t in traces] == list(range(world_size))
    return traces


def test_two_cpu_processes_train_one_model(tiny_shapes, tmp_path):
    """One epoch, 2 processes: disjoint halves of the data, identical weights, one run folder, one MLflow run."""
    from mlflow.tracking import MlflowClient

    from yolo.checkpoint import load_checkpoint

    trace = tmp_path / "trace"
    env = dict(os.environ, YOLO_DDP_TRACE=str(trace), OMP_NUM_THREADS="1")
    args = train_overrides(tiny_shapes, tmp_path, "epochs=1", "imgsz=64", "batch_size=8", "noplots=true")
    out = torchrun(args, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    # (a) each process trained on its own half of the epoch; together they cover it
    ranks = read_traces(trace, 2)
    seen = [r["epochs"]["0"] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 24  # 48 images, 2 processes
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(48))

    # (b) the processes hold the same weights after the first optimizer step and at the end of the epoch
    assert ranks[0]["weights"]["start"] == ranks[1]["weights"]["start"]  # rank 0's weights and buffers copied
    for tag in ("first_step", "epoch0"):
        assert ranks[0]["weights"][tag]["parameters"] == ranks[1]["weights"][tag]["parameters"], tag

    # (c) rank 0 alone saved: one run folder with one last.pt/best.pt pair, one results row, one MLflow run
    runs = [p for p in (tmp_path / "runs" / "train").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.pt", "last.pt"]
    assert len(list(tmp_path.rglob("last.pt"))) == 1
    assert len((run / "results.csv").read_text().strip().splitlines()) == 1 + 1
    assert load_checkpoint(run / "weights" / "last.pt").config["batch_size"] == 8
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_runs = client.search_runs([client.get_experiment_by_name("yolo").experiment_id])
    assert len(mlflow_runs) == 1
    assert mlflow_runs[0].info.status == "FINISHED"
    assert mlflow_runs[0].data.tags["save_dir"] == str(run)
    assert [m.step for m in client.get_metric_history(mlflow_runs[0].info.run_id, "train/box_loss")] == [0]


def test_resume_under_ddp(tiny_shapes, tmp_path):
    """A run stopped after epoch 0 is resumed by 2 processes: same folder, same MLflow run, epoch 1 only."""
    from mlflow.tracking import MlflowClient

    from yolo.checkpoint import load_checkpoint
    from yolo.engine.callbacks import StopTraining
    from yolo.train import train

    def stop_after_first_epoch(epoch, metrics):
        raise StopTraining("interrupted for the test")

    args = train_overrides(tiny_shapes, tmp_path, "epochs=2", "imgsz=64", "batch_size=8", "noplots=true",
                           "noval=true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes run: on a busy machine, far faster than competing threads
    try:
        first = train(compose("train", args), callbacks=[stop_after_first_epoch], save_dir=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    last = Path(first.last)
    assert load_checkpoint(last).epoch == 0 and first.mlflow_run_id

    trace = tmp_path / "trace"
    env = dict(os.environ, YOLO_DDP_TRACE=str(trace), OMP_NUM_THREADS="1")
    keep = ("data", "data.file", "mlflow.tracking_uri", "workers", "device")  # places come from the command
    places = [a for a in args if a.split("=")[0] in keep]
    out = torchrun([f"resume={last}", *places, f"hydra.run.dir={tmp_path / 'launch'}"], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "Resuming training from" in out.stdout + out.stderr

    ranks = read_traces(trace, 2)
    assert [list(r["epochs"]) for r in ranks] == [["1"], ["1"]]
    assert ranks[0]["weights"]["epoch1"]["parameters"] == ranks[1]["weights"]["epoch1"]["parameters"]
    rows = (tmp_path / "run" / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [0, 1]
    assert load_checkpoint(last).optimizer is None  # finished and stripped by rank 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("yolo").experiment_id])
    assert [r.info.run_id for r in runs] == [first.mlflow_run_id] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "train/box_loss")) == [0, 1]


# ------------------------------------------------------------------------------------------------ the pieces
def test_refused_options_name_the_way_out():
    two = DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=2)
    with pytest.raises(DDPConfigError, match="image_weights"):
        check_config(compose("train", ["image_weights=true", "batch_size=8"]), two)
    with pytest.raises(DDPConfigError, match=r"batch_size=7 must be a multiple .* batch_size=8"):
        check_config(compose("train", ["batch_size=7"]), two)
    check_config(compose("train", ["batch_size=8", "sync_bn=true"]), two)
    check_config(compose("train", ["image_weights=true", "batch_size=7"]), DistInfo())  # one process: all fine


def test_dist_info_from_torchrun_environment(monkeypatch):
    for k, v in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.enabled and not info.is_main
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    assert not DistInfo.from_env().enabled and DistInfo.from_env().is_main


class _Images:
    """Just enough of a dataset for the sampler."""

    def __init__(self, n: int):
        self.n, self.epoch, self.image_weights = n, 0, None

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n, world_size", [(10, 2), (11, 2), (10, 3), (5, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_splits_each_epoch_disjointly(n, world_size, shuffle):
    from yolo.data.loader import EpochSampler

    whole = EpochSampler(_Images(n), shuffle=shuffle, seed=3).draws(epoch=2)
    shares = [EpochSampler(_Images(n), shuffle=shuffle, seed=3, rank=r, world_size=world_size).draws(epoch=2)
              for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of steps
    assert len(shares[0]) == len(EpochSampler(_Images(n), rank=0, world_size=world_size))
    slots = sorted(d.slot for s in shares for d in s)
    assert slots == list(range(len(slots)))  # disjoint positions of the (padded) epoch order
    assert {d.index for s in shares for d in s} == set(range(n))
    real = sorted((d for s in shares for d in s if d.slot < n), key=lambda d: d.slot)
    assert real == whole  # same images with the same randomness keys as a single process draws
    padded = [d for s in shares for d in s if d.slot >= n]
    assert len(padded) == -n % world_size and all(d.index == whole[-1].index for d in padded)


def test_rect_batches_of_each_process_share_one_shape():
    """Per-process batches of a sequential order stay inside one rectangle of the global batch."""
    import numpy as np

    from yolo.data.loader import EpochSampler

    n, world_size, global_batch = 21, 2, 4
    per_process = global_batch // world_size
    group = np.arange(n) // global_batch  # the dataset's rectangle of each image (rect: global batches)
    for rank in range(world_size):
        draws = EpochSampler(_Images(n), rank=rank, world_size=world_size).draws(epoch=0)
        for b in range(0, len(draws), per_process):
            assert len({group[d.index] for d in draws[b:b + per_process]}) == 1


def test_device_per_process():
    from yolo.device import select_device

    assert str(select_device("cpu", local_rank=1)) == "cpu"
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        select_device("0,1")


def test_refused_ddp_option_is_one_error_line(capsys):
    from yolo.cli import exit_on_user_error

    with pytest.raises(SystemExit) as exc, exit_on_user_error():
        raise DDPConfigError("image_weights is not supported under DDP")
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == "ERROR: image_weights is not supported under DDP"
