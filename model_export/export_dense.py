"""Export of the dense models to verified ONNX bundles (docs/bundle-format.md).

- Segmentation: one fixed-size tile graph, uint8 NHWC [-1, crop, crop, 3] in (normalised
  inside), logits [-1, classes, crop, crop] out, resized to the tile as mmseg's
  `encode_decode` does. The manifest carries the sliding-window settings; the service
  tiles, averages and takes the argmax.
- Detection: torchvision Mask R-CNN through the TorchScript exporter (torchvision's
  tested route: NonMaxSuppression and RoiAlign symbolics), uint8 [H, W, 3] in; boxes,
  labels (0..79, background removed), scores and pasted mask probabilities out.

Global Filters: when `model_export.gf_rewrite` is present its DFT-free rewrite is used;
otherwise the dynamo exporter lowers rfft2/irfft2 to the ONNX DFT op (slow on ONNX
Runtime CPU, TensorRT >= 11.2 only; EXPORT_FACTS.md). The TorchScript exporter cannot
export FFTs, so GF detection models need the rewrite.

Every bundle is checked with ONNX Runtime against the torch model on seeded inputs and
the result is recorded under `parity`; a failed check raises after the bundle is written.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_export.bundle import write_manifest
from model_export.checkpoint import file_sha256
from model_export.gnconv import GlobalLocalFilter
from model_export.labels import labels_for
from service.manifest import Manifest

MODEL_FILE = "model.onnx"
GF_REWRITE_MODULE = "model_export.gf_rewrite"
SEG_TOLERANCE = 1e-5
DETECTION_TOLERANCE = 1e-4
MASK_TOLERANCE = 1e-3
MAX_BATCH = 64


class ParityError(AssertionError):
    """The exported graph disagrees with the torch model beyond the tolerance."""


class SegmentationTileGraph(nn.Module):
    """uint8 NHWC tiles -> normalised NCHW -> the segmentor's tile-sized logits."""

    def __init__(self, model: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std)


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


def has_global_filters(model: nn.Module) -> bool:
    return any(isinstance(m, GlobalLocalFilter) for m in model.modules())


def _gf_rewrite():
    """The lead's DFT-free GF rewrite module, or None while it does not exist."""
    if importlib.util.find_spec(GF_REWRITE_MODULE) is None:
        return None
    return importlib.import_module(GF_REWRITE_MODULE)


def _weights(model: nn.Module, checkpoint: str | PathLike | None) -> dict:
    if checkpoint is None:
        return {"random": True}
    return {
        "random": False,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": file_sha256(checkpoint),
    }


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    max_abs = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))
    scale = float(np.abs(ref).max(initial=0.0))
    return max_abs, max_abs / scale if scale > 0 else max_abs


def _cfg(model: nn.Module):
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        raise ValueError("model has no pretrained_cfg; build it with model_export.create_model")
    return cfg


def _tile_preprocess(cfg, tile: int) -> dict:
    """The variant's mmseg preprocess at the exported tile size; a tile other than the
    variant's keeps the stride's ratio to the crop (341/512)."""
    pre = cfg.preprocess()
    window = pre["sliding_window"]
    crop = window["crop"][0]
    stride = window["stride"][0] if tile == crop else max(1, int(window["stride"][0] * tile / crop))
    return pre | {"input_size": (tile, tile),
                  "sliding_window": {"crop": (tile, tile), "stride": (stride, stride)}}


def _export_segmentation_graph(
    graph: nn.Module, example: torch.Tensor, path: Path, opset: int, use_dynamo: bool
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_dynamo:
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                graph, (example,), dynamo=True, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_shapes={"image": {0: batch}}, optimize=True, verbose=False,
            )
            program.save(str(path))
            return
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_segmentation_bundle(
    model: nn.Module,
    out_dir: str | PathLike,
    opset: int = 18,
    name: str | None = None,
    checkpoint: str | PathLike | None = None,
    parity_batch: int = 2,
    seed: int = 0,
    tolerance: float = SEG_TOLERANCE,
) -> Manifest:
    """Write a segmentation bundle for `model` (a create_model segmentor) at its tile size.

    Raises ParityError (after writing the bundle and its parity record) when ONNX
    Runtime's logits differ from torch's by more than `tolerance` (relative).
    """
    cfg = _cfg(model)
    tile = cfg.image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    gf = has_global_filters(model)
    rewrite = _gf_rewrite() if gf else None
    gen = torch.Generator().manual_seed(seed)
    example = torch.randint(0, 256, (parity_batch, tile, tile, 3), generator=gen, dtype=torch.uint8)
    graph = SegmentationTileGraph(model, cfg.mean, cfg.std).eval()
    with torch.no_grad():
        reference = graph(example).numpy()
    gf_mode = "dft" if gf else "none"
    if rewrite is not None:
        normalised = (example.permute(0, 3, 1, 2).float() - graph.mean) / graph.std
        exported = copy.deepcopy(model)
        graph.model = rewrite.rewrite_global_filters(exported, example_input=normalised) or exported
        gf_mode = getattr(rewrite, "GF_MODE", "matmul")
    use_dynamo = gf and rewrite is None
    _export_segmentation_graph(graph, example, out_dir / MODEL_FILE, opset, use_dynamo)

    got = _session(out_dir / MODEL_FILE).run(None, {"image": example.numpy()})[0]
    max_abs, rel = _errors(reference, got)
    top1 = float((reference.argmax(1) == got.argmax(1)).mean())
    parity = {
        "engine": MODEL_FILE, "reference": "torch fp32 eager", "max_abs_error": max_abs,
        "relative_error": rel, "top1_agreement": top1, "tolerance": tolerance,
        "passed": rel < tolerance,
        "inputs": f"{parity_batch} seeded random uint8 tiles {tile}x{tile} (seed {seed})",
    }
    classes = cfg.num_classes
    manifest = write_manifest(out_dir, {
        "name": name or model.variant,
        "variant": model.variant,
        "task": "segment",
        "description": f"{model.variant}: one {tile}x{tile} sliding-window tile per batch row",
        "weights": _weights(model, checkpoint),
        "inputs": [{"name": "image", "dtype": "uint8", "layout": "NHWC",
                    "shape": [-1, tile, tile, 3], "description": "RGB tiles, 0-255"}],
        "outputs": [{"name": "logits", "dtype": "float32", "layout": "NCHW",
                     "shape": [-1, classes, tile, tile],
                     "description": "class logits resized to the tile (bilinear)"}],
        "preprocess": _tile_preprocess(cfg, tile),
        "labels": labels_for(cfg.label_set, classes),
        "engines": [{"format": "onnx", "precision": "fp32", "file": MODEL_FILE,
                     "gf_mode": gf_mode}],
        "export": {"opset": opset, "exporter": "dynamo" if use_dynamo else "torchscript",
                   "image_size": tile, "gf_mode": gf_mode, "batch": "dynamic",
                   "max_batch": MAX_BATCH, "align_corners": False},
        "parity": [parity],
    })
    if not parity["passed"]:
        raise ParityError(f"{out_dir / MODEL_FILE}: relative error {rel:.3g} >= {tolerance:g}")
    return manifest


def _match_detections(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray | None:
    """For each torch detection, the index of the same ONNX Runtime detection (same label,
    nearest box and score), or None when the two lists cannot be paired one to one.

    Near-equal scores may be ordered differently by the two runtimes; pairing instead of
    comparing row by row keeps such ties from reading as errors.
    """
    boxes, labels, scores = ref[0], ref[1], ref[2]
    distance = (np.abs(boxes[:, None, :] - got[0][None, :, :]).sum(-1)
                + np.abs(scores[:, None] - got[2][None, :]))
    distance[labels[:, None] != got[1][None, :]] = np.inf
    order = distance.argmin(1)
    if np.isinf(distance.min(1, initial=0.0)).any() or len(set(order.tolist())) != len(order):
        return None
    return order


def _detection_parity(
    graph: nn.Module, path: Path, images: list[torch.Tensor], tolerance: float
) -> dict:
    session = _session(path)
    worst_abs, worst_rel, worst_mask, problems = 0.0, 0.0, 0.0, []
    for image in images:
        with torch.no_grad():
            ref = [t.numpy() for t in graph(image)]
        got = session.run(None, {"image": image.numpy()})
        where = f"{image.shape[0]}x{image.shape[1]}"
        if ref[0].shape[0] == 0:
            problems.append(f"no detections on {where}")
        order = _match_detections(ref, got) if ref[0].shape == got[0].shape else None
        if order is None:
            problems.append(f"{where}: {got[0].shape[0]} ONNX detections do not pair with "
                            f"torch's {ref[0].shape[0]} (count or labels differ)")
            continue
        box_abs, box_rel = _errors(ref[0], got[0][order])
        score_abs, _ = _errors(ref[2], got[2][order])
        mask_abs, _ = _errors(ref[3], got[3][order])
        worst_abs = max(worst_abs, box_abs, score_abs)
        worst_rel = max(worst_rel, box_rel, score_abs)
        worst_mask = max(worst_mask, mask_abs)
    passed = not problems and worst_rel < tolerance and worst_mask < MASK_TOLERANCE
    shapes = ", ".join("x".join(map(str, i.shape[:2])) for i in images)
    return {
        "engine": path.name, "reference": "torch fp32 eager", "max_abs_error": worst_abs,
        "relative_error": worst_rel, "top1_agreement": 0.0 if problems else 1.0,
        "tolerance": tolerance, "passed": passed,
        "inputs": (f"seeded random uint8 images {shapes}; detections paired by label and box; "
                   f"relative_error = max(box error / largest coordinate, score error); "
                   f"mask probability max abs error {worst_mask:.3g} (limit {MASK_TOLERANCE:g}); "
                   f"top1_agreement = all labels paired")
                  + (f"; {'; '.join(problems)}" if problems else ""),
    }


def export_detection_bundle(
    model: nn.Module,
    out_dir: str | PathLike,
    opset: int = 17,
    name: str | None = None,
    checkpoint: str | PathLike | None = None,
    image_sizes: tuple[tuple[int, int], ...] = ((480, 640), (400, 320)),
    seed: int = 0,
    tolerance: float = DETECTION_TOLERANCE,
) -> Manifest:
    """Write a detection bundle for `model` (a create_model HorNetMaskRCNN).

    The graph is traced on the first of `image_sizes` and checked on all of them with
    ONNX Runtime: the same number of detections, paired one to one with equal labels,
    boxes (relative to the largest coordinate) and scores within `tolerance`, mask
    probabilities within MASK_TOLERANCE. Raises ParityError after writing on failure.
    """
    cfg = _cfg(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    gf = has_global_filters(model)
    if gf:
        rewrite = _gf_rewrite()
        if rewrite is None:
            raise NotImplementedError(
                f"{model.variant} has Global Filters: the TorchScript exporter (the only one "
                f"that exports torchvision's Mask R-CNN) cannot export FFTs, and "
                f"{GF_REWRITE_MODULE} (the DFT-free rewrite) is not available"
            )
        raise NotImplementedError(
            "GF detection export with the DFT-free rewrite needs per-image feature sizes; "
            "detection inputs vary in size, so it is not wired up yet"
        )
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
              for h, w in image_sizes]
    graph = DetectionGraph(model).eval()
    outputs = ["boxes", "labels", "scores", "masks"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (images[0],), str(out_dir / MODEL_FILE), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=outputs,
            dynamic_axes={"image": {0: "height", 1: "width"}, "boxes": {0: "detections"},
                          "labels": {0: "detections"}, "scores": {0: "detections"},
                          "masks": {0: "detections", 2: "height", 3: "width"}},
        )
    parity = _detection_parity(graph, out_dir / MODEL_FILE, images, tolerance)
    labels = labels_for(cfg.label_set, cfg.num_classes)
    manifest = write_manifest(out_dir, {
        "name": name or model.variant,
        "variant": model.variant,
        "task": "detect",
        "description": f"{model.variant}: Mask R-CNN, one image per call, resized in the graph",
        "weights": _weights(model, checkpoint),
        "inputs": [{"name": "image", "dtype": "uint8", "layout": "NHWC", "shape": [-1, -1, 3],
                    "description": "one RGB image, 0-255, any size"}],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": [-1, 4],
             "description": "x1, y1, x2, y2 in input pixels"},
            {"name": "labels", "dtype": "int64", "shape": [-1],
             "description": "index into labels"},
            {"name": "scores", "dtype": "float32", "shape": [-1]},
            {"name": "masks", "dtype": "float32", "shape": [-1, 1, -1, -1], "layout": "NCHW",
             "description": "mask probabilities pasted at image size; 0.5 threshold"},
        ],
        "preprocess": cfg.preprocess(),
        "labels": labels,
        "engines": [{"format": "onnx", "precision": "fp32", "file": MODEL_FILE,
                     "gf_mode": "none"}],
        "export": {"opset": opset, "exporter": "torchscript", "resize_in_graph": True,
                   "min_size": model.transform.min_size[0], "max_size": model.transform.max_size,
                   "box_score_thresh": model.roi_heads.score_thresh,
                   "detections_per_img": model.roi_heads.detections_per_img,
                   "gf_mode": "none"},
        "parity": [parity],
    })
    if not parity["passed"]:
        raise ParityError(
            f"{out_dir / MODEL_FILE}: relative error {parity['relative_error']:.3g} "
            f"(limit {tolerance:g}); {parity['inputs']}"
        )
    return manifest
