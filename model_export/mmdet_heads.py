"""mmdet 2.x's two-stage detection parts in its test mode, written on torchvision's ops.

The released HorNet detectors (Cascade Mask R-CNN, HorFPN Mask R-CNN) were trained with
mmdet 2.x, so their heads and test-time rules are mmdet's and are checked against mmdet
itself (tests/crosscheck). Parameter names equal mmdet's so its state dicts load as they
are. Names appear in reading order: anchors, the delta coder, the RPN head and its
proposal step, RoI-to-level mapping and RoI feature extraction, the box and mask heads,
and the per-class NMS of the final detections.

Conventions (mmdet 2.x): boxes are (x1, y1, x2, y2) in pixels of the resized image,
width = x2 - x1 (no +1); `image_shape` is the (height, width) of the resized image
before padding, the box clipping bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import _topk_min
from torchvision.ops import batched_nms, roi_align

from model_export.horfpn import ConvModule

ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_SCALES = (8,)
# DeltaXYWHBBoxCoder's default bound on |log(w'/w)|: boxes grow or shrink at most 62.5x.
WH_RATIO_CLIP = 16 / 1000
FINEST_SCALE = 56
ROI_STRIDES = (4, 8, 16, 32)


class AnchorGenerator:
    """mmdet's AnchorGenerator with center offset 0: per level, `len(ratios) *
    len(scales)` anchors centred on each feature cell's top-left pixel `(x * s, y * s)`,
    of width `s * scale / sqrt(ratio)` and height `s * scale * sqrt(ratio)`, ordered
    (row, column, anchor) like the heads' outputs after permuting to channels-last."""

    def __init__(
        self,
        strides: Sequence[int] = ANCHOR_STRIDES,
        ratios: Sequence[float] = ANCHOR_RATIOS,
        scales: Sequence[float] = ANCHOR_SCALES,
    ) -> None:
        self.strides = tuple(strides)
        self.ratios = tuple(ratios)
        self.scales = tuple(scales)

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    def base_anchors(self, stride: int) -> torch.Tensor:
        """(A, 4) anchors around (0, 0): ratio-major, then scale."""
        h_ratios = torch.sqrt(torch.tensor(self.ratios))
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales, dtype=torch.float32)
        widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], -1)

    def grid_anchors(self, level: int, height: int, width: int) -> torch.Tensor:
        """(height * width * A, 4) anchors of a `height` x `width` map of level `level`."""
        stride = self.strides[level]
        shift_x = torch.arange(width, dtype=torch.float32) * stride
        shift_y = torch.arange(height, dtype=torch.float32) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
        return (shifts + self.base_anchors(stride)[None]).reshape(-1, 4)


def encode_boxes(
    boxes: torch.Tensor, targets: torch.Tensor, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.encode: the deltas that move `boxes` onto `targets` (both
    (..., 4)), divided by `stds` (means are zero in every released config)."""
    pxy, pwh = (boxes[..., :2] + boxes[..., 2:]) * 0.5, boxes[..., 2:] - boxes[..., :2]
    gxy, gwh = (targets[..., :2] + targets[..., 2:]) * 0.5, targets[..., 2:] - targets[..., :2]
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], -1)
    return deltas / deltas.new_tensor(stds)


def decode_boxes(
    boxes: torch.Tensor,
    deltas: torch.Tensor,
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    image_shape: tuple[int, int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.decode: shift and scale `boxes` (N, 4) by `deltas` (N, 4) or
    (N, C, 4) times `stds`; log-size deltas are clamped to |log(16/1000)|; results are
    clipped to `image_shape` (height, width) when given."""
    deltas = deltas * deltas.new_tensor(stds)
    if deltas.dim() == 3:
        boxes = boxes[:, None, :]
    pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
    pwh = boxes[..., 2:] - boxes[..., :2]
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dwh = deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + pwh * deltas[..., :2]
    gwh = pwh * dwh.exp()
    out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], -1)
    if image_shape is None:
        return out
    height, width = image_shape[0], image_shape[1]
    if isinstance(width, torch.Tensor):  # a traced graph's size, read from its input
        x = torch.minimum(out[..., 0::2].clamp(min=0), width.to(out.dtype))
        y = torch.minimum(out[..., 1::2].clamp(min=0), height.to(out.dtype))
    else:
        x = out[..., 0::2].clamp(min=0, max=width)
        y = out[..., 1::2].clamp(min=0, max=height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


class RPNHead(nn.Module):
    """mmdet's RPNHead (sigmoid objectness): a shared 3x3 conv + ReLU, then per anchor
    one objectness logit (`rpn_cls`) and four deltas (`rpn_reg`)."""

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        anchors: AnchorGenerator | None = None,
        nms_pre: int = 1000,
        max_per_img: int = 1000,
        iou_threshold: float = 0.7,
    ) -> None:
        super().__init__()
        self.anchors = anchors or AnchorGenerator()
        num_anchors = self.anchors.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.nms_pre = nms_pre
        self.max_per_img = max_per_img
        self.iou_threshold = iou_threshold

    def forward_level(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def proposals(
        self, features: Sequence[torch.Tensor], image_shape: tuple[int, int] | torch.Tensor
    ) -> torch.Tensor:
        """One image's proposals (K, 4), best first: per level the `nms_pre` highest
        objectness scores, decoded and clipped, empty boxes dropped (min_bbox_size 0),
        NMS per level at `iou_threshold`, the best `max_per_img` overall.

        `features` are the pyramid maps of one image (1, C, H, W)."""
        scores, boxes, levels = [], [], []
        for level, feature in enumerate(features):
            logits, deltas = self.forward_level(feature)
            height, width = feature.shape[-2:]
            level_scores = logits[0].permute(1, 2, 0).reshape(-1).sigmoid()
            level_deltas = deltas[0].permute(1, 2, 0).reshape(-1, 4)
            anchors = self.anchors.grid_anchors(level, height, width).to(feature.device)
            # torchvision's min(k, n) that stays dynamic in a traced graph
            keep = _topk_min(level_scores, self.nms_pre, 0)
            level_scores, order = level_scores.topk(keep)
            scores.append(level_scores)
            boxes.append(decode_boxes(anchors[order], level_deltas[order], image_shape=image_shape))
            levels.append(torch.full_like(order, level))
        scores, boxes, levels = torch.cat(scores), torch.cat(boxes), torch.cat(levels)
        valid = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        scores, boxes, levels = scores[valid], boxes[valid], levels[valid]
        keep = batched_nms(boxes, scores, levels, self.iou_threshold)[: self.max_per_img]
        return boxes[keep]


def roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: int = FINEST_SCALE):
    """mmdet's SingleRoIExtractor.map_roi_levels: a box of scale sqrt(w * h) reads level
    floor(log2(scale / finest_scale + 1e-6)), clamped to [0, num_levels - 1] (so below
    112 px level 0, 112-224 level 1, 224-448 level 2, above level 3)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIExtractor(nn.Module):
    """mmdet's SingleRoIExtractor over mmcv's RoIAlign (average pooling, `aligned=True`,
    sampling ratio 0 = adaptive), computed by torchvision's `roi_align`: each box is
    pooled from the one level `roi_levels` assigns it."""

    def __init__(
        self,
        output_size: int,
        strides: Sequence[int] = ROI_STRIDES,
        finest_scale: int = FINEST_SCALE,
        sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.strides = tuple(strides)
        self.finest_scale = finest_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, features: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """Features (K, C, s, s) of one image's `boxes` (K, 4) from its maps (1, C, H, W)."""
        features = features[: len(self.strides)]
        levels = roi_levels(boxes, len(features), self.finest_scale)
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], 1)
        size = self.output_size
        out = features[0].new_zeros(boxes.shape[0], features[0].shape[1], size, size)
        for level, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(
                feature,
                rois[index],
                size,
                spatial_scale=1 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            out = out.index_put((index,), pooled)
        return out


class ConvFCBBoxHead(nn.Module):
    """mmdet's ConvFCBBoxHead with shared layers only: `num_shared_convs` 3x3
    ConvModules (BatchNorm when `norm`, ReLU), flatten, `num_shared_fcs` Linear + ReLU,
    then `fc_cls` (classes + background, last) and class-specific `fc_reg` (4 per class).

    The cascade's heads are (4 convs with BN, 1 FC); Mask R-CNN's Shared2FCBBoxHead is
    (0, 2). `target_stds` scale the regression deltas of this stage."""

    def __init__(
        self,
        num_shared_convs: int,
        num_shared_fcs: int,
        target_stds: Sequence[float],
        num_classes: int = 80,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        fc_out_channels: int = 1024,
        roi_feat_size: int = 7,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.target_stds = tuple(target_stds)
        self.shared_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, norm)
            for i in range(num_shared_convs)
        )
        channels = conv_out_channels if num_shared_convs else in_channels
        width = channels * roi_feat_size**2
        self.shared_fcs = nn.ModuleList(
            nn.Linear(width if i == 0 else fc_out_channels, fc_out_channels)
            for i in range(num_shared_fcs)
        )
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (K, classes + 1) and deltas (K, classes, 4)."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x).reshape(x.shape[0], self.num_classes, 4)


class FCNMaskHead(nn.Module):
    """mmdet's FCNMaskHead: `num_convs` 3x3 ConvModules + ReLU (no norm), a 2x2 stride-2
    transposed conv `upsample` + ReLU, a 1x1 `conv_logits` with one mask per class
    (14x14 RoI features -> 28x28 logits)."""

    def __init__(
        self,
        num_convs: int = 4,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_classes: int = 80,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, False)
            for i in range(num_convs)
        )
        self.upsample = nn.ConvTranspose2d(conv_out_channels, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_per_img: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's multiclass_nms: every (box, class) pair scoring above `score_threshold`
    (background, the last column, excluded), NMS per class, the best `max_per_img`.

    `boxes` (K, C, 4), `scores` (K, C + 1). Returns boxes (D, 4), scores (D,), labels (D,)
    best first."""
    num_classes = scores.shape[1] - 1
    scores = scores[:, :num_classes].reshape(-1)
    boxes = boxes.reshape(-1, 4)
    labels = torch.arange(num_classes, device=scores.device)
    labels = labels[None, :].expand(boxes.shape[0] // num_classes, num_classes).reshape(-1)
    index = torch.nonzero(scores > score_threshold).squeeze(1)
    boxes, scores, labels = boxes[index], scores[index], labels[index]
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_per_img]
    return boxes[keep], scores[keep], labels[keep]
