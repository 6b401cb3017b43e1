"""Building blocks of the YOLOv5 (v6+/v7.0) architecture.

The attribute names of every block (``conv``, ``bn``, ``cv1``, ``m``, ...) are part of the public contract: they
decide the state-dict keys, which must equal upstream's so that upstream weights load by name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int | tuple[int, ...], p: int | tuple[int, ...] | None = None, d: int = 1):
    """Padding that keeps the spatial size for stride 1 ("same"), for kernel ``k`` and dilation ``d``."""
    if p is not None:
        return p
    if isinstance(k, int):
        return (d * (k - 1) + 1) // 2
    return [(d * (x - 1) + 1) // 2 for x in k]


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d (eps 1e-3, momentum 0.03) -> activation (SiLU by default).

    As upstream, all ``Conv`` blocks of a model share one activation module instance (``default_act``), which is
    why ``len(list(model.modules()))`` matches upstream's layer count. Activations are stateless, so sharing is
    harmless. ``fuse()`` folds the BatchNorm into the convolution for inference.
    """

    default_act: nn.Module = nn.SiLU()

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act is True:
            self.act = self.default_act
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ``bn`` into ``conv`` (inference only): afterwards ``bn`` is ``None`` and ``conv`` has a bias."""
        if self.bn is None:
            return
        self.conv = fuse_conv_bn(self.conv, self.bn)
        self.bn = None


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` in eval mode with a single convolution."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    # per output channel: y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    fused.requires_grad_(False)
    return fused


@contextlib.contextmanager
def default_activation(act: nn.Module | None) -> Iterator[None]:
    """Temporarily make ``act`` the activation of newly built ``Conv`` blocks (``None``: keep SiLU)."""
    if act is None:
        yield
        return
    previous = Conv.default_act
    Conv.default_act = act
    try:
        yield
    finally:
        Conv.default_act = previous


class Bottleneck(nn.Module):
    """1x1 Conv -> 3x3 Conv, with a residual connection when ``shortcut`` and the widths agree."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions: two 1x1 branches, ``n`` bottlenecks on one, concatenated and mixed."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: three chained k x k max-pools (same result as SPP with k, 2k-1, 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        p3 = self.m(p2)
        return self.cv2(torch.cat((x, p1, p2, p3), dim=1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
