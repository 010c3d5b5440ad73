"""The official HorNet detection test configs as data, for the mmdet cross-check.

Written from raoyongming/HorNet object_detection/configs: hornet/cascade_mask_rcnn_hornet_*
and horfpn/*_mask_rcnn_hornet_small_7x7 over _base_/models/cascade_mask_rcnn_hornet_fpn.py
and _base_/models/mask_rcnn_hornet_fpn.py, with mmdet 2.28's
_base_/datasets/coco_instance.py test pipeline, merged as mmcv's Config merges them.
Training-only fields (train_cfg, which init_detector drops anyway, the optimizer, the
schedule, the training pipeline) are left out. Pure data: imported by the test (main
environment) and by mmdet_reference.py (the OpenMMLab environment).

`tiny` is the one change the logic checks make: narrower, shallower widths (backbone,
FPN, heads), so a check takes seconds. The structure, options and pipeline stay official.
"""

from __future__ import annotations

import copy

IMG_NORM_CFG = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
SCALE = (1333, 800)

TEST_PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(
        type="MultiScaleFlipAug",
        img_scale=SCALE,
        flip=False,
        transforms=[
            dict(type="Resize", keep_ratio=True),
            dict(type="RandomFlip"),
            dict(type="Normalize", **IMG_NORM_CFG),
            dict(type="Pad", size_divisor=32),
            dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"]),
        ],
    ),
]

BACKBONES = {  # size: (base_dim, in_channels, drop_path_rate of the cascade config)
    "tiny": (64, [64, 128, 256, 512], 0.4),
    "small": (96, [96, 192, 384, 768], 0.6),
    "base": (128, [128, 256, 512, 1024], 0.6),
    "large": (192, [192, 384, 768, 1536], 0.7),
}
GF_SIZES = {"tiny": (14, 8, 7, 4), "small": (14, 8, 7, 4), "base": (14, 8, 7, 4)}
GF_SIZES["large"] = (24, 13, 12, 7)


def gnconv_specs(size: str, mixer: str) -> list[str]:
    specs = [f"partial(gnconv, order={order}, s=1/3)" for order in (2, 3, 4, 5)]
    if mixer == "gf":
        h3, w3, h4, w4 = GF_SIZES[size]
        specs[2] = f"partial(gnconv, order=4, s=1/3, h={h3}, w={w3}, gflayer=GlobalLocalFilter)"
        specs[3] = f"partial(gnconv, order=5, s=1/3, h={h4}, w={w4}, gflayer=GlobalLocalFilter)"
    return specs


def _rpn_head(loss_bbox: dict) -> dict:
    return dict(
        type="RPNHead",
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]
        ),
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0, 1.0, 1.0, 1.0]
        ),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=loss_bbox,
    )


def _roi_extractor(output_size: int) -> dict:
    return dict(
        type="SingleRoIExtractor",
        roi_layer=dict(type="RoIAlign", output_size=output_size, sampling_ratio=0),
        out_channels=256,
        featmap_strides=[4, 8, 16, 32],
    )


def _mask_head() -> dict:
    return dict(
        type="FCNMaskHead",
        num_convs=4,
        in_channels=256,
        conv_out_channels=256,
        num_classes=80,
        loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
    )


TEST_CFG = dict(
    rpn=dict(
        nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0
    ),
    rcnn=dict(
        score_thr=0.05,
        nms=dict(type="nms", iou_threshold=0.5),
        max_per_img=100,
        mask_thr_binary=0.5,
    ),
)
# The cascade base config's rpn test_cfg also sets nms_across_levels=False and
# nms_post=1000 (mmdet 2.28 ignores both in RPNHead).
CASCADE_TEST_CFG = copy.deepcopy(TEST_CFG)
CASCADE_TEST_CFG["rpn"].update(nms_across_levels=False, nms_post=1000)


def _convfc_bbox_head(stds: list[float]) -> dict:
    """configs/hornet/*: the cascade's stages as the released detectors override them."""
    return dict(
        type="ConvFCBBoxHead",
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type="SyncBN", requires_grad=True),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
    )


def cascade(size: str, mixer: str) -> dict:
    """configs/hornet/cascade_mask_rcnn_hornet_{size}_{mixer}_3x_coco_in{1k,22k}.py."""
    base_dim, in_channels, drop_path = BACKBONES[size]
    stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
    model = dict(
        type="CascadeRCNN",
        pretrained=None,
        backbone=dict(
            type="HorNet",
            depths=[2, 3, 18, 2],
            base_dim=base_dim,
            block="Block",
            gnconv=gnconv_specs(size, mixer),
            drop_path_rate=drop_path,
            out_indices=[0, 1, 2, 3],
        ),
        neck=dict(type="FPN", in_channels=in_channels, out_channels=256, num_outs=5),
        rpn_head=_rpn_head(dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0)),
        roi_head=dict(
            type="CascadeRoIHead",
            num_stages=3,
            stage_loss_weights=[1, 0.5, 0.25],
            bbox_roi_extractor=_roi_extractor(7),
            bbox_head=[_convfc_bbox_head(s) for s in stds],
            mask_roi_extractor=_roi_extractor(14),
            mask_head=_mask_head(),
        ),
        test_cfg=CASCADE_TEST_CFG,
    )
    return dict(model=model, data=dict(test=dict(pipeline=TEST_PIPELINE)))


def mask_rcnn(fusion: str | None) -> dict:
    """configs/horfpn/{fpn,horfpn_7x7,horfpn_gf}_mask_rcnn_hornet_small_7x7_1x_coco_in1k.py."""
    neck = dict(type="FPN", in_channels=[96, 192, 384, 768], out_channels=256, num_outs=5)
    if fusion is not None:
        kind = {"7x7": "gnconv", "gf": "gngf"}[fusion]
        neck |= dict(
            type="GNFPN", gn_conv_cfg=dict(kernel_size=7, type=kind, proj_out=True, order=2)
        )
    model = dict(
        type="MaskRCNN",
        pretrained=None,
        backbone=dict(
            type="HorNet",
            depths=[2, 3, 18, 2],
            base_dim=96,
            gnconv=gnconv_specs("small", "7x7"),
            drop_path_rate=0.6,
            out_indices=[0, 1, 2, 3],
        ),
        neck=neck,
        rpn_head=_rpn_head(dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=_roi_extractor(7),
            bbox_head=dict(
                type="Shared2FCBBoxHead",
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type="DeltaXYWHBBoxCoder",
                    target_means=[0.0] * 4,
                    target_stds=[0.1, 0.1, 0.2, 0.2],
                ),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
            mask_roi_extractor=_roi_extractor(14),
            mask_head=_mask_head(),
        ),
        test_cfg=TEST_CFG,
    )
    return dict(model=model, data=dict(test=dict(pipeline=TEST_PIPELINE)))


# Our variant name -> official config.
CONFIGS = {
    f"cascade_mask_rcnn_hornet_{size}_{mixer}": cascade(size, mixer)
    for size in BACKBONES
    for mixer in ("7x7", "gf")
}
CONFIGS["mask_rcnn_hornet_small_7x7"] = mask_rcnn(None)
CONFIGS["horfpn_7x7_mask_rcnn_hornet_small_7x7"] = mask_rcnn("7x7")
CONFIGS["horfpn_gf_mask_rcnn_hornet_small_7x7"] = mask_rcnn("gf")

TINY_BASE_DIM = 16
TINY_DEPTHS = (1, 1, 1, 1)
TINY_FPN = 32
TINY_FC = 64
# What create_model needs to build the same tiny detector.
TINY_OVERRIDES = dict(
    base_dim=TINY_BASE_DIM, depths=TINY_DEPTHS, fpn_channels=TINY_FPN, fc_channels=TINY_FC
)


def tiny(config: dict) -> dict:
    """`config` at the tiny widths; nothing else changes."""
    config = copy.deepcopy(config)
    model = config["model"]
    model["backbone"].update(base_dim=TINY_BASE_DIM, depths=list(TINY_DEPTHS))
    model["neck"].update(
        in_channels=[TINY_BASE_DIM * 2**i for i in range(4)], out_channels=TINY_FPN
    )
    model["rpn_head"].update(in_channels=TINY_FPN, feat_channels=TINY_FPN)
    roi = model["roi_head"]
    for extractor in (roi["bbox_roi_extractor"], roi["mask_roi_extractor"]):
        extractor["out_channels"] = TINY_FPN
    heads = roi["bbox_head"] if isinstance(roi["bbox_head"], list) else [roi["bbox_head"]]
    for head in heads:
        head.update(in_channels=TINY_FPN, fc_out_channels=TINY_FC)
        if "conv_out_channels" in head:
            head["conv_out_channels"] = TINY_FPN
    roi["mask_head"].update(in_channels=TINY_FPN, conv_out_channels=TINY_FPN)
    return config
