"""HorFPN's gnConv fusion module against its definition (HORNET_SPEC.md), the mmdet FPN
and the UperNet head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_export import create_model
from model_export.horfpn import FPN, GnConvModule
from tests.helpers.dense_tiny import TINY_SEG, randomize_


def _layer_norm_cf(x, weight, bias):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(s + 1e-6) * weight[:, None, None] + bias[:, None, None]


def _global_local_filter(x, p):
    """The spec's GF layer in plain torch ops; `p` holds the layer's parameters."""
    x = _layer_norm_cf(x, p["pre_norm.weight"], p["pre_norm.bias"])
    local, glob = x.chunk(2, dim=1)
    local = F.conv2d(local, p["dw.weight"], padding=1, groups=local.shape[1])
    height, width = glob.shape[-2:]
    spectrum = torch.fft.rfft2(glob, dim=(2, 3), norm="ortho")
    weight = F.interpolate(
        p["complex_weight"].permute(3, 0, 1, 2),
        size=spectrum.shape[2:],
        mode="bilinear",
        align_corners=True,
    ).permute(1, 2, 3, 0)
    spectrum = spectrum * torch.complex(weight[..., 0], weight[..., 1])
    glob = torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho")
    mixed = torch.empty(x.shape)
    mixed[:, 0::2], mixed[:, 1::2] = local, glob
    return _layer_norm_cf(mixed, p["post_norm.weight"], p["post_norm.bias"])


def _fusion_definition(x, p, out_channels, mixer, proj_out):
    """order-2 gnConv of width out_channels, mixer output NOT scaled, then BN + ReLU."""
    dims = [out_channels // 2, out_channels]
    fused = F.conv2d(x, p["proj_in.weight"], p["proj_in.bias"])
    pwa, abc = fused[:, : dims[0]], fused[:, dims[0] :]
    if mixer == "7x7":
        dw = F.conv2d(abc, p["dwconv.weight"], p["dwconv.bias"], padding=3, groups=abc.shape[1])
    else:
        dw = _global_local_filter(abc, {k[7:]: v for k, v in p.items() if k.startswith("dwconv.")})
    y = pwa * dw[:, : dims[0]]
    y = F.conv2d(y, p["pws.0.weight"], p["pws.0.bias"]) * dw[:, dims[0] :]
    if proj_out:
        y = F.conv2d(y, p["proj_out.weight"], p["proj_out.bias"])
    var = p["bn.running_var"][:, None, None]
    y = (y - p["bn.running_mean"][:, None, None]) / torch.sqrt(var + 1e-5)
    return F.relu(y * p["bn.weight"][:, None, None] + p["bn.bias"][:, None, None])


@pytest.mark.parametrize("mixer", ["7x7", "gf"])
@pytest.mark.parametrize("proj_out", [False, True])
def test_fusion_module_matches_its_definition(mixer, proj_out) -> None:
    module = randomize_(GnConvModule(48, 32, mixer=mixer, proj_out=proj_out)).eval()
    x = torch.randn(2, 48, 20, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = module(x)
    expected = _fusion_definition(x, module.state_dict(), 32, mixer, proj_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0.1


def test_fusion_module_has_the_released_shapes() -> None:
    module = GnConvModule(2048, 512, mixer="gf", proj_out=False)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes["proj_in.weight"] == (1024, 2048, 1, 1)
    assert shapes["dwconv.complex_weight"] == (384, 32, 17, 2)
    assert shapes["pws.0.weight"] == (512, 256, 1, 1)
    assert shapes["bn.weight"] == (512,)
    assert "proj_out.weight" not in shapes


def test_fpn_adds_a_max_pooled_fifth_level() -> None:
    fpn = randomize_(FPN([16, 32, 64, 128], 24)).eval()
    features = [torch.randn(1, c, 64 // 2**i, 48 // 2**i) for i, c in enumerate([16, 32, 64, 128])]
    with torch.no_grad():
        outs = fpn(features)
    assert list(outs) == ["0", "1", "2", "3", "pool"]
    sizes = [tuple(o.shape[-2:]) for o in outs.values()]
    assert sizes == [(64, 48), (32, 24), (16, 12), (8, 6), (4, 3)]
    torch.testing.assert_close(outs["pool"], outs["3"][..., ::2, ::2])


def test_fpn_top_down_path_sums_upsampled_laterals() -> None:
    fpn = randomize_(FPN([4, 8], 6)).eval()
    small = torch.randn(1, 8, 4, 4)
    large = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        outs = fpn([large, small])
        top = fpn.lateral_convs[1](small)
        merged = fpn.lateral_convs[0](large) + top.repeat_interleave(2, -1).repeat_interleave(2, -2)
        torch.testing.assert_close(outs["0"], fpn.fpn_convs[0](merged))


@pytest.mark.parametrize(
    ("fusion", "conv_keys"),
    [
        (None, {"fpn_convs.0.conv.weight", "fpn_convs.0.conv.bias"}),
        (
            "7x7",
            {
                "fpn_convs.0.proj_in.weight",
                "fpn_convs.0.dwconv.weight",
                "fpn_convs.0.pws.0.bias",
                "fpn_convs.0.proj_out.weight",
            },
        ),
        ("gf", {"fpn_convs.3.dwconv.complex_weight", "fpn_convs.3.proj_out.bias"}),
    ],
)
def test_fpn_keys_follow_the_mmdet_layout(fusion, conv_keys) -> None:
    keys = set(FPN([16, 32, 64, 128], 256, fusion=fusion).state_dict())
    assert {"lateral_convs.0.conv.weight", "lateral_convs.3.conv.bias"} <= keys
    assert conv_keys <= keys
    assert not any(".bn." in k for k in keys)


def test_upernet_logits_have_the_tile_size() -> None:
    model = randomize_(create_model("upernet_hornet_tiny_gf", image_size=128, **TINY_SEG))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 150, 128, 128)


def test_horfpn_upernet_replaces_only_the_fpn_bottleneck() -> None:
    plain = create_model("upernet_hornet_small_7x7", **TINY_SEG).state_dict()
    horfpn = create_model("horfpn_gf_upernet_hornet_small_7x7", **TINY_SEG).state_dict()
    assert "decode_head.fpn_bottleneck.conv.weight" in plain
    assert "decode_head.fpn_bottleneck.dwconv.complex_weight" in horfpn
    assert "decode_head.fpn_bottleneck.proj_out.weight" in horfpn
    same = {k for k in plain if "fpn_bottleneck" not in k}
    assert same <= set(horfpn)


def _conv_bn_relu(x, p, prefix, padding):
    y = F.conv2d(x, p[f"{prefix}.conv.weight"], padding=padding)
    mean, var = p[f"{prefix}.bn.running_mean"], p[f"{prefix}.bn.running_var"]
    y = (y - mean[:, None, None]) / torch.sqrt(var + 1e-5)[:, None, None]
    weight, bias = p[f"{prefix}.bn.weight"], p[f"{prefix}.bn.bias"]
    return F.relu(y * weight[:, None, None] + bias[:, None, None])


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _adaptive_pool(x, bins):
    """Adaptive average pooling bins written out: [floor(i*L/b), ceil((i+1)*L/b))."""
    height, width = x.shape[-2:]
    rows = []
    for i in range(bins):
        r0, r1 = i * height // bins, -(-(i + 1) * height // bins)
        cols = []
        for j in range(bins):
            c0, c1 = j * width // bins, -(-(j + 1) * width // bins)
            cols.append(x[..., r0:r1, c0:c1].mean((-2, -1)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _uper_head_definition(features, p):
    """mmseg's UPerHead (align_corners False) written from its description."""
    top = features[-1]
    pooled = [
        _up(_conv_bn_relu(_adaptive_pool(top, s), p, f"psp_modules.{i}.1", 0), top.shape[-2:])
        for i, s in enumerate((1, 2, 3, 6))
    ]
    laterals = [_conv_bn_relu(f, p, f"lateral_convs.{i}", 0) for i, f in enumerate(features[:-1])]
    laterals.append(_conv_bn_relu(torch.cat([top, *pooled], 1), p, "bottleneck", 1))
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1].shape[-2:])
    outs = [_conv_bn_relu(laterals[i], p, f"fpn_convs.{i}", 1) for i in range(3)] + [laterals[3]]
    outs = [outs[0]] + [_up(o, outs[0].shape[-2:]) for o in outs[1:]]
    fused = _conv_bn_relu(torch.cat(outs, 1), p, "fpn_bottleneck", 1)
    return F.conv2d(fused, p["conv_seg.weight"], p["conv_seg.bias"])


def test_uper_head_matches_its_definition() -> None:
    model = randomize_(create_model("upernet_hornet_tiny_7x7", image_size=160, **TINY_SEG), seed=4)
    gen = torch.Generator().manual_seed(5)
    # 160 px: a 5x5 top level, so pool scales 2, 3 and 6 have overlapping, uneven bins.
    features = [
        torch.randn(1, c, 160 // s, 160 // s, generator=gen)
        for c, s in zip((16, 32, 64, 128), (4, 8, 16, 32), strict=True)
    ]
    with torch.no_grad():
        got = model.decode_head(features)
    expected = _uper_head_definition(features, model.decode_head.state_dict())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.shape == (1, 150, 40, 40)


@pytest.mark.parametrize("size", [(5, 5), (16, 16), (7, 12)])
def test_exportable_adaptive_pool_equals_torchs(size) -> None:
    from model_export.upernet import AdaptiveAvgPool

    x = torch.randn(2, 3, *size)
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(AdaptiveAvgPool(bins)(x), F.adaptive_avg_pool2d(x, bins))
