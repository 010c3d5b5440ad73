"""gnConv, the recursive gated convolution, and the HorNet block.

Written from the paper (Rao et al., NeurIPS 2022) and the checkpoint facts in
HORNET_SPEC.md: parameter names and shapes equal the authors' release so its state
dicts load unchanged. Names appear in reading order: norms, the spatial mixers
(7x7 depthwise conv, Global Filter), gnConv, the block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (HorNet's `data_format='channels_first'`).

    Written out as mean/variance so the computation is the release's, not
    `F.layer_norm` over a permuted tensor (both agree to float rounding).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        # Export graphs only (`fuse_layer_norms`): permute + F.layer_norm, which exports
        # as one ONNX LayerNormalization node instead of nine elementwise ops.
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            y = F.layer_norm(
                x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps
            )
            return y.permute(0, 3, 1, 2)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def fuse_layer_norms(model: nn.Module) -> int:
    """Switch every channels-first LayerNorm of `model` to its fused form (permute +
    F.layer_norm: an ONNX LayerNormalization node between two Transposes) and return how
    many. Same function to float rounding; for export graphs, whose parity against the
    unfused torch model is checked. ONNX Runtime's CPU LayerNormalization kernel runs it
    about twice as fast as the written-out mean/variance at batch 1 (one thread, measured
    at 1x256x14x14: 0.077 vs 0.168 ms)."""
    layers = [m for m in model.modules() if isinstance(m, LayerNormChannelsFirst)]
    for layer in layers:
        layer.fused = True
    return len(layers)


def depthwise_conv7x7(channels: int) -> nn.Conv2d:
    """The 7x7 spatial mixer: depthwise, padding 3, with bias."""
    return nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=True)


def resize_complex_filter(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (C, h, w, 2) spectral filter to (C, H, W, 2) as the release does.

    Bilinear with align_corners=True, the (real, imag) axis acting as the batch axis.
    Used at run time when the feature map differs from the filter, and by the
    checkpoint loader so a 224 checkpoint serves at 384 and back.
    """
    if tuple(weight.shape[1:3]) == tuple(size):
        return weight
    resized = F.interpolate(
        weight.permute(3, 0, 1, 2), size=size, mode="bilinear", align_corners=True
    )
    return resized.permute(1, 2, 3, 0).contiguous()


class GlobalLocalFilter(nn.Module):
    """The Global Filter mixer: half the channels through a 3x3 depthwise conv, half
    through a learned filter in the 2-D Fourier domain, interleaved channel by channel.

    The global half equals a circular convolution with a kernel as large as the feature
    map; for a fixed feature size it is a fixed linear map per channel, which the export
    stage uses to build a DFT-free graph (`global_branch` is the hook it replaces).
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"GlobalLocalFilter needs an even channel count, got {dim}")
        self.dw = nn.Conv2d(dim // 2, dim // 2, 3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.randn(dim // 2, h, w, 2) * 0.02)
        self.pre_norm = LayerNormChannelsFirst(dim)
        self.post_norm = LayerNormChannelsFirst(dim)
        # Set by model_export.gf_rewrite: an exactly equivalent DFT-free module for one
        # fixed feature size. Its buffers are not persistent, so state dicts are unchanged.
        self.fixed_branch: nn.Module | None = None

    def global_branch(self, x: torch.Tensor) -> torch.Tensor:
        """rfft2 -> multiply by the (resized) complex filter -> irfft2, in float32."""
        dtype = x.dtype
        height, width = x.shape[-2:]
        spectrum = torch.fft.rfft2(x.float(), dim=(2, 3), norm="ortho")
        weight = resize_complex_filter(self.complex_weight.float(), spectrum.shape[2:4])
        spectrum = spectrum * torch.view_as_complex(weight)
        return torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho").to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        local, glob = torch.chunk(x, 2, dim=1)
        local = self.dw(local)
        glob = self.global_branch(glob) if self.fixed_branch is None else self.fixed_branch(glob)
        batch, half, height, width = local.shape
        x = torch.stack([local, glob], dim=2).reshape(batch, 2 * half, height, width)
        return self.post_norm(x)


SpatialMixer = Callable[[int], nn.Module]


class GnConv(nn.Module):
    """Recursive gated convolution of order n.

    proj_in splits into a gate seed `pwa` and features `abc`; the mixed features are
    split into chunks whose widths double each order; each order gates the previous
    result with the next chunk after a 1x1 projection. `scale` multiplies the mixer's
    output (1/3 in the released backbones, 1 in HorFPN's fusion module).
    """

    def __init__(
        self,
        dim: int,
        order: int = 5,
        mixer: SpatialMixer = depthwise_conv7x7,
        scale: float = 1.0,
        in_dim: int | None = None,
        proj_out: bool = True,
    ) -> None:
        super().__init__()
        if dim % 2 ** (order - 1):
            raise ValueError(
                f"gnConv width {dim} is not divisible by 2^(order-1)={2 ** (order - 1)}"
            )
        self.order = order
        self.dims = [dim // 2**i for i in range(order)][::-1]
        self.scale = scale
        self.proj_in = nn.Conv2d(in_dim or dim, 2 * dim, 1)
        self.dwconv = mixer(sum(self.dims))
        self.proj_out = nn.Conv2d(dim, dim, 1) if proj_out else nn.Identity()
        self.pws = nn.ModuleList(
            nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.proj_in(x)
        pwa, abc = torch.split(fused, (self.dims[0], sum(self.dims)), dim=1)
        dw_list = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * dw_list[0]
        for i, pw in enumerate(self.pws):
            x = pw(x) * dw_list[i + 1]
        return self.proj_out(x)


class HorNetBlock(nn.Module):
    """gnConv spatial mixing and an MLP, each behind a channel-wise layer scale."""

    def __init__(self, dim: int, gnconv: Callable[[int], GnConv]) -> None:
        super().__init__()
        self.norm1 = LayerNormChannelsFirst(dim)
        self.gnconv = gnconv(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), 1e-6))
        self.gamma2 = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1[:, None, None] * self.gnconv(self.norm1(x))
        y = x.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(y)))) * self.gamma2
        return x + y.permute(0, 3, 1, 2)
