"""The tiny demo models: registry variants with the recipes' overrides, configured for the
shapes (labels, scales, head widths), and the trunk transfer that starts two of them
from the segmenter's."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from model_export import create_model
from model_export.demo.recipes import (
    BOX_HEAD_DIM,
    CLASSIFY,
    DETECT,
    DETECT_TRAINING,
    GAMMA_INIT,
    MASK_HEAD_DIMS,
    SEGMENT,
    Recipe,
)
from model_export.demo.shapes import CLASS_NAMES, SEGMENT_LABELS


def transfer_trunk(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy into `target` every tensor of a trained HorNet trunk `source` whose name and
    shape it shares (stem, downsampling, 7x7 stages, norms); returns the names copied.

    The segmenter's and the detector's trunks are the same tiny HorNet-7x7, and the
    classifier's first two stages (7x7 in HorNet-GF too) and its 1x1 projections match
    them. The segmenter's trunk (trained on dense, pixel-exact labels, the richest
    signal) starts the detector; the classifier could take it too, but trains from
    scratch with per-pixel losses of its own (`training.train_classifier`).
    """
    theirs = source.state_dict()
    ours = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)
    return sorted(shared)


def _start_layer_scales(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma1", "gamma2")):
                param.fill_(GAMMA_INIT)


def _trained_cfg(model: nn.Module, **extra) -> None:
    """The shapes config: no label set, `extra` added, and marked trained in this process
    (the bundle's weights record then says trained, not random)."""
    cfg = model.pretrained_cfg
    model.pretrained_cfg = dataclasses.replace(
        cfg, label_set=None, extra=cfg.extra | extra | {"trained": True}
    )


def build_classifier(recipe: Recipe = CLASSIFY) -> nn.Module:
    """The tiny HorNet-GF; images are resized whole to its input ("direct"): a centre
    crop would cut off shapes away from the centre of long images."""
    model = create_model(recipe.variant, num_classes=len(CLASS_NAMES), **recipe.overrides)
    preprocess = {"resize_mode": "direct", "crop_pct": None}
    _trained_cfg(model, labels=list(CLASS_NAMES), preprocess=preprocess)
    _start_layer_scales(model)
    return model


def build_segmenter(recipe: Recipe = SEGMENT) -> nn.Module:
    """The tiny UperNet; images are fitted to the recipe's scale and cut into tiles."""
    model = create_model(recipe.variant, num_classes=len(SEGMENT_LABELS), **recipe.overrides)
    tile = model.pretrained_cfg.image_size
    preprocess = model.pretrained_cfg.extra["preprocess"] | {
        "input_size": (tile, tile),
        "scale": recipe.scale,
        "resize_backend": "pil",
        "sliding_window": {"crop": (tile, tile), "stride": (recipe.stride or tile * 2 // 3,) * 2},
    }
    _trained_cfg(model, preprocess=preprocess)
    _start_layer_scales(model)
    return model


def build_detector(recipe: Recipe = DETECT) -> nn.Module:
    """The tiny Mask R-CNN with narrower box and mask heads than torchvision's defaults.

    The heads replace the default ones after construction, not passed to it, so that the
    seeded initialisation draws the same numbers as it did for the shipped bundle.
    """
    model = create_model(
        recipe.variant, num_classes=len(CLASS_NAMES), **recipe.overrides, **DETECT_TRAINING
    )
    channels = model.backbone.out_channels
    resolution = model.roi_heads.box_roi_pool.output_size[0]
    heads = model.roi_heads
    heads.box_head = TwoMLPHead(channels * resolution**2, BOX_HEAD_DIM)
    heads.box_predictor = FastRCNNPredictor(BOX_HEAD_DIM, len(CLASS_NAMES) + 1)
    heads.mask_head = MaskRCNNHeads(channels, list(MASK_HEAD_DIMS), 1)
    heads.mask_predictor = MaskRCNNPredictor(
        MASK_HEAD_DIMS[-1], MASK_HEAD_DIMS[-1], len(CLASS_NAMES) + 1
    )
    min_size, max_size = recipe.overrides["min_size"], recipe.overrides["max_size"]
    preprocess = model.pretrained_cfg.extra["preprocess"] | {
        "input_size": (min_size, max_size),
        "scale": (max_size, min_size),
    }
    _trained_cfg(model, preprocess=preprocess, min_size=min_size, max_size=max_size)
    _start_layer_scales(model)
    return model
