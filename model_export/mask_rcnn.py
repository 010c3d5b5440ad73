"""Mask R-CNN with a HorNet + FPN (plain or HorFPN) backbone, assembled from torchvision.

The HorNet feature pyramid is a torchvision backbone-with-FPN (`out_channels`, an
OrderedDict of maps); torchvision supplies the transform, RPN, RoIAlign, NMS and the box
and mask heads. Its test settings equal mmdet's Mask R-CNN config (RPN 1000/1000 boxes,
NMS 0.7; score 0.05, NMS 0.5, 100 detections; anchors 32-512 x ratios 0.5/1/2; resize to
fit (1333, 800), pad to 32).

Weights: the mmdet releases name the backbone and neck `backbone.*` / `neck.*`, which
`load_backbone_and_neck` loads strictly into `backbone.backbone.*` / `backbone.neck.*`.
mmdet's RPN and RoI heads are laid out differently from torchvision's and are not
mapped: after that load they keep their initialisation, so such a model is not the
released detector until its heads are trained or converted.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping
from os import PathLike

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import nms

from model_export.checkpoint import (
    CheckpointError,
    checkpoint_filter_fn,
    load_state_dict_strict,
    read_checkpoint,
)
from model_export.horfpn import FPN
from model_export.hornet import HorNetFeatures

MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
FPN_CHANNELS = 256
MMDET_PARTS = {"backbone.": "backbone.backbone.", "neck.": "backbone.neck."}
MMDET_HEADS = ("rpn_head.", "roi_head.")
# torchvision's MaskRCNN keyword arguments (its own and the FasterRCNN ones it passes on)
# that HorNetMaskRCNN forwards; the backbone, class count and normalisation are its own.
TORCHVISION_OPTIONS = frozenset(
    name
    for cls in (MaskRCNN, FasterRCNN)
    for name, parameter in inspect.signature(cls.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
) - {"self", "backbone", "num_classes", "image_mean", "image_std"}


class HorNetFPNBackbone(nn.Module):
    """HorNet's four normed stage outputs through an FPN: maps '0'..'3' (strides 4-32)
    and 'pool' (stride 64), each `out_channels` wide."""

    def __init__(
        self, fusion: str | None = None, out_channels: int = FPN_CHANNELS, **backbone_kwargs
    ) -> None:
        super().__init__()
        self.backbone = HorNetFeatures(**backbone_kwargs)
        self.neck = FPN(self.backbone.out_channels, out_channels, fusion=fusion)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.neck(self.backbone(x))


class HorNetMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN over `HorNetFPNBackbone`.

    Takes a list of float RGB CHW images in [0, 1] (torchvision's convention; the
    transform normalises with mmdet's mean/std / 255). `num_classes` counts the object
    classes (80 for COCO); torchvision's heads add the background class 0. Keyword
    arguments named in `TORCHVISION_OPTIONS` (rpn_pre_nms_top_n_train,
    box_batch_size_per_image, box_detections_per_img, ...) go to torchvision's
    MaskRCNN, the others to the HorNet backbone.

    `class_agnostic_nms`: after torchvision's per-class NMS, a second NMS over all
    classes at the same IoU threshold keeps the best-scoring of overlapping detections
    whatever their labels (mmdet's `nms=dict(class_agnostic=True)`): for objects that
    never overlap, one object is one detection, not one per class the head hesitates
    between. Off by default (COCO's objects overlap).
    """

    def __init__(
        self,
        num_classes: int = 80,
        fusion: str | None = None,
        fpn_channels: int = FPN_CHANNELS,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        class_agnostic_nms: bool = False,
        **kwargs,
    ) -> None:
        detector = {k: v for k, v in kwargs.items() if k in TORCHVISION_OPTIONS}
        backbone_kwargs = {k: v for k, v in kwargs.items() if k not in TORCHVISION_OPTIONS}
        backbone = HorNetFPNBackbone(fusion=fusion, out_channels=fpn_channels, **backbone_kwargs)
        super().__init__(
            backbone,
            num_classes=num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            image_mean=[m / 255 for m in MMDET_MEAN],
            image_std=[s / 255 for s in MMDET_STD],
            box_score_thresh=box_score_thresh,
            **detector,
        )
        self.num_object_classes = num_classes
        self.class_agnostic_nms = class_agnostic_nms

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if self.training or not self.class_agnostic_nms:
            return out
        threshold = self.roi_heads.nms_thresh
        # Detections come sorted by score, so keep indices stay in that order.
        return [
            {key: value[keep] for key, value in detections.items()}
            for detections in out
            for keep in [nms(detections["boxes"], detections["scores"], threshold)]
        ]

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
        """Accept this model's own (torchvision-layout) state dicts; refuse mmdet files
        with the way to load their backbone and neck."""
        if any(k.startswith(MMDET_HEADS + ("neck.",)) for k in state_dict):
            raise CheckpointError(
                "this is an mmdet Mask R-CNN state dict: its rpn_head/roi_head layout differs "
                "from torchvision's and cannot load strictly; use "
                "model_export.mask_rcnn.load_backbone_and_neck(model, path) to load its "
                "backbone and neck (heads stay at their initialisation)"
            )
        return checkpoint_filter_fn(state_dict, model)


def mmdet_backbone_and_neck(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `backbone.*` and `neck.*` entries of an mmdet state dict under this model's
    names (`backbone.backbone.*`, `backbone.neck.*`)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for prefix, target in MMDET_PARTS.items():
            if key.startswith(prefix):
                out[target + key.removeprefix(prefix)] = value
    return out


def load_backbone_and_neck(model: HorNetMaskRCNN, path: str | PathLike) -> list[str]:
    """Load an mmdet Mask R-CNN file's backbone and neck strictly (every key of
    `model.backbone` present, nothing extra, shapes equal; Global Filters resized).

    Returns the model's keys left at their initialisation (the RPN and RoI heads).
    """
    found = mmdet_backbone_and_neck(read_checkpoint(path))
    if not found:
        raise CheckpointError(f"{path} has no 'backbone.' or 'neck.' keys; not an mmdet detector")
    part = model.backbone
    local = {k.removeprefix("backbone."): v for k, v in found.items()}
    local = checkpoint_filter_fn(local, part)
    load_state_dict_strict(part, local, source=f"{path} (backbone + neck)")
    return sorted(k for k in model.state_dict() if not k.startswith("backbone."))
