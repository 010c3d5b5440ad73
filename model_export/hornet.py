"""The HorNet network: a ConvNeXt-style four-stage pyramid of HorNet blocks.

`HorNet` is the classifier; `HorNetFeatures` (the dense-prediction backbone) shares its
stem, downsampling and stages and replaces the pooled head with per-stage norms. The
variant table at the bottom registers the ten released classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from model_export.gnconv import (
    GlobalLocalFilter,
    GnConv,
    HorNetBlock,
    LayerNormChannelsFirst,
    depthwise_conv7x7,
)
from model_export.registry import PretrainedCfg, register_variant

DEPTHS = (2, 3, 18, 2)
ORDERS = (2, 3, 4, 5)
GNCONV_SCALE = 1 / 3


def gf_filter_sizes(image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Spectral filter (h, w) of stages 3 and 4 for square inputs of `image_size`.

    The filter covers the rfft2 spectrum of the feature map: (H, H // 2 + 1) with
    H = image_size / 16 and / 32. 224 gives (14, 8), (7, 4); 384 gives (24, 13), (12, 7).
    """
    sizes = []
    for stride in (16, 32):
        side = image_size // stride
        sizes.append((side, side // 2 + 1))
    return tuple(sizes)  # type: ignore[return-value]


def stage_mixers(gf: bool, image_size: int = 224) -> tuple[partial, partial, partial, partial]:
    """Spatial mixer factory per stage: 7x7 everywhere, or GF in stages 3 and 4."""
    if not gf:
        return (depthwise_conv7x7,) * 4  # type: ignore[return-value]
    (h3, w3), (h4, w4) = gf_filter_sizes(image_size)
    return (
        depthwise_conv7x7,
        depthwise_conv7x7,
        partial(GlobalLocalFilter, h=h3, w=w3),
        partial(GlobalLocalFilter, h=h4, w=w4),
    )  # type: ignore[return-value]


class HorNetTrunk(nn.Module):
    """Stem, three downsampling layers and four stages (keys `downsample_layers.*`,
    `stages.*`); the part shared by the classifier and the dense backbone."""

    def __init__(
        self,
        in_chans: int = 3,
        base_dim: int = 64,
        depths: Sequence[int] = DEPTHS,
        orders: Sequence[int] = ORDERS,
        gf: bool = False,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        dims = [base_dim * 2**i for i in range(4)]
        self.dims = dims
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNormChannelsFirst(dims[0])
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNormChannelsFirst(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)
                )
            )
        mixers = stage_mixers(gf, image_size)
        self.stages = nn.ModuleList()
        for i in range(4):
            gnconv = partial(GnConv, order=orders[i], mixer=mixers[i], scale=GNCONV_SCALE)
            self.stages.append(
                nn.Sequential(*(HorNetBlock(dims[i], gnconv) for _ in range(depths[i])))
            )

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each of the four stages (strides 4, 8, 16, 32)."""
        outs = []
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
            outs.append(x)
        return outs


class HorNet(HorNetTrunk):
    """HorNet classifier: trunk -> global average pool -> LayerNorm -> linear head.

    Takes a normalised float32 NCHW batch, returns logits.
    """

    def __init__(self, num_classes: int = 1000, **trunk_kwargs) -> None:
        super().__init__(**trunk_kwargs)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.dims[-1], eps=1e-6)
        self.head = nn.Linear(self.dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.mean((-2, -1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class HorNetFeatures(HorNetTrunk):
    """Dense-prediction backbone: each stage's output through its own channels-first
    LayerNorm (`norm0`..`norm3`), the four feature maps at strides 4, 8, 16, 32."""

    def __init__(self, **trunk_kwargs) -> None:
        super().__init__(**trunk_kwargs)
        for i, dim in enumerate(self.dims):
            self.add_module(f"norm{i}", LayerNormChannelsFirst(dim))

    @property
    def out_channels(self) -> list[int]:
        return list(self.dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, f"norm{i}")(f) for i, f in enumerate(self.forward_stages(x))]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _classifier_cfg(num_classes: int, label_set: str, image_size: int = 224) -> PretrainedCfg:
    return PretrainedCfg(
        task="classify",
        input_size=(3, image_size, image_size),
        crop_pct=0.875 if image_size < 384 else 1.0,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=num_classes,
        label_set=label_set,
    )


def _register_classifier(
    name: str, alias: str, base_dim: int, gf: bool, num_classes: int, image_size: int = 224
) -> None:
    label_set = "imagenet-1k" if num_classes == 1000 else "hornet-22k"

    def build(num_classes: int = num_classes, image_size: int = image_size, **overrides) -> HorNet:
        kwargs = dict(base_dim=base_dim, gf=gf, image_size=image_size) | overrides
        return HorNet(num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = (
        f"{name}: HorNet, C={base_dim}, {'GF' if gf else '7x7'} mixers, {image_size} px."
    )
    register_variant(
        name, build, _classifier_cfg(num_classes, label_set, image_size), aliases=(alias,)
    )


for _size, _c in (("tiny", 64), ("small", 96), ("base", 128)):
    _register_classifier(f"hornet_{_size}_7x7", f"hornet_{_size[0]}_7x7", _c, False, 1000)
    _register_classifier(f"hornet_{_size}_gf", f"hornet_{_size[0]}_gf", _c, True, 1000)
_register_classifier("hornet_base_gf_img384", "hornet_b_gf_384", 128, True, 1000, 384)
_register_classifier("hornet_large_7x7", "hornet_l_7x7", 192, False, 10459)
_register_classifier("hornet_large_gf", "hornet_l_gf", 192, True, 10459)
_register_classifier("hornet_large_gf_img384", "hornet_l_gf_384", 192, True, 10459, 384)
