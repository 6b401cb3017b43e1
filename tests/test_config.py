"""The config schema: every group option composes and validates; every bad number, word, device or unknown key is
one ConfigError naming the key, raised by train() / val before any data or weights are read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from evolve.config import EvolveConfig
from helpers import CONF, compose, group_options, needs_cuda
from yolo.config import HYP_KEYS, HypConfig, check_train_config, check_val_config, model_layers
from yolo.train import train
from yolo.errors import ConfigError
from yolo.val import run as val_run

# a data config that does not exist: reading it (or any data) would be a different error than the one expected
NOWHERE = "data.file=/nonexistent/nowhere.yaml"
NO_GPU = f"device=cuda:{torch.cuda.device_count()}"  # one past the last CUDA device: invalid on every machine


def train_cfg(*overrides: str):
    return compose("train", ["model=yolov5n", "data=external", NOWHERE, "device=cpu", "mlflow.enabled=false",
                             *overrides])


# ---- every option of every config group composes and passes the checks ------------------------------------------
GROUP_CASES = [("train", group, option) for group in ("model", "data", "hyp", "optimizer", "mlflow")
               for option in group_options(group)]
GROUP_CASES += [("val", group, option) for group in ("model", "data") for option in group_options(group)]
GROUP_CASES += [("evolve", group, option) for group in ("evolve_space", "mlflow") for option in group_options(group)]


@pytest.mark.parametrize("config_name,group,option", GROUP_CASES, ids=lambda v: str(v))
def test_every_group_option_composes_and_validates(config_name, group, option):
    overrides = [f"{group}={option}", "device=cpu"]
    if group == "data" and option == "external":
        overrides.append(NOWHERE)
    if config_name == "val":
        cfg = compose("val", [*overrides, "weights=some.pt"])
        check_val_config(cfg)
    else:
        cfg = compose(config_name, overrides)
        check_train_config(cfg, EvolveConfig if config_name == "evolve" else None)
    if group == "model":
        assert model_layers(cfg.model) == 25  # the v6.0+ layout: 10 backbone rows, 15 head rows
    if group == "hyp":
        written = yaml.safe_load((CONF / "hyp" / f"{option}.yaml").read_text())
        assert set(written) == set(HYP_KEYS), "a hyp file and the schema disagree on the keys"


# ---- refused before any data is read: train() --------------------------------------------------------------------
BAD_TRAIN = [
    ("epochs=0", "epochs: must be >= 1"),
    ("epochs=-1", "epochs: must be >= 1"),
    ("batch_size=0", "batch_size: must be >= 1"),
    ("imgsz=0", "imgsz: must be >= 32"),
    ("imgsz=16", "imgsz: must be >= 32"),
    ("workers=-1", "workers: must be >= 0"),
    ("hyp.lr0=nan", "hyp.lr0: must be a finite number"),
    ("hyp.lr0=0", "hyp.lr0: must be > 0"),
    ("hyp.lrf=inf", "hyp.lrf: must be a finite number"),
    ("hyp.mosaic=2", "hyp.mosaic: must be in [0, 1]"),
    ("hyp.mixup=-0.1", "hyp.mixup: must be in [0, 1]"),
    ("hyp.fliplr=1.5", "hyp.fliplr: must be in [0, 1]"),
    ("hyp.copy_paste=2", "hyp.copy_paste: must be in [0, 1]"),
    ("hyp.hsv_s=1.2", "hyp.hsv_s: must be in [0, 1]"),
    ("hyp.momentum=1", "hyp.momentum: must be in [0, 1)"),
    ("hyp.weight_decay=-0.1", "hyp.weight_decay: must be >= 0"),
    ("hyp.degrees=-inf", "hyp.degrees: must be a finite number"),
    ("hyp.anchors=-3", "hyp.anchors: must be >= 0"),
    ("label_smoothing=1", "label_smoothing: must be in [0, 1)"),
    ("iou_thres=1.5", "iou_thres: must be in [0, 1]"),
    ("mlflow.timeout_s=0", "mlflow.timeout_s: must be > 0"),
    ("cache=foo", "cache: must be one of auto, ram, disk, none, false"),
    ("freeze=[100]", "freeze: [100] freezes the first 100 layers but the model has 25"),
    ("freeze=[0,30]", "freeze: layers [30] do not exist"),
    ("freeze=[-1]", "freeze: must be layer indices >= 0"),
    (NO_GPU, "device: "),
    ("device=tpu", "device: 'tpu' is unknown"),
    ("+hyp.lr00=1", "hyp.lr00: not a setting of HypConfig (did you mean hyp.lr0?)"),
    ("+optimizer.betas=1", "optimizer.betas: not a setting"),
    ("+model.depth=1", "model.depth: not a setting"),
    ("+data.foo=1", "data.foo: not a setting"),
    ("+mlflow.uri=x", "mlflow.uri: not a setting"),
    ("+epoch=3", "epoch: not a setting of TrainConfig (did you mean epochs?)"),
    ("~model", "model: required"),
    ("data.file=null", "data: required"),
]


@pytest.mark.parametrize("override,message", BAD_TRAIN, ids=[o for o, _ in BAD_TRAIN])
def test_train_refuses_before_reading_data(override, message, tmp_path):
    cfg = train_cfg(override, f"project={tmp_path / 'runs'}")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "runs").exists()  # nothing written: the run had not started


@pytest.mark.parametrize("override", ["cache=false", "cache=none", "cache=ram", "cache=disk", "cache=null", "cache=auto",
                                      "imgsz=100", "freeze=[25]", "freeze=[0,1,24]", "hyp.anchors=3",
                                      "hyp.mosaic=0", "hyp.fliplr=1", "device=cpu", "device=auto"])
def test_train_accepts_sound_values(override):
    cfg = train_cfg(override)
    check_train_config(cfg)
    if override in ("cache=false", "cache=none"):
        assert cfg.cache is None  # what the loader takes for "no cache"


@needs_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "0", "auto"])
def test_present_gpu_is_accepted(device):
    check_train_config(train_cfg(f"device={device}"))


def test_cache_words_become_null_in_a_plain_mapping():
    cfg = OmegaConf.to_container(train_cfg("cache=false"), resolve=True)
    check_train_config(cfg)
    assert cfg["cache"] is None


# ---- refused before weights or data are read: val ----------------------------------------------------------------
@pytest.mark.parametrize("override,message", [("imgsz=0", "imgsz: must be >= 32"),
                                              ("batch_size=0", "batch_size: must be >= 1"),
                                              ("conf_thres=-1", "conf_thres: must be in [0, 1]"),
                                              ("split=trian", "split: must be one of train, val, test"),
                                              (NO_GPU, "device: "),
                                              ("+hyp.lr0=1", "hyp: not a setting of ValConfig"),
                                              ("+verbos=true", "verbos: not a setting of ValConfig")])
def test_val_refuses_before_reading_weights(override, message):
    cfg = compose("val", ["weights=/nonexistent/weights.pt", "data=external", NOWHERE, "device=cpu", override])
    with pytest.raises(ConfigError) as e:
        val_run(cfg)
    assert str(e.value).startswith(message), str(e.value)


def test_val_without_weights_is_required():
    with pytest.raises(ConfigError, match="^weights: required"):
        check_val_config(compose("val", ["imgsz=0"]))  # the missing key is named first


# ---- evolution: its own settings and its generations' training settings -------------------------------------------
@pytest.mark.parametrize("override,message", [("generations=0", "generations: must be >= 1"),
                                              ("evolve.workers=0", "evolve.workers: must be >= 1"),
                                              ("evolve.max_retries=-1", "evolve.max_retries: must be >= 0"),
                                              ("evolve.poll_s=0", "evolve.poll_s: must be > 0"),
                                              ("evolve.heartbeat_s=0", "evolve.heartbeat_s: must be >= 1"),
                                              (f"evolve.devices=[cpu,{NO_GPU.split('=')[1]}]",
                                               "evolve.devices[1]: "),
                                              ("+evolve.seeed=1", "evolve.seeed: not a setting"),
                                              ("epochs=0", "epochs: must be >= 1"),
                                              ("hyp.mosaic=2", "hyp.mosaic: must be in [0, 1]")])
def test_evolve_settings_are_checked(override, message):
    cfg = compose("evolve", ["device=cpu", override])
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg, EvolveConfig)
    assert str(e.value).startswith(message), str(e.value)


# ---- one home for the hyp keys and their domains -----------------------------------------------------------------
def test_evolution_limits_lie_inside_the_hyp_domains():
    """Upstream's evolution table (gain, lower, upper) is the fact the domains come from: every limit it can reach
    must pass the schema's rule, or evolution would propose settings that training refuses."""
    space = yaml.safe_load((CONF / "evolve_space" / "default.yaml").read_text())
    rules = {f.name: f.metadata["rule"] for f in dataclasses.fields(HypConfig)}
    assert set(space) <= set(HYP_KEYS)
    for key, (_gain, lower, upper) in space.items():
        rules[key](f"hyp.{key}", float(lower))
        rules[key](f"hyp.{key}", float(upper))
    assert all(f.metadata.get("rule") for f in dataclasses.fields(HypConfig)), "every hyp has a domain"


# ---- one home for Hydra's settings and for the tracking defaults ------------------------------------------------
RUN_DIRS = {"train": "${project}/${now:%Y-%m-%d_%H-%M-%S}_${name}", "val": "runs/val/${now:%Y-%m-%d_%H-%M-%S}",
            "evolve": "${evolve.out_dir}"}


@pytest.mark.parametrize("config_name", ["train", "val", "evolve"])
@pytest.mark.parametrize("option", group_options("hydra"))
def test_hydra_settings_have_one_home(config_name, option):
    shared = yaml.safe_load((CONF / "hydra" / f"{option}.yaml").read_text())
    own = yaml.safe_load((CONF / f"{config_name}.yaml").read_text())
    assert f"hydra: {option}" in (CONF / f"{config_name}.yaml").read_text()
    assert not {"job", "job_logging"} & set(own.get("hydra", {})), "job and logging settings live in conf/hydra/"
    h = OmegaConf.to_container(compose(config_name, ["device=cpu"], with_hydra=True).hydra, resolve=False)
    assert h["job"]["chdir"] is False and h["job_logging"]["formatters"] == shared["job_logging"]["formatters"]
    assert h["run"]["dir"] == RUN_DIRS[config_name]  # each entry's run folder as before
    assert h["sweep"]["subdir"] == "${hydra.job.num}"


def test_mlflow_group_options():
    assert yaml.safe_load((CONF / "mlflow" / "default.yaml").read_text()) is None  # the schema holds the defaults
    train_, evolve_ = compose("train").mlflow, compose("evolve").mlflow
    assert (train_.experiment, train_.log_weights, train_.enabled) == ("yolo", True, True)
    assert (evolve_.experiment, evolve_.log_weights, evolve_.enabled) == ("yolo-evolve", False, True)
    assert compose("train", ["mlflow=evolve"]).mlflow.experiment == "yolo-evolve"
