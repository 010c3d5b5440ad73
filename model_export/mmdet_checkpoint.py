"""mmdet checkpoints for the mmdet-layout detectors (model_export.cascade_mask_rcnn).

The releases are dicts with the state dict under `state_dict` (keys `backbone.`,
`neck.`, `rpn_head.`, `roi_head.`, exactly the model's names) and a `meta` dict whose
`CLASSES` name the outputs. Loading is strict (model_export.checkpoint): every key of the
model comes from the file, and missing, unexpected or mis-shaped keys are named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from model_export.checkpoint import CheckpointError, checkpoint_filter_fn

TORCHVISION_HEADS = ("roi_heads.", "rpn.head.")


def mmdet_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """mmdet names are the model's: drop `module.` prefixes and resize Global Filters
    (model_export.checkpoint.checkpoint_filter_fn); refuse torchvision-layout files."""
    if any(key.startswith(TORCHVISION_HEADS) for key in state_dict):
        raise CheckpointError(
            "this is a torchvision-layout detector state dict (roi_heads.*, rpn.head.*); "
            f"{type(model).__name__} takes mmdet files (rpn_head.*, roi_head.*): build "
            "one of the torchvision-layout variants (model_export.mask_rcnn) for it"
        )
    return checkpoint_filter_fn(state_dict, model)


def apply_mmdet_meta(model: nn.Module, meta: Mapping, source: str) -> None:
    """meta['CLASSES'], when the file has it, becomes the model's label names
    (`pretrained_cfg.extra['labels']`, which the export writes into the manifest);
    without it the variant's label set (COCO's 80, from torchvision's metadata) stays."""
    classes = meta.get("CLASSES")
    if classes is None:
        return
    if isinstance(classes, str) or len(classes) != model.num_object_classes:
        raise CheckpointError(
            f"{source}: meta['CLASSES'] names {len(classes)} classes but the model "
            f"predicts {model.num_object_classes}: {list(classes)[:5]}..."
        )
    cfg = model.pretrained_cfg
    extra = cfg.extra | {"labels": [str(name) for name in classes]}
    model.pretrained_cfg = dataclasses.replace(cfg, label_set=None, extra=extra)
