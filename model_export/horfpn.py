"""Feature pyramid necks for the dense HorNet models: mmcv's ConvModule, the gnConv fusion
module of HorFPN, and the mmdet FPN (plain or HorFPN) for detection.

Parameter names follow the mmseg/mmdet releases (HORNET_SPEC.md, "Checkpoint files") so
their state dicts load unchanged: a ConvModule is `conv` (+ `bn`), a HorFPN fusion
module is a gnConv (`proj_in`, `dwconv`, `pws`, optional `proj_out`) with the
ConvModule's `bn` and activation after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model_export.gnconv import GlobalLocalFilter, GnConv

HORFPN_ORDER = 2
HORFPN_GF_SIZE = (32, 17)
HORFPN_KERNEL = 7


class ConvModule(nn.Module):
    """mmcv's ConvModule: conv, then optionally BatchNorm (`bn`) and ReLU.

    The conv has a bias only when no norm follows, as mmcv builds it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.activate = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def fusion_mixer(kind: str) -> partial:
    """Spatial mixer of a HorFPN fusion module: '7x7' depthwise conv or 'gf' (32, 17)."""
    if kind == "7x7":
        return partial(_depthwise_conv, kernel_size=HORFPN_KERNEL)
    if kind == "gf":
        return partial(GlobalLocalFilter, h=HORFPN_GF_SIZE[0], w=HORFPN_GF_SIZE[1])
    raise ValueError(f"HorFPN mixer must be '7x7' or 'gf', got {kind!r}")


def _depthwise_conv(channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(
        channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=True
    )


class GnConvModule(GnConv):
    """HorFPN's fusion module: an order-2 gnConv of width `out_channels` in place of a
    3x3 ConvModule, followed by that ConvModule's norm and activation.

    Unlike the backbone's gnConv the mixer output is not scaled by 1/3, and proj_in maps
    `in_channels` to 2 * `out_channels`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mixer: str = "7x7",
        proj_out: bool = True,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__(
            out_channels,
            order=HORFPN_ORDER,
            mixer=fusion_mixer(mixer),
            scale=1.0,
            in_dim=in_channels,
            proj_out=proj_out,
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.activate = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(super().forward(x)))


class FPN(nn.Module):
    """mmdet's FPN with `num_outs` = inputs + 1 and no extra convs (Mask R-CNN's neck).

    1x1 lateral convs, nearest-neighbour top-down sum, a fusion per level (3x3 conv, or a
    HorFPN gnConv module when `fusion` is '7x7'/'gf'), then one more level by max-pooling
    the top output with kernel 1, stride 2 (torchvision's LastLevelMaxPool). Returns an
    OrderedDict as torchvision's detectors expect: '0'..'3' (strides 4-32) and 'pool'.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int = 256, fusion: str | None = None
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, norm=False, act=False) for c in in_channels
        )
        self.fpn_convs = nn.ModuleList(self._fusion(out_channels, fusion) for _ in in_channels)

    @staticmethod
    def _fusion(channels: int, fusion: str | None) -> nn.Module:
        if fusion is None:
            return ConvModule(channels, channels, 3, norm=False, act=False)
        return GnConvModule(channels, channels, mixer=fusion, proj_out=True, norm=False, act=False)

    def forward(self, features: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        fused = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals, strict=True)]
        outs = OrderedDict((str(i), f) for i, f in enumerate(fused))
        outs["pool"] = F.max_pool2d(fused[-1], 1, stride=2)
        return outs
