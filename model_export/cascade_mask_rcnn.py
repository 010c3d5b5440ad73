"""HorNet detectors in mmdet's layout: Cascade Mask R-CNN (the eight released COCO
detectors) and Mask R-CNN with FPN or HorFPN (the HorFPN experiments), assembled from
parts as torchvision assembles its detectors: `HorNetFeatures`, the FPN/HorFPN neck, the
RPN head, RoI extractors and box/mask heads of model_export.mmdet_heads.

Module names equal the official configs' (`backbone`, `neck`, `rpn_head`,
`roi_head.bbox_head[.i]`, `roi_head.mask_head[.i]`), so mmdet checkpoints load strictly
(model_export.mmdet_checkpoint). The test-time rules are mmdet 2.28's, and the results
are checked against mmdet itself (tests/crosscheck/test_mmdet_crosscheck.py).

`forward` takes what mmdet's test pipeline makes (the resized, normalised image padded
bottom/right to a multiple of 32, and the unpadded size) and returns per image the
detections in that image's pixels with 28x28 mask probabilities: scaling boxes back to
the original image and pasting masks happen on the host (`mmdet_pipeline`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model_export.horfpn import FPN
from model_export.hornet import HorNetFeatures
from model_export.mmdet_heads import (
    ConvFCBBoxHead,
    FCNMaskHead,
    RoIExtractor,
    RPNHead,
    decode_boxes,
    multiclass_nms,
)

FPN_CHANNELS = 256
# Per-stage DeltaXYWHBBoxCoder target_stds of the cascade (cascade_mask_rcnn_hornet_fpn.py).
CASCADE_STDS = (
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)
MASK_RCNN_STDS = ((0.1, 0.1, 0.2, 0.2),)


class RoIHead(nn.Module):
    """mmdet's StandardRoIHead (one stage) or CascadeRoIHead (several), test mode.

    Stage i scores and regresses the boxes stage i - 1 refined with the deltas of its
    own top class (background excluded); the final scores are the softmax of the
    stages' mean logits, the boxes those of the last stage's class-specific deltas,
    per-class NMS; each detection's mask is the mean over stages of the sigmoid mask of
    its class.
    """

    def __init__(
        self,
        bbox_heads: Sequence[ConvFCBBoxHead],
        mask_heads: Sequence[FCNMaskHead],
        score_threshold: float = 0.05,
        iou_threshold: float = 0.5,
        max_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.bbox_roi_extractor = RoIExtractor(7)
        self.mask_roi_extractor = RoIExtractor(14)
        self.cascade = len(bbox_heads) > 1
        if self.cascade:
            self.bbox_head = nn.ModuleList(bbox_heads)
            self.mask_head = nn.ModuleList(mask_heads)
        else:
            (self.bbox_head,) = bbox_heads
            (self.mask_head,) = mask_heads
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_per_img = max_per_img

    def _stages(self, heads: nn.Module) -> list[nn.Module]:
        return list(heads) if self.cascade else [heads]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        proposals: torch.Tensor,
        image_shape: tuple[int, int] | torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One image's detections from its proposals (K, 4) and pyramid (1, C, H, W)."""
        boxes = proposals
        bbox_heads = self._stages(self.bbox_head)
        logits_sum: torch.Tensor | int = 0
        for i, head in enumerate(bbox_heads):
            logits, deltas = head(self.bbox_roi_extractor(features, boxes))
            logits_sum = logits_sum + logits
            if i < len(bbox_heads) - 1:
                top = logits[:, :-1].argmax(1)
                chosen = deltas[torch.arange(deltas.shape[0]), top]
                boxes = decode_boxes(boxes, chosen, head.target_stds, image_shape)
        scores = torch.softmax(logits_sum / len(bbox_heads), -1)
        candidates = decode_boxes(boxes, deltas, bbox_heads[-1].target_stds, image_shape)
        det_boxes, det_scores, det_labels = multiclass_nms(
            candidates, scores, self.score_threshold, self.iou_threshold, self.max_per_img
        )
        mask_features = self.mask_roi_extractor(features, det_boxes)
        index = torch.arange(det_boxes.shape[0])
        masks: torch.Tensor | int = 0
        mask_heads = self._stages(self.mask_head)
        for head in mask_heads:
            masks = masks + head(mask_features)[index, det_labels].sigmoid()
        return {
            "boxes": det_boxes,
            "scores": det_scores,
            "labels": det_labels,
            "masks": masks / len(mask_heads),
        }


class MMDetHorNetDetector(nn.Module):
    """HorNet + FPN/HorFPN + RPN + RoI head in mmdet's layout, test mode.

    `fusion` None is mmdet's FPN, '7x7'/'gf' the official GNFPN (HorFPN). `cascade`
    builds the released Cascade Mask R-CNN (three ConvFC stages of 4 BN convs and one
    FC), else Mask R-CNN (Shared2FCBBoxHead). `num_classes` counts object classes.
    Other keyword arguments reach `HorNetFeatures` (`base_dim`, `depths`, `gf`,
    `image_size`).
    """

    def __init__(
        self,
        cascade: bool = True,
        num_classes: int = 80,
        fusion: str | None = None,
        fpn_channels: int = FPN_CHANNELS,
        fc_channels: int = 1024,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        self.num_object_classes = num_classes
        self.backbone = HorNetFeatures(**backbone_kwargs)
        self.neck = FPN(self.backbone.out_channels, fpn_channels, fusion=fusion)
        self.rpn_head = RPNHead(fpn_channels, fpn_channels)
        heads = dict(
            num_classes=num_classes,
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            fc_out_channels=fc_channels,
        )
        if cascade:
            bbox_heads = [ConvFCBBoxHead(4, 1, stds, **heads) for stds in CASCADE_STDS]
        else:
            bbox_heads = [ConvFCBBoxHead(0, 2, MASK_RCNN_STDS[0], norm=False, **heads)]
        mask_heads = [FCNMaskHead(4, fpn_channels, fpn_channels, num_classes) for _ in bbox_heads]
        self.roi_head = RoIHead(bbox_heads, mask_heads)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The neck's five maps (strides 4-64) of a padded, normalised batch."""
        return list(self.neck(self.backbone(images)).values())

    def forward(
        self, images: torch.Tensor, image_shapes: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image: `boxes` (D, 4) in resized-image pixels, `scores`,
        `labels` (0..classes-1), `masks` (D, 28, 28) probabilities of the label's mask.

        `images` (B, 3, H, W) are mmdet's test pipeline output (RGB, normalised, padded
        to multiples of 32); `image_shapes` (B, 2) the (height, width) before padding."""
        pyramid = self.features(images)
        results = []
        for b in range(images.shape[0]):
            features = [level[b : b + 1] for level in pyramid]
            image_shape = tuple(int(side) for side in image_shapes[b])
            proposals = self.rpn_head.proposals(features, image_shape)
            results.append(self.roi_head(features, proposals, image_shape))
        return results
