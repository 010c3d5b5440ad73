"""UperNet over the HorNet backbone: mmseg's UPerHead (or its HorFPN form) for semantic
segmentation, laid out so the released mmseg state dicts load unchanged.

Reading order: the pyramid pooling module, the decode head, the segmentor. Keys follow
HORNET_SPEC.md: `backbone.*` (HorNetFeatures) and `decode_head.{psp_modules, bottleneck,
lateral_convs, fpn_convs, fpn_bottleneck, conv_seg}`; `auxiliary_head.*` is training-only
and dropped by the checkpoint adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model_export.checkpoint import checkpoint_filter_fn as classifier_filter_fn
from model_export.horfpn import ConvModule, GnConvModule
from model_export.hornet import HorNetFeatures

POOL_SCALES = (1, 2, 3, 6)
HEAD_CHANNELS = 512
TRAINING_ONLY_PREFIXES = ("auxiliary_head.",)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg's `resize` as UPerHead and encode_decode use it: bilinear, align_corners False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _bin_average_matrix(length: int, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """(bins, length) matrix averaging adaptive-pooling bin i: [floor(i*L/b), ceil((i+1)*L/b)).

    Built from Python numbers so an exported graph holds it as one constant.
    """
    rows = []
    for i in range(bins):
        start, end = (i * length) // bins, -(-(i + 1) * length // bins)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(length)])
    return torch.tensor(rows, dtype=dtype)


class AdaptiveAvgPool(nn.Module):
    """`adaptive_avg_pool2d` as two averaging matmuls.

    Same bins as torch's; exportable for any size (the ONNX exporters refuse adaptive
    pooling whose output does not divide the input, e.g. scale 3 over a 16x16 map).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        rows = _bin_average_matrix(height, self.size, x.dtype).to(x.device)
        cols = _bin_average_matrix(width, self.size, x.dtype).to(x.device)
        return rows @ x @ cols.T


class PyramidPooling(nn.ModuleList):
    """mmseg's PPM: per scale, adaptive average pooling then a 1x1 ConvModule (keys
    `{i}.1.conv`, `{i}.1.bn`); each result is resized back to the input's size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(AdaptiveAvgPool(scale), ConvModule(in_channels, channels, 1))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(stage(x), x.shape[-2:]) for stage in self]


class UPerHead(nn.Module):
    """Unified Perceptual Parsing head: PPM on the top level, an FPN over the others, all
    levels resized to stride 4, concatenated, fused, classified per pixel.

    `fusion` None is mmseg's 3x3 ConvModule `fpn_bottleneck`; '7x7' or 'gf' is HorFPN's
    gnConv module there (then BN + ReLU; `fusion_proj_out` adds its 1x1 proj_out). False
    is the official head class's default, but both official HorFPN configs set it True,
    and so do the registered HorFPN variants (model_export.dense).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = HEAD_CHANNELS,
        pool_scales: Sequence[int] = POOL_SCALES,
        fusion: str | None = None,
        fusion_proj_out: bool = False,
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = PyramidPooling(pool_scales, top, channels)
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        fused = len(in_channels) * channels
        if fusion is None:
            self.fpn_bottleneck = ConvModule(fused, channels, 3)
        else:
            self.fpn_bottleneck = GnConvModule(
                fused, channels, mixer=fusion, proj_out=fusion_proj_out
            )
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [outs[0], *(_resize(o, size) for o in outs[1:])]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.forward_features(features))


class HorNetUperNet(nn.Module):
    """HorNet backbone + UPerHead: a normalised float NCHW tile in, per-pixel class logits
    at the tile's size out (mmseg's `encode_decode`: head logits at stride 4, resized
    bilinearly with align_corners False)."""

    def __init__(
        self,
        num_classes: int = 150,
        channels: int = HEAD_CHANNELS,
        fusion: str | None = None,
        fusion_proj_out: bool = False,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = HorNetFeatures(**backbone_kwargs)
        self.decode_head = UPerHead(
            self.backbone.out_channels,
            num_classes,
            channels=channels,
            fusion=fusion,
            fusion_proj_out=fusion_proj_out,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def forward_head(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode_head(features)

    def forward_logits(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """The head's logits for the trunk's `features`, resized to `size` (the tile's)."""
        return _resize(self.forward_head(features), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_logits(self.forward_features(x), x.shape[-2:])

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
        """Adapt an mmseg state dict: drop `auxiliary_head.*` (training only), then the
        classifier adapter's renames (`module.`) and Global Filter resizing to the
        filters this model was built with (its tile size)."""
        kept = {
            k: v
            for k, v in state_dict.items()
            if not k.removeprefix("module.").startswith(TRAINING_ONLY_PREFIXES)
        }
        return classifier_filter_fn(kept, model)
