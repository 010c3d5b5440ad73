"""Detection export: torchvision Mask R-CNN, one uint8 [H, W, 3] image per call (the
mmdet-layout detectors: model_export.export.detect_mmdet, which shares the parity here).

The TorchScript exporter (torchvision's tested route: NonMaxSuppression and RoiAlign
symbolics) writes boxes, labels (0..K-1, background removed), scores and pasted mask
probabilities. Feature sizes follow each image, so a fixed-size GF rewrite cannot
serve: with "auto" or "matmul" each global branch becomes `SeparableDFTBranch`, real DFT
matrices built in the graph for the image's size. Detection labels name the object
classes only (torchvision's background class 0 is removed in the graph).

Parity pairs each torch detection with ONNX Runtime's (same label, nearest box and
score): boxes relative to the largest coordinate and scores within the tolerance
(`box_score_error`), 0.5-thresholded masks agreeing on MASK_AGREEMENT of their pixels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hornet_bundle import ONNX_FP32, Manifest, write_manifest
from model_export.export import fields, parity
from model_export.export.onnx_graph import export_torchscript
from model_export.export.options import ExportOptions, ParityImages
from model_export.export.session import ort_session
from model_export.gf_mode import GFMode, check_gf_mode
from model_export.mask_rcnn import HorNetMaskRCNN
from model_export.separable_dft import has_global_filters, use_separable_dft

GF_MODES = (GFMode.AUTO, GFMode.MATMUL)
TOLERANCE = 1e-4
# Pasted masks: pixels whose 0.5-thresholded value must agree. Not a max abs error:
# boxes within TOLERANCE still move pasted mask borders by a pixel here and there.
MASK_AGREEMENT = 0.9999
DEFAULT_OPSET = 17
OUTPUTS = ["boxes", "labels", "scores", "masks"]
DYNAMIC_AXES = {
    "image": {0: "height", 1: "width"},
    "boxes": {0: "detections"},
    "labels": {0: "detections"},
    "scores": {0: "detections"},
    "masks": {0: "detections", 2: "height", 3: "width"},
}


class DetectionGraph(nn.Module):
    """uint8 HWC image -> torchvision Mask R-CNN -> (boxes, labels 0..K-1, scores, masks).

    The detector's transform normalises (mmdet mean/std / 255) and resizes internally;
    boxes and masks come back in input pixels.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.permute(2, 0, 1).float() / 255.0
        out = self.model([x])[0]
        return out["boxes"], out["labels"] - 1, out["scores"], out["masks"]


def match_detections(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray | None:
    """For each torch detection, the index of the same ONNX Runtime detection (same label,
    nearest box and score), or None when the two lists cannot be paired one to one.

    Near-equal scores may be ordered differently by the two runtimes; pairing instead of
    comparing row by row keeps such ties from reading as errors.
    """
    boxes, labels, scores = ref[0], ref[1], ref[2]
    distance = np.abs(boxes[:, None, :] - got[0][None, :, :]).sum(-1) + np.abs(
        scores[:, None] - got[2][None, :]
    )
    distance[labels[:, None] != got[1][None, :]] = np.inf
    order = distance.argmin(1)
    if np.isinf(distance.min(1, initial=0.0)).any() or len(set(order.tolist())) != len(order):
        return None
    return order


def _paired_figures(ref: list[np.ndarray], got: list[np.ndarray], order: np.ndarray) -> dict:
    """One image's figures over its paired detections."""
    box_abs = parity.max_abs_error(ref[0], got[0][order])
    box_rel = parity.max_relative_error(ref[0], got[0][order])
    score_abs = parity.max_abs_error(ref[2], got[2][order])
    masks = got[3][order]
    same = float(((ref[3] > 0.5) == (masks > 0.5)).mean()) if ref[3].size else 1.0
    return {
        "max_abs_error": max(box_abs, score_abs),
        "box_score_error": max(box_rel, score_abs),
        "mask_pixel_agreement": same,
        "mask_max_abs_error": parity.max_abs_error(ref[3], masks),
    }


def _worst(figures: list[dict]) -> dict:
    worst = {"max_abs_error": 0.0, "box_score_error": 0.0, "mask_max_abs_error": 0.0}
    worst = {k: max([v, *(f[k] for f in figures)]) for k, v in worst.items()}
    agreement = min([1.0, *(f["mask_pixel_agreement"] for f in figures)])
    return worst | {"mask_pixel_agreement": agreement}


def detection_parity(graph: nn.Module, path: Path, images: ParityImages, tolerance: float) -> dict:
    """The parity record of the graph at `path` against `graph` (torch) on `images`."""
    session = ort_session(path)
    figures, problems = [], []
    for image in images.images:
        image = torch.as_tensor(image)
        with torch.no_grad():
            ref = [t.numpy() for t in graph(image)]
        got = session.run(None, {"image": image.numpy()})
        where = f"{image.shape[0]}x{image.shape[1]}"
        if ref[0].shape[0] == 0:
            problems.append(f"no detections on {where}")
            continue
        order = match_detections(ref, got) if ref[0].shape == got[0].shape else None
        if order is None:
            problems.append(
                f"{where}: {got[0].shape[0]} ONNX detections do not pair with "
                f"torch's {ref[0].shape[0]} (count or labels differ)"
            )
            continue
        figures.append(_paired_figures(ref, got, order))
    worst = _worst(figures)
    shapes = ", ".join(f"{image.shape[0]}x{image.shape[1]}" for image in images.images)
    inputs = f"{images.description} {shapes}; detections paired by label and box" + (
        f"; {'; '.join(problems)}" if problems else ""
    )
    worst |= {"detections_paired": not problems, "min_mask_pixel_agreement": MASK_AGREEMENT}
    also_passed = not problems and worst["mask_pixel_agreement"] >= MASK_AGREEMENT
    return parity.record(
        path.name, "torch fp32 eager", "box_score_error", tolerance, worst, inputs, also_passed
    )


def noise_images(sizes, seed: int) -> ParityImages:
    """Seeded uniform-noise uint8 images of `sizes` (height, width)."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8) for h, w in sizes]
    return ParityImages(images, "seeded random uint8 images")


def detection_preprocess(cfg, model: nn.Module) -> dict:
    """The config's preprocess with the resize the graph actually does (the model's
    transform: fit (max_size, min_size))."""
    min_size, max_size = model.transform.min_size[0], model.transform.max_size
    return cfg.preprocess() | {"input_size": (min_size, max_size), "scale": (max_size, min_size)}


def export_detection(model: nn.Module, out_dir: str | Path, options: ExportOptions) -> Manifest:
    """Write a detection bundle for `model`: a torchvision-layout HorNetMaskRCNN here, an
    mmdet-layout detector (the released ones) by model_export.export.detect_mmdet.

    The graph is traced on the first of `options.image_sizes` and checked on all of them
    (or on `options.parity_images`). Raises ParityError after writing on failure. fp16
    is refused: the detection graph is exported in fp32 only.
    """
    if not isinstance(model, HorNetMaskRCNN):
        from model_export.export.detect_mmdet import export_mmdet_detection

        return export_mmdet_detection(model, Path(out_dir), options)
    if options.fp16:
        raise ValueError("fp16 detection bundles are not supported; export without fp16")
    check_gf_mode(options.gf_mode, GF_MODES, "detection")
    cfg = fields.task_cfg(model, "detect")
    labels = fields.manifest_labels(cfg, model.num_object_classes, options.labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode = "matmul" if has_global_filters(model) else "none"
    noise = noise_images(options.image_sizes, options.seed)
    graph = DetectionGraph(model).eval()
    exported = graph
    if mode == "matmul":
        options.say("replacing Global Filter FFTs by in-graph DFT matrices (any image size)")
        exported = DetectionGraph(use_separable_dft(copy.deepcopy(model))).eval()
    opset = options.opset or DEFAULT_OPSET
    path = out / ONNX_FP32
    options.say(f"exporting {fields.variant_of(model)} (torchscript, opset {opset}) to {path}")
    export_torchscript(exported, noise.images[0], path, OUTPUTS, DYNAMIC_AXES, opset)
    images = options.parity_images or noise
    options.say(f"checking parity with ONNX Runtime on {len(images.images)} image sizes")
    tolerance = options.tolerance if options.tolerance is not None else TOLERANCE
    record = detection_parity(graph, path, images, tolerance)
    options.say("  " + parity.describe(record))
    common = _manifest_fields(model, options, labels, mode, opset)
    manifest = write_manifest(out, common | {"parity": [record]})
    parity.raise_on_failure([record], out)
    return manifest


def _manifest_fields(model, options: ExportOptions, labels, mode: str, opset: int) -> dict:
    """Every manifest field but the parity record."""
    cfg, variant = model.pretrained_cfg, fields.variant_of(model)
    identity = fields.bundle_identity(
        model,
        options,
        "detect",
        variant,
        lambda variant, _: f"{variant}: Mask R-CNN, one image per call, resized in the graph",
    )
    return identity | {
        "inputs": [fields.image_input([-1, -1, 3], "one RGB image, 0-255, any size")],
        "outputs": fields.detection_outputs(
            "x1, y1, x2, y2 in input pixels",
            {
                "shape": [-1, 1, -1, -1],
                "layout": "NCHW",
                "description": "mask probabilities pasted at image size; 0.5 threshold",
            },
        ),
        "preprocess": detection_preprocess(cfg, model),
        "labels": labels,
        "engines": [fields.onnx_engine(ONNX_FP32, "fp32", mode)],
        "export": fields.export_record(
            {
                "opset": opset,
                "exporter": "torchscript",
                "resize_in_graph": True,
                "min_size": model.transform.min_size[0],
                "max_size": model.transform.max_size,
                "box_score_thresh": model.roi_heads.score_thresh,
                "detections_per_img": model.roi_heads.detections_per_img,
                "class_agnostic_nms": model.class_agnostic_nms,
                "gf_mode": mode,
                "gf_graph": "separable" if mode != "none" else "none",
            },
            options,
        ),
    }
