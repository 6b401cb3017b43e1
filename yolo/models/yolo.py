"""The detection head, the YAML parser and the detection model.

An architecture is a dict in upstream's layout (``conf/model/yolov5s.yaml``): ``nc``, ``depth_multiple``,
``width_multiple``, ``anchors`` and two lists of layers, ``backbone`` and ``head``, each row
``[from, number, module, args]``. :func:`parse_model` turns it into an ``nn.Sequential`` whose indices, module
names and therefore state-dict keys (``model.0.conv.weight``, ``model.24.anchors``, ...) equal upstream's.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from yolo.models.common import C3, SPPF, Bottleneck, Concat, Conv, default_activation

LOGGER = logging.getLogger(__name__)

CONF_MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x``."""
    return int(math.ceil(x / divisor) * divisor)


class Detect(nn.Module):
    """Per-level 1x1 output convolutions plus the box decoding used at inference.

    ``anchors`` is a buffer ``(nl, na, 2)`` in grid units (pixels / stride), as upstream stores it.
    ``stride`` is a non-persistent buffer (it moves with ``.to()`` but stays out of the state dict).
    """

    def __init__(self, nc: int = 80, anchors=(), ch=(), inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.inplace = inplace  # kept for parity with upstream's attribute; decoding here never writes in place
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]):
        raw = []
        decoded = []
        for i in range(self.nl):
            p = self.m[i](xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                decoded.append(self._decode(p, i).view(bs, -1, self.no))
        if self.training:
            return raw
        return torch.cat(decoded, 1), raw

    def _decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Raw logits (bs, na, ny, nx, no) -> boxes cx, cy, w, h in input pixels, then objectness and classes."""
        _, _, ny, nx, _ = p.shape
        grid, anchor_grid = self._make_grid(nx, ny, i, p.dtype)
        y = p.sigmoid()
        xy, wh, scores = y.split((2, 2, self.nc + 1), dim=4)
        xy = (xy * 2 + grid) * self.stride[i]
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, scores), dim=4)

    def _make_grid(self, nx: int, ny: int, i: int, dtype: torch.dtype):
        device = self.anchors.device
        ys = torch.arange(ny, device=device, dtype=dtype)
        xs = torch.arange(nx, device=device, dtype=dtype)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        shape = (1, self.na, ny, nx, 2)
        grid = torch.stack((xv, yv), dim=2).expand(shape) - 0.5  # so that xy = 2 * sigmoid - 0.5 + cell
        anchor_grid = (self.anchors[i] * self.stride[i]).to(dtype).view(1, self.na, 1, 1, 2).expand(shape)
        return grid, anchor_grid


# The modules a YAML may name, under the spellings upstream's files use.
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
    "Upsample": nn.Upsample,
}
_CONV_LIKE = (Conv, Bottleneck, C3, SPPF)  # args start with the output width, scaled by width_multiple
_REPEATED_INSIDE = (C3,)  # the depth count becomes the block's own ``n`` argument

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "Mish": nn.Mish,
    "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
}


def _parse_activation(spec: str | None) -> nn.Module | None:
    """``'nn.LeakyReLU(0.1)'`` -> module. Only a fixed set of activations with numeric arguments is accepted."""
    if spec is None:
        return None
    match = re.fullmatch(r"\s*(?:nn\.|torch\.nn\.)?(\w+)\s*\(\s*([-+0-9.eE,\s]*)\)\s*", str(spec))
    if not match or match.group(1) not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {spec!r}; use one of nn.{'(), nn.'.join(_ACTIVATIONS)}()")
    args = [float(a) for a in match.group(2).split(",") if a.strip()]
    return _ACTIVATIONS[match.group(1)](*args)


def _resolve_arg(a: Any, names: Mapping[str, Any]) -> Any:
    """YAML argument strings naming a value (``nc``, ``anchors``, ``None``, ``True``) -> the value."""
    if isinstance(a, str):
        if a in names:
            return names[a]
        return {"None": None, "True": True, "False": False}.get(a, a)
    return a


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node, mapping or sequence -> plain dicts/lists (deep copy)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return copy.deepcopy(cfg)


def parse_model(cfg: Mapping[str, Any], ch: int = 3, nc: int | None = None) -> tuple[nn.Sequential, list[int]]:
    """Build the layers described by ``cfg`` (upstream's YAML layout) for ``ch`` input channels.

    Returns ``(layers, save)``: an ``nn.Sequential`` whose modules carry ``i`` (index), ``f`` (from), ``type`` and
    ``np`` (parameter count), and the sorted indices of layers whose outputs later layers read.
    """
    d = to_plain(cfg)
    nc = int(nc if nc is not None else d["nc"])
    gd, gw = float(d["depth_multiple"]), float(d["width_multiple"])
    anchors = d["anchors"]
    na = len(anchors[0]) // 2 if isinstance(anchors, (list, tuple)) else int(anchors)
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors}

    LOGGER.debug(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers: list[nn.Module] = []
    save: list[int] = []
    chs: list[int] = []  # output width of every layer so far
    c2 = ch
    with default_activation(_parse_activation(d.get("activation"))):
        for i, (f, n, m_name, args) in enumerate(list(d["backbone"]) + list(d["head"])):
            if m_name not in MODULES:
                raise ValueError(f"layer {i}: unknown module {m_name!r} (known: {', '.join(MODULES)})")
            m = MODULES[m_name]
            args = [_resolve_arg(a, names) for a in args]
            n_ = n = max(round(n * gd), 1) if n > 1 else n
            c_in = lambda j: ch if (i == 0 and j == -1) else chs[j]  # noqa: E731

            if m in _CONV_LIKE:
                c1, c2 = c_in(f), args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m in _REPEATED_INSIDE:
                    args.insert(2, n)
                    n = 1
            elif m is Concat:
                c2 = sum(c_in(x) for x in f)
            elif m is Detect:
                args.append([c_in(x) for x in f])
                if isinstance(args[1], int):  # a number of anchors per level instead of the anchors themselves
                    args[1] = [list(range(args[1] * 2))] * len(f)
            else:
                c2 = c_in(f)

            module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
            module.i, module.f = i, f
            module.type = f"{m.__module__}.{m.__qualname__}"
            module.np = sum(p.numel() for p in module.parameters())
            LOGGER.debug(f"{i:>3}{str(f):>18}{n_:>3}{module.np:10.0f}  {module.type:<40}{str(args):<30}")
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(module)
            chs.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


def load_model_yaml(cfg: Any) -> tuple[dict, str | None]:
    """A config given as dict / OmegaConf node / YAML path / zoo name (``'yolov5s'``) -> (plain dict, file name)."""
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.suffix and not path.exists():
            path = CONF_MODEL_DIR / f"{path.name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {cfg}")
        import yaml

        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh), path.name
    return to_plain(cfg), None


class DetectionModel(nn.Module):
    """YOLOv5 detection model built from an architecture dict (or YAML path / zoo name).

    Train mode: ``forward`` returns the ``nl`` raw tensors ``(bs, na, ny, nx, 5 + nc)``.
    Eval mode: ``(decoded (bs, N, 5 + nc), raw list)`` with boxes ``cx, cy, w, h`` in input pixels.
    """

    def __init__(self, cfg: Any = "yolov5s", ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml, self.yaml_file = load_model_yaml(cfg)
        ch = self.yaml["ch"] = int(self.yaml.get("ch") or ch)
        if nc is not None and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(self.yaml, ch=ch)
        self.names = [str(i) for i in range(self.yaml["nc"])]

        m = self.detect
        m.inplace = self.yaml.get("inplace", True)
        # strides from the output sizes of one forward pass; BatchNorm in eval mode so its statistics stay untouched
        s = 256
        was_training = self.training
        self.eval()
        m.train()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, ch, s, s))
        self.train(was_training)
        m.stride.copy_(torch.tensor([s / x.shape[-2] for x in out]))
        check_anchor_order(m)
        m.anchors /= m.stride.view(-1, 1, 1)
        self._initialize_biases()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        """Output strides ``(nl,)``, e.g. ``tensor([8., 16., 32.])`` (the Detect layer's buffer)."""
        return self.detect.stride

    @stride.setter
    def stride(self, value) -> None:
        with torch.no_grad():
            self.detect.stride.copy_(torch.as_tensor(value, dtype=self.detect.stride.dtype))

    @property
    def nc(self) -> int:
        """Number of classes (fixed by the Detect layer; assigning the same value is allowed, as upstream does)."""
        return self.detect.nc

    @nc.setter
    def nc(self, value: int) -> None:
        if int(value) != self.detect.nc:
            raise ValueError(f"model has nc={self.detect.nc}; build a new model to change it to {value}")

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        """Prior biases: ~8 objects per 640 image per level, and a 0.6 prior spread over the classes."""
        m = self.detect
        for conv, s in zip(m.m, m.stride):
            b = conv.bias.view(m.na, -1)
            b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b[:, 5 : 5 + m.nc] += math.log(0.6 / (m.nc - 0.99999))

    def fuse(self) -> "DetectionModel":
        """Fold every BatchNorm into its convolution (for inference). Returns ``self``."""
        for module in self.modules():
            if isinstance(module, Conv):
                module.fuse()
        return self


def check_anchor_order(m: Detect) -> None:
    """Flip the anchor levels if their mean areas are ordered against the strides (as upstream does)."""
    area = m.anchors.prod(-1).mean(-1).view(-1)
    da = area[-1] - area[0]
    ds = m.stride[-1] - m.stride[0]
    if da and da.sign() != ds.sign():
        LOGGER.info("Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


def build_model(model_cfg: Any, nc: int | None = None, ch: int = 3) -> DetectionModel:
    """``DetectionModel`` from a dict / OmegaConf node / YAML path / zoo name, with an optional ``nc`` override."""
    return DetectionModel(model_cfg, ch=ch, nc=nc)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model behind a ``DataParallel`` / ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
