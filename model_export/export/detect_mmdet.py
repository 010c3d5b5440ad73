"""The mmdet-layout detectors' graph: the network only, the test pipeline on the host.

The served image is fitted to (1333, 800) on the host with OpenCV as mmdet's pipeline
fits it (`hornet_bundle.preprocess.fit_image`), so the engine's work and memory are the
model input's whatever was uploaded. The graph takes that uint8 RGB image (h, w, 3),
normalises it with the config's mean/std, pads it bottom/right with zeros to a multiple
of 32 and runs backbone, neck, RPN and RoI heads with the unpadded (h, w) as the
clipping bound, all read from the input's shape. It answers boxes in the fitted image's
pixels, scores, labels (0..K-1) and one 28x28 mask probability map per detection (the
mean of the stages' sigmoid masks of its class): scaling back to the upload and pasting
each mask onto it, as mmdet's `_do_paste_mask` does, is the host's, one detection at a
time (service.pipelines, model_export.mmdet_pipeline).

Exported by the TorchScript exporter, whose torchvision symbolics write NMS and RoIAlign
(aligned, adaptive sampling) as ONNX ops. The GF layers' spectral filters are resized to
each feature map inside the graph and applied without the DFT op
(`SeparableDFTBranch`: DFT matrices built from the map's size), so one graph serves
every image size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hornet_bundle import ONNX_FP32, Manifest, write_manifest
from hornet_bundle.preprocess import fit_image
from model_export.cascade_mask_rcnn import MMDetHorNetDetector
from model_export.export import fields, parity
from model_export.export.detect import DEFAULT_OPSET, GF_MODES, OUTPUTS, detection_parity
from model_export.export.onnx_graph import export_torchscript
from model_export.export.options import ExportOptions, ParityImages
from model_export.export.precision import PHOTO_NAMES, photographs
from model_export.gf_mode import check_gf_mode
from model_export.mmdet_pipeline import SCALE
from model_export.separable_dft import has_global_filters, use_separable_dft

MASK_SIZE = 28
# box_score_error bound: boxes relative to the image, scores absolute. The (and
# the cross-check's) bound on scores against mmdet itself is 1e-3; ONNX Runtime's
# reordered float sums move the softmax of the stages' mean logits by up to ~3e-4 on
# the HorFPN Mask R-CNN (tiny widths, seeded weights), so the graph is held to that
# same 1e-3, not to the torchvision graph's 1e-4.
TOLERANCE = 1e-3
AXES = {
    "image": {0: "height", 1: "width"},
    "boxes": {0: "detections"},
    "labels": {0: "detections"},
    "scores": {0: "detections"},
    "masks": {0: "detections"},
}


class MMDetDetectionGraph(nn.Module):
    """uint8 (h, w, 3) fitted image -> (boxes, labels, scores, masks (D, 28, 28))."""

    def __init__(self, model: MMDetHorNetDetector, size_divisor: int = 32) -> None:
        super().__init__()
        self.model = model
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.size_divisor = size_divisor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image.permute(2, 0, 1)[None].float() - self.mean) / self.std
        height, width = x.shape[-2], x.shape[-1]
        pad_w = (self.size_divisor - width % self.size_divisor) % self.size_divisor
        pad_h = (self.size_divisor - height % self.size_divisor) % self.size_divisor
        x = F.pad(x, (0, pad_w, 0, pad_h))
        image_shape = (torch.as_tensor(height), torch.as_tensor(width))
        if not torch.jit.is_tracing():
            image_shape = (int(height), int(width))
        features = self.model.features(x)
        proposals = self.model.rpn_head.proposals(features, image_shape)
        out = self.model.roi_head(features, proposals, image_shape)
        return out["boxes"], out["labels"], out["scores"], out["masks"]


def fitted_photographs() -> ParityImages:
    """The scikit-image photographs fitted to (1333, 800) as the service fits uploads."""
    images = [
        torch.from_numpy(fit_image(Image.fromarray(photo), SCALE, "opencv"))
        for photo in photographs()
    ]
    return ParityImages(images, f"scikit-image photographs {', '.join(PHOTO_NAMES)}, fitted")


def export_mmdet_detection(
    model: MMDetHorNetDetector, out: Path, options: ExportOptions
) -> Manifest:
    """Write and verify the bundle of an mmdet-layout detector (see the module's doc)."""
    if options.fp16:
        raise ValueError("fp16 detection bundles are not supported; export without fp16")
    check_gf_mode(options.gf_mode, GF_MODES, "detection")
    cfg = fields.task_cfg(model, "detect")
    labels = fields.manifest_labels(cfg, model.num_object_classes, options.labels)
    out.mkdir(parents=True, exist_ok=True)
    mode = "matmul" if has_global_filters(model) else "none"
    graph = MMDetDetectionGraph(model).eval()
    exported = graph
    if mode == "matmul":
        options.say("replacing Global Filter FFTs by in-graph DFT matrices (any image size)")
        exported = MMDetDetectionGraph(use_separable_dft(copy.deepcopy(model))).eval()
    images = options.parity_images or fitted_photographs()
    opset = options.opset or DEFAULT_OPSET
    path = out / ONNX_FP32
    options.say(f"exporting {fields.variant_of(model)} (torchscript, opset {opset}) to {path}")
    export_torchscript(exported, torch.as_tensor(images.images[0]), path, OUTPUTS, AXES, opset)
    options.say(f"checking parity with ONNX Runtime on {len(images.images)} images")
    tolerance = options.tolerance if options.tolerance is not None else TOLERANCE
    record = detection_parity(graph, path, images, tolerance)
    options.say("  " + parity.describe(record))
    manifest = write_manifest(
        out, _manifest_fields(model, options, labels, mode, opset) | {"parity": [record]}
    )
    parity.raise_on_failure([record], out)
    return manifest


def _manifest_fields(model, options: ExportOptions, labels, mode: str, opset: int) -> dict:
    """Every manifest field but the parity record."""
    cfg = model.pretrained_cfg
    identity = fields.bundle_identity(
        model,
        options,
        "detect",
        fields.variant_of(model),
        lambda variant, _: f"{variant}: mmdet {type(model).__name__} test mode, one image per call",
    )
    return identity | {
        "inputs": [
            fields.image_input(
                [-1, -1, 3], "one RGB image, 0-255, fitted to `scale` on the host (OpenCV)"
            )
        ],
        "outputs": fields.detection_outputs(
            "x1, y1, x2, y2 in the input's pixels",
            {
                "shape": [-1, MASK_SIZE, MASK_SIZE],
                "description": (
                    "per detection, its label's mask probabilities over its box; pasted "
                    "onto the image on the host (mmdet's _do_paste_mask), 0.5 threshold"
                ),
            },
        ),
        "preprocess": cfg.preprocess(),
        "labels": labels,
        "engines": [fields.onnx_engine(ONNX_FP32, "fp32", mode)],
        "export": fields.export_record(
            {
                "opset": opset,
                "exporter": "torchscript",
                "layout": "mmdet",
                "resize_in_graph": False,
                "pad_size_divisor": cfg.extra["pad_size_divisor"],
                "mask_output": "roi",
                "box_score_thresh": model.roi_head.score_threshold,
                "detections_per_img": model.roi_head.max_per_img,
                "gf_mode": mode,
                "gf_graph": "separable" if mode != "none" else "none",
            },
            options,
        ),
    }
