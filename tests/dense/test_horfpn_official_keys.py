"""HorFPN as the official configs build it (issue P10, item 0): for each HorFPN config,
the key set and shapes an official-code checkpoint holds for the neck/head, built here
from the official module structure (raoyongming/HorNet: `GNConvModule` in
mmcv_custom/gn_module.py, `GNUPerHead` in semantic_segmentation/decode_heads, `GNFPN` in
object_detection/necks, mmcv's ConvModule), equals our model's.

The configs' neck options are data below, copied from the official config files; the
module defaults are those of the two official `GNConvModule`s (they differ: the
segmentation one defaults to kernel 3 and w = h // 2 + 1, the detection one to kernel 7
and w = 17).
"""

from __future__ import annotations

import pytest
import torch

from model_export import create_model
from model_export.horfpn import FPN
from tests.crosscheck.mmseg_configs import CONFIGS as SEG_CONFIGS

Shapes = dict[str, tuple[int, ...]]

SMALL_IN = [96, 192, 384, 768]
ADE20K_CLASSES = 150
UPERNET_CHANNELS = 512
POOL_SCALES = (1, 2, 3, 6)
FPN_CHANNELS = 256

SEG_GN_DEFAULTS = dict(
    kernel_size=3, dim_ratio=1, proj_out=False, order=2, type="gnconv", h=32, gf_kernel_size=3
)
DET_GN_DEFAULTS = dict(
    kernel_size=7, dim_ratio=1, proj_out=False, order=2, type="gnconv", h=32, w=17
)

# object_detection/configs/horfpn/horfpn_{7x7,gf}_mask_rcnn_hornet_small_7x7_1x_coco_in1k.py:
# neck=dict(type='GNFPN', gn_conv_cfg=..., in_channels=[96, 192, 384, 768]) over the
# base FPN (out_channels=256, num_outs=5; no extra convs, no norm, no activation).
DET_CONFIGS = {
    "horfpn_7x7_mask_rcnn_hornet_small_7x7": dict(
        kernel_size=7, type="gnconv", proj_out=True, order=2
    ),
    "horfpn_gf_mask_rcnn_hornet_small_7x7": dict(
        kernel_size=7, type="gngf", proj_out=True, order=2
    ),
}
SEG_HORFPN = [name for name in SEG_CONFIGS if name.startswith("horfpn_")]


def conv_module(prefix: str, cin: int, cout: int, kernel: int, norm: bool) -> Shapes:
    """mmcv's ConvModule: conv (bias only without a norm), then `bn` when normed."""
    shapes = {f"{prefix}.conv.weight": (cout, cin, kernel, kernel)}
    if not norm:
        shapes[f"{prefix}.conv.bias"] = (cout,)
        return shapes
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{name}"] = (cout,)
    shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


def conv(prefix: str, cin: int, cout: int, kernel: int = 1, bias: bool = True) -> Shapes:
    shapes = {f"{prefix}.weight": (cout, cin, kernel, kernel)}
    if bias:
        shapes[f"{prefix}.bias"] = (cout,)
    return shapes


def gn_conv_module(prefix: str, cin: int, cout: int, options: dict, norm: bool) -> Shapes:
    """The official GNConvModule: proj_in to 2 * dim, a depthwise mixer over the gated
    widths, pws, proj_out only when configured, the norm when norm_cfg is set."""
    dim = cout * options["dim_ratio"]
    dims = [dim // 2**i for i in range(options["order"])][::-1]
    mixed = sum(dims)
    shapes = conv(f"{prefix}.proj_in", cin, 2 * dim)
    if options["type"] == "gnconv":
        kernel = options["kernel_size"]
        shapes[f"{prefix}.dwconv.weight"] = (mixed, 1, kernel, kernel)
        shapes[f"{prefix}.dwconv.bias"] = (mixed,)
    else:
        h = options["h"]
        w = options.get("w", h // 2 + 1)
        k = options.get("gf_kernel_size", 3)
        shapes[f"{prefix}.dwconv.dw.weight"] = (mixed // 2, 1, k, k)
        shapes[f"{prefix}.dwconv.complex_weight"] = (mixed // 2, h, w, 2)
        for norm_name in ("pre_norm", "post_norm"):
            shapes[f"{prefix}.dwconv.{norm_name}.weight"] = (mixed,)
            shapes[f"{prefix}.dwconv.{norm_name}.bias"] = (mixed,)
    if options["proj_out"]:
        shapes |= conv(f"{prefix}.proj_out", dim, cout)
    for i in range(options["order"] - 1):
        shapes |= conv(f"{prefix}.pws.{i}", dims[i], dims[i + 1])
    if norm:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{name}"] = (cout,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


def gn_uper_head(in_channels: list[int], conv_cfg: dict) -> Shapes:
    """GNUPerHead (mmseg's UPerHead, fpn_bottleneck a GNConvModule) under `decode_head.`;
    norm_cfg SyncBN as in _base_/models/upernet_hornet.py."""
    channels, prefix = UPERNET_CHANNELS, "decode_head"
    shapes: Shapes = {}
    for i in range(len(POOL_SCALES)):
        shapes |= conv_module(f"{prefix}.psp_modules.{i}.1", in_channels[-1], channels, 1, True)
    top = in_channels[-1] + len(POOL_SCALES) * channels
    shapes |= conv_module(f"{prefix}.bottleneck", top, channels, 3, True)
    for i, cin in enumerate(in_channels[:-1]):
        shapes |= conv_module(f"{prefix}.lateral_convs.{i}", cin, channels, 1, True)
        shapes |= conv_module(f"{prefix}.fpn_convs.{i}", channels, channels, 3, True)
    fused = len(in_channels) * channels
    options = SEG_GN_DEFAULTS | conv_cfg
    shapes |= gn_conv_module(f"{prefix}.fpn_bottleneck", fused, channels, options, norm=True)
    return shapes | conv(f"{prefix}.conv_seg", channels, ADE20K_CLASSES)


def gn_fpn(in_channels: list[int], gn_conv_cfg: dict) -> Shapes:
    """GNFPN as Mask R-CNN configures it, under `neck.`: lateral ConvModules and
    GNConvModules without norm, no extra convs (the fifth level is max-pooled)."""
    options = DET_GN_DEFAULTS | gn_conv_cfg
    shapes: Shapes = {}
    for i, cin in enumerate(in_channels):
        shapes |= conv_module(f"neck.lateral_convs.{i}", cin, FPN_CHANNELS, 1, False)
        shapes |= gn_conv_module(f"neck.fpn_convs.{i}", FPN_CHANNELS, FPN_CHANNELS, options, False)
    return shapes


def _shapes(state: dict[str, torch.Tensor], prefix: str, rename: str = "") -> Shapes:
    return {
        rename + k.removeprefix(prefix): tuple(v.shape)
        for k, v in state.items()
        if k.startswith(prefix)
    }


@pytest.mark.parametrize("name", SEG_HORFPN)
def test_horfpn_upernet_head_has_the_official_keys(name) -> None:
    head = SEG_CONFIGS[name]["model"]["decode_head"]
    assert head["type"] == "GNUPerHead" and head["in_channels"] == SMALL_IN
    expected = gn_uper_head(head["in_channels"], head["conv_cfg"])
    model = create_model(name, depths=(1, 1, 1, 1))
    assert _shapes(model.state_dict(), "decode_head.", "decode_head.") == expected


@pytest.mark.parametrize("name", SEG_HORFPN)
def test_horfpn_upernet_official_checkpoint_loads_strictly(tmp_path, name) -> None:
    """Backbone from the model (its keys are checked against the release elsewhere),
    head and the training-only auxiliary head from the official structure."""
    model = create_model(name, depths=(1, 1, 1, 1))
    shapes = _shapes(model.state_dict(), "backbone.", "backbone.")
    shapes |= gn_uper_head(SMALL_IN, SEG_CONFIGS[name]["model"]["decode_head"]["conv_cfg"])
    shapes |= conv_module("auxiliary_head.convs.0", SMALL_IN[2], 256, 3, True)
    shapes |= conv("auxiliary_head.conv_seg", 256, ADE20K_CLASSES)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.rand(s, generator=gen) if s else torch.tensor(5) for k, s in shapes.items()}
    path = tmp_path / f"{name}_512_160k_ade20k.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    loaded = create_model(name, checkpoint=path, depths=(1, 1, 1, 1)).state_dict()
    key = "decode_head.fpn_bottleneck.proj_out.weight"
    torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(DET_CONFIGS))
def test_horfpn_mask_rcnn_neck_has_the_official_keys(name) -> None:
    model = create_model(name, depths=(1, 1, 1, 1))
    (neck,) = [m for m in model.modules() if isinstance(m, FPN)]
    got = {f"neck.{k}": tuple(v.shape) for k, v in neck.state_dict().items()}
    assert got == gn_fpn(SMALL_IN, DET_CONFIGS[name])


def test_horfpn_neck_options_are_the_official_ones() -> None:
    """Order 2, kernel 7, GF 32 x 17 and proj_out in every official HorFPN config."""
    from model_export.horfpn import HORFPN_GF_SIZE, HORFPN_KERNEL, HORFPN_ORDER

    cfgs = [SEG_CONFIGS[n]["model"]["decode_head"]["conv_cfg"] for n in SEG_HORFPN]
    seg = [SEG_GN_DEFAULTS | c for c in cfgs]
    det = [DET_GN_DEFAULTS | c for c in DET_CONFIGS.values()]
    assert {o["order"] for o in seg + det} == {HORFPN_ORDER}
    assert all(o["proj_out"] for o in seg + det)
    assert {o["kernel_size"] for o in seg + det if o["type"] == "gnconv"} == {HORFPN_KERNEL}
    assert {(o["h"], o["h"] // 2 + 1) for o in seg if o["type"] == "gngf"} == {HORFPN_GF_SIZE}
    assert {(o["h"], o["w"]) for o in det if o["type"] == "gngf"} == {HORFPN_GF_SIZE}
