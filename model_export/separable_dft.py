"""Global Filters without FFTs for any feature size: the detection graph's GF form.

`model_export.gf_rewrite` writes exact DFT-free branches for one fixed feature size; a
detector's feature sizes follow each image, so its Global Filters get
`SeparableDFTBranch`, whose DFT matrices are built in the graph from the input's shape
(MatMul, Cos, Sin; no DFT op).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model_export.gnconv import GlobalLocalFilter


def _dft_cos_sin(length: torch.Tensor | int, freqs: torch.Tensor | int, device) -> tuple:
    """cos and sin of 2*pi*n*k/length for n < length, k < freqs, shape (length, freqs).

    n*k is reduced modulo length in integers first so large products keep full accuracy.
    """
    n = torch.arange(length, device=device)
    k = torch.arange(freqs, device=device)
    turns = (n[:, None] * k[None, :]) % length
    angle = turns.float() * (2 * math.pi) / length
    return torch.cos(angle), torch.sin(angle)


class SeparableDFTBranch(nn.Module):
    """A Global Filter's global branch without FFTs, for any feature size.

    The same computation as `GlobalLocalFilter.global_branch`: real DFT along W, complex
    DFT along H, multiply by the (resized) complex filter, inverse along H, then the
    complex-to-real inverse along W, which weights the inner frequencies twice and, as
    irfft does, ignores the imaginary part of the DC and Nyquist columns. The DFT
    matrices are built from the input's shape, so one exported graph serves every image
    size (detection); cost per channel is H*W*(H + W) multiply-adds per transform.
    The filter is a non-persistent buffer: state dicts are unchanged.
    """

    def __init__(self, complex_weight: torch.Tensor) -> None:
        super().__init__()
        weight = complex_weight.detach().float().clone()
        self.register_buffer("weight", weight.permute(3, 0, 1, 2).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        height, width = x.shape[-2], x.shape[-1]
        freqs = width // 2 + 1
        filt = F.interpolate(self.weight, size=(height, freqs), mode="bilinear", align_corners=True)
        cos_w, sin_w = _dft_cos_sin(width, freqs, x.device)
        cos_h, sin_h = _dft_cos_sin(height, height, x.device)
        scale_w = torch.ones_like(cos_w[:, 0]).sum().rsqrt()
        scale_h = torch.ones_like(cos_h[:, 0]).sum().rsqrt()
        cos_w, sin_w = cos_w * scale_w, sin_w * scale_w
        cos_h, sin_h = cos_h * scale_h, sin_h * scale_h
        # rfft along W, then the full DFT along H (e^{-i theta} = cos - i sin).
        real, imag = x @ cos_w, -(x @ sin_w)
        real, imag = cos_h @ real + sin_h @ imag, cos_h @ imag - sin_h @ real
        real, imag = real * filt[0] - imag * filt[1], real * filt[1] + imag * filt[0]
        # inverse along H (e^{+i theta}), then complex-to-real along W.
        real, imag = cos_h @ real - sin_h @ imag, cos_h @ imag + sin_h @ real
        k = torch.arange(freqs, device=x.device)
        twice = 2.0 - (k == 0).float() - (2 * k == width).float()
        y = real @ (cos_w * twice).T - imag @ (sin_w * twice).T
        return y.to(dtype)


def has_global_filters(model: nn.Module) -> bool:
    return any(isinstance(m, GlobalLocalFilter) for m in model.modules())


def use_separable_dft(model: nn.Module) -> nn.Module:
    """Give every Global Filter of `model` a `SeparableDFTBranch`, in place."""
    for layer in model.modules():
        if isinstance(layer, GlobalLocalFilter):
            layer.fixed_branch = SeparableDFTBranch(layer.complex_weight)
    return model
