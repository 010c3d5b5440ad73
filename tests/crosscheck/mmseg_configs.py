"""The official HorNet UperNet test configs as data, for the mmseg cross-check.

Written from raoyongming/HorNet semantic_segmentation/configs (hornet/*, horfpn/* and
_base_/models/upernet_hornet.py) merged with mmseg 0.30's _base_/datasets/ade20k.py test
pipeline, as mmcv's Config merges them; training-only fields (optimizer, schedule, the
training pipeline) are left out. Pure data: imported by the test (main environment) and by
mmseg_reference.py (the OpenMMLab environment).

`TINY` is the one change the cross-check makes: narrower and shallower widths, so the
logic is checked in seconds. The structure, options and test pipeline stay the official ones.
"""

from __future__ import annotations

import copy

NORM_CFG = dict(type="SyncBN", requires_grad=True)
IMG_NORM_CFG = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
CROP_SIZE = (512, 512)

TEST_PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(
        type="MultiScaleFlipAug",
        img_scale=(2048, 512),
        flip=False,
        transforms=[
            dict(type="Resize", keep_ratio=True),
            dict(type="RandomFlip"),
            dict(type="Normalize", **IMG_NORM_CFG),
            dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"]),
        ],
    ),
]

GNCONV_7X7 = [
    "partial(gnconv, order=2, s=1/3)",
    "partial(gnconv, order=3, s=1/3)",
    "partial(gnconv, order=4, s=1/3)",
    "partial(gnconv, order=5, s=1/3)",
]
GNCONV_GF = [
    "partial(gnconv, order=2, s=1/3)",
    "partial(gnconv, order=3, s=1/3)",
    "partial(gnconv, order=4, s=1/3, h=24, w=13, gflayer=GlobalLocalFilter)",
    "partial(gnconv, order=5, s=1/3, h=12, w=7, gflayer=GlobalLocalFilter)",
]


def _upernet(pretrained: str, backbone: dict, decode_head: dict, aux_in: int) -> dict:
    """_base_/models/upernet_hornet.py with a variant's overrides merged in."""
    return dict(
        model=dict(
            type="EncoderDecoder",
            pretrained=pretrained,
            backbone=dict(type="HorNet", block="Block", out_indices=[0, 1, 2, 3]) | backbone,
            decode_head=dict(
                type="UPerHead",
                in_index=[0, 1, 2, 3],
                pool_scales=(1, 2, 3, 6),
                channels=512,
                dropout_ratio=0.1,
                num_classes=150,
                norm_cfg=NORM_CFG,
                align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            )
            | decode_head,
            auxiliary_head=dict(
                type="FCNHead",
                in_channels=aux_in,
                in_index=2,
                channels=256,
                num_convs=1,
                concat_input=False,
                dropout_ratio=0.1,
                num_classes=150,
                norm_cfg=NORM_CFG,
                align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
            ),
            train_cfg=dict(),
            test_cfg=dict(mode="slide", crop_size=CROP_SIZE, stride=(341, 341)),
        ),
        data=dict(test=dict(pipeline=TEST_PIPELINE)),
    )


SMALL_BACKBONE = dict(depths=[2, 3, 18, 2], base_dim=96, gnconv=GNCONV_7X7, drop_path_rate=0.3)
SMALL_IN = [96, 192, 384, 768]

# Official config file (without `_512_160k_ade20k.py`) -> merged config.
CONFIGS = {
    "upernet_hornet_tiny_gf": _upernet(
        "pretrained/hornet_tiny_gf.pth",
        dict(depths=[2, 3, 18, 2], base_dim=64, gnconv=GNCONV_GF, drop_path_rate=0.4),
        dict(in_channels=[64, 128, 256, 512], num_classes=150),
        aux_in=256,
    ),
    "horfpn_7x7_upernet_hornet_small_7x7": _upernet(
        "pretrained/hornet_small_7x7.pth",
        SMALL_BACKBONE,
        dict(
            type="GNUPerHead",
            conv_cfg=dict(type="gnconv", kernel_size=7, proj_out=True, order=2),
            in_channels=SMALL_IN,
            num_classes=150,
        ),
        aux_in=384,
    ),
    "horfpn_gf_upernet_hornet_small_7x7": _upernet(
        "pretrained/hornet_small_7x7.pth",
        SMALL_BACKBONE,
        dict(
            type="GNUPerHead",
            conv_cfg=dict(type="gngf", proj_out=True, order=2),
            in_channels=SMALL_IN,
            num_classes=150,
        ),
        aux_in=384,
    ),
}

# Tiny widths: HorNet C=16, one block per stage, 32-channel UperNet head.
TINY_BASE_DIM = 16
TINY_DEPTHS = (1, 1, 1, 1)
TINY_HEAD_CHANNELS = 32
# The same network through model_export.create_model.
TINY_OVERRIDES = dict(base_dim=TINY_BASE_DIM, depths=TINY_DEPTHS, channels=TINY_HEAD_CHANNELS)


def tiny(config: dict) -> dict:
    """`config` at the tiny widths; nothing else changes."""
    config = copy.deepcopy(config)
    model = config["model"]
    widths = [TINY_BASE_DIM * 2**i for i in range(4)]
    model["backbone"].update(base_dim=TINY_BASE_DIM, depths=list(TINY_DEPTHS))
    model["decode_head"].update(in_channels=widths, channels=TINY_HEAD_CHANNELS)
    model["auxiliary_head"].update(in_channels=widths[2], channels=TINY_HEAD_CHANNELS // 2)
    return config
