"""gnConv and the Global Filter against their definitions, computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model_export.gnconv import GlobalLocalFilter, GnConv


def _ln_cf(x: np.ndarray, weight, bias, eps=1e-6) -> np.ndarray:
    u = x.mean(1, keepdims=True)
    s = ((x - u) ** 2).mean(1, keepdims=True)
    return weight[None, :, None, None] * (x - u) / np.sqrt(s + eps) + bias[None, :, None, None]


def _bilinear_align_corners(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W), bilinear with align_corners=True, written out."""
    h, w = a.shape[-2:]
    out_h, out_w = size

    def coords(n_in, n_out):
        pos = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * (n_in - 1) / (n_out - 1)
        lo = np.floor(pos).astype(int).clip(0, n_in - 1)
        hi = (lo + 1).clip(0, n_in - 1)
        return lo, hi, pos - lo

    r0, r1, fr = coords(h, out_h)
    c0, c1, fc = coords(w, out_w)
    top = a[..., r0, :] * (1 - fr)[:, None] + a[..., r1, :] * fr[:, None]
    return top[..., c0] * (1 - fc) + top[..., c1] * fc


def _circular_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """y[n] = sum_s x[s] k[(n - s) mod N] per channel, by explicit shifts (no FFT)."""
    out = np.zeros_like(x)
    height, width = x.shape[-2:]
    for dy in range(height):
        for dx in range(width):
            out += np.roll(x, (dy, dx), axis=(-2, -1)) * kernel[None, :, dy, dx, None, None]
    return out


def _gf_reference(layer: GlobalLocalFilter, x: np.ndarray) -> np.ndarray:
    p = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    x = _ln_cf(x, p["pre_norm.weight"], p["pre_norm.bias"])
    half = x.shape[1] // 2
    local, glob = x[:, :half], x[:, half:]
    local_out = torch.nn.functional.conv2d(
        torch.from_numpy(local), torch.from_numpy(p["dw.weight"]), padding=1, groups=half
    ).numpy()
    height, width = x.shape[-2:]
    weight = p["complex_weight"]  # (C, h, w, 2)
    weight = np.moveaxis(
        _bilinear_align_corners(np.moveaxis(weight, -1, 0), (height, width // 2 + 1)), 0, -1
    )
    # The global kernel: the branch's response to a unit impulse.
    kernel = np.fft.irfft2(
        (weight[..., 0] + 1j * weight[..., 1]) / np.sqrt(height * width),
        s=(height, width),
        norm="ortho",
    )
    glob_out = _circular_conv(glob, kernel)
    mixed = np.empty_like(x)
    mixed[:, 0::2], mixed[:, 1::2] = local_out, glob_out  # interleaved, not concatenated
    return _ln_cf(mixed, p["post_norm.weight"], p["post_norm.bias"])


@pytest.mark.parametrize(
    "filter_hw, feature_hw",
    [
        ((14, 8), (14, 14)),
        ((7, 4), (7, 7)),
        ((14, 8), (24, 24)),
        ((24, 13), (14, 14)),
        ((6, 4), (6, 7)),
    ],
)
def test_global_filter_is_a_circular_convolution_with_a_global_kernel(filter_hw, feature_hw):
    gen = torch.Generator().manual_seed(0)
    layer = GlobalLocalFilter(16, *filter_hw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * (1.0 if "complex" in name else 0.3)
                + (1.0 if name.endswith("norm.weight") else 0.0)
            )
    x = torch.randn(2, 16, *feature_hw, generator=gen)
    got = layer(x).detach().double().numpy()
    want = _gf_reference(layer, x.double().numpy())
    # float32 FFT (as the release computes it) against a float64 definition
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-5


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_gnconv_equals_its_recursive_definition(order):
    gen = torch.Generator().manual_seed(order)
    dim = 32
    layer = GnConv(dim, order=order, scale=1 / 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(2, dim, 9, 9, generator=gen, dtype=torch.float64)
    layer = layer.double()
    # Written from the paper: p0 = pwa * f(q0); p_{k+1} = g_k(p_k) * f(q_{k+1}).
    dims = [dim // 2**k for k in range(order)][::-1]
    fused = torch.nn.functional.conv2d(x, layer.proj_in.weight, layer.proj_in.bias)
    pwa, abc = fused[:, : dims[0]], fused[:, dims[0] :]
    mixed = (
        torch.nn.functional.conv2d(
            abc, layer.dwconv.weight, layer.dwconv.bias, padding=3, groups=sum(dims)
        )
        / 3
    )
    starts = np.cumsum([0] + dims)
    q = [mixed[:, starts[k] : starts[k + 1]] for k in range(order)]
    p = pwa * q[0]
    for k in range(order - 1):
        p = torch.nn.functional.conv2d(p, layer.pws[k].weight, layer.pws[k].bias) * q[k + 1]
    want = torch.nn.functional.conv2d(p, layer.proj_out.weight, layer.proj_out.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_gnconv_refuses_a_width_its_order_cannot_split():
    with pytest.raises(ValueError, match="not divisible"):
        GnConv(24, order=5)


def test_fused_channels_first_layer_norm_equals_the_written_out_one() -> None:
    from model_export.gnconv import LayerNormChannelsFirst, fuse_layer_norms

    torch.manual_seed(0)
    norm = LayerNormChannelsFirst(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 24, 7, 5, dtype=torch.float64) * 3 + 1
    norm = norm.double()
    # the definition: standardise each pixel's channel vector, then the affine map
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(
        1, -1, 1, 1
    ) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    model = nn.Sequential(norm, nn.Conv2d(24, 4, 1).double(), LayerNormChannelsFirst(4).double())
    unfused = model(x)
    assert fuse_layer_norms(model) == 2
    assert norm.fused
    torch.testing.assert_close(model(x), unfused, rtol=1e-12, atol=1e-12)
