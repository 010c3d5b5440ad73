"""The two compiled mmcv kernels mmdet's test mode needs, on torchvision's ops, added to
the `mmcv._ext` stand-in (mmcv_ext_stub.py) for the detection cross-check.

shared/reference/MMDET_FACTS.md records that these matched mmcv 1.7.2's own CPU kernels
compiled from source: RoIAlign exactly (40 FPN-like cases), NMS the same kept indices in
the same order (200 trials with ties and duplicates). mmcv's Python wrappers
(`nms`, `batched_nms`, `RoIAlign`) run unchanged on top. So in the cross-check mmdet's
RoIAlign and NMS kernels are torchvision's, as ours are: those two kernels are checked by
the FACTS measurement, everything around them by the cross-check.
"""

from __future__ import annotations

import types

import mmcv_ext_stub
import torch
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

AVERAGE_POOL = 1  # mmcv's pool_mode for 'avg'


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int):
    """mmcv's nms kernel: sort by score, descending, then greedy suppression; the kept
    indices into the input, best first."""
    if offset != 0:
        raise NotImplementedError(f"nms offset {offset} (mmdet 2.x uses 0)")
    order = scores.sort(descending=True).indices
    keep = tv_nms(boxes[order], scores[order], float(iou_threshold))
    return order[keep]


def roi_align_forward(
    input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
    spatial_scale, sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    """mmcv's roi_align_forward (average mode), writing into `output`."""
    if pool_mode != AVERAGE_POOL:
        raise NotImplementedError("RoIAlign max pooling (mmdet uses average)")
    pooled = tv_roi_align(
        input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
    )
    output.copy_(pooled)


def install() -> types.ModuleType:
    """Register the stand-in `mmcv._ext` with these two kernels (before mmdet's import)."""
    module = mmcv_ext_stub.install()
    module.nms = nms
    module.roi_align_forward = roi_align_forward
    return module
