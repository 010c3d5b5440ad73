"""Export of the dense models to verified ONNX bundles (docs/bundle-format.md).

- Segmentation: one fixed-size tile graph, uint8 NHWC [-1, crop, crop, 3] in (normalised
  inside), logits [-1, classes, crop, crop] out, resized to the tile as mmseg's
  `encode_decode` does. The manifest carries the sliding-window settings; the service
  tiles, averages and takes the argmax. `fp16=True` adds `model_fp16.onnx` (float32
  inputs/outputs, the hand-written layer norms kept in float32).
- Detection: torchvision Mask R-CNN through the TorchScript exporter (torchvision's
  tested route: NonMaxSuppression and RoiAlign symbolics), uint8 [H, W, 3] in; boxes,
  labels (0..K-1, background removed), scores and pasted mask probabilities out.

Global Filters (`gf_mode`):
- segmentation: "auto", "matmul", "dense_dft" and "circular_conv" are
  `model_export.gf_rewrite`'s DFT-free graphs for the tile's fixed feature sizes
  ("auto" picks per layer; without that module "auto" falls back to `SeparableDFTBranch`
  below). "dft" keeps rfft2/irfft2 and lowers them to the ONNX DFT op with the dynamo
  exporter (slow on ONNX Runtime CPU, TensorRT >= 11.2 only; EXPORT_FACTS.md). On ONNX
  Runtime CPU (2 threads) the separable DFT ran HorFPN's 128x128 GF layer in 1.1 s,
  the circular conv in 7.8 s.
- detection, "auto" or "matmul": feature sizes follow each image, so a fixed-size
  rewrite cannot serve; each global branch becomes `SeparableDFTBranch`, real DFT
  matrices built in the graph for the image's size (MatMul, Cos, Sin; no DFT op).

Labels: the manifest lists one name per output class, taken from (first that applies)
the `labels` argument, `model.pretrained_cfg.extra["labels"]`, or the variant's label
set (ADE20K, COCO); a model built with another `num_classes` and no labels gets
`class0..`. A caller with its own classes passes them at export:

    model = create_model("upernet_hornet_tiny_7x7", num_classes=4, image_size=128,
                         base_dim=16, depths=(1, 1, 1, 1), channels=32)
    export_segmentation_bundle(model, "bundles/shapes_seg",
                               labels=["background", "circle", "square", "triangle"])

or stores them on the model so any exporter finds them:
`model.pretrained_cfg = dataclasses.replace(cfg, extra=cfg.extra | {"labels": [...]})`.
Segmentation labels name every logit channel (background included when the model has
one); detection labels name the object classes only (torchvision's background class 0
is removed in the graph), so a 3-class detector takes 3 names.

Every bundle is checked with ONNX Runtime against the torch model on seeded inputs and
the result is recorded under `parity`; a failed check raises after the bundle is written.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.bundle import write_manifest
from model_export.checkpoint import file_sha256, load_checkpoint
from model_export.gnconv import GlobalLocalFilter, fuse_layer_norms
from model_export.labels import labels_for
from service.manifest import Manifest

MODEL_FILE = "model.onnx"
MODEL_FP16_FILE = "model_fp16.onnx"
GF_REWRITE_MODULE = "model_export.gf_rewrite"
REWRITE_GF_MODES = ("auto", "matmul", "dense_dft", "circular_conv")
SEG_GF_MODES = (*REWRITE_GF_MODES, "dft")
DETECTION_GF_MODES = ("auto", "matmul")
# The manifest's Engine.gf_mode of each graph: the DFT as MatMuls is "matmul".
ENGINE_GF_MODES = {"auto": "matmul", "dense_dft": "matmul", "separable": "matmul"}
SEG_TOLERANCE = 1e-5
SEG_FP16_TOLERANCE = 2e-2
DETECTION_TOLERANCE = 1e-4
# Pasted masks: pixels whose 0.5-thresholded value must agree. Not a max abs error:
# boxes within DETECTION_TOLERANCE still move pasted mask borders by a pixel here and there.
MASK_AGREEMENT = 0.9999
MAX_BATCH = 64
# Kept in float32 in the fp16 graph: the hand-written channels-first layer norms
# (ReduceMean/Pow/Sqrt overflow in fp16, EXPORT_FACTS.md) and the DFT op.
FP16_KEEP_FP32_OPS = ("ReduceMean", "Pow", "Sqrt", "DFT")

Progress = Callable[[str], None] | None


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


def _dft_cos_sin(length: torch.Tensor | int, freqs: torch.Tensor | int, device) -> tuple:
    """cos and sin of 2*pi*n*k/length for n < length, k < freqs, shape (length, freqs).

    n*k is reduced modulo length in integers first so large products keep full accuracy.
    """
    n = torch.arange(length, device=device)
    k = torch.arange(freqs, device=device)
    turns = (n[:, None] * k[None, :]) % length
    angle = turns.float() * (2 * math.pi) / length
    return torch.cos(angle), torch.sin(angle)


class SeparableDFTBranch(nn.Module):
    """A Global Filter's global branch without FFTs, for any feature size.

    The same computation as `GlobalLocalFilter.global_branch`: real DFT along W, complex
    DFT along H, multiply by the (resized) complex filter, inverse along H, then the
    complex-to-real inverse along W, which weights the inner frequencies twice and, as
    irfft does, ignores the imaginary part of the DC and Nyquist columns. The DFT
    matrices are built from the input's shape, so one exported graph serves every image
    size (detection); cost per channel is H*W*(H + W) multiply-adds per transform.
    The filter is a non-persistent buffer: state dicts are unchanged.
    """

    def __init__(self, complex_weight: torch.Tensor) -> None:
        super().__init__()
        weight = complex_weight.detach().float().clone()
        self.register_buffer("weight", weight.permute(3, 0, 1, 2).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        height, width = x.shape[-2], x.shape[-1]
        freqs = width // 2 + 1
        filt = F.interpolate(self.weight, size=(height, freqs), mode="bilinear", align_corners=True)
        cos_w, sin_w = _dft_cos_sin(width, freqs, x.device)
        cos_h, sin_h = _dft_cos_sin(height, height, x.device)
        scale_w = torch.ones_like(cos_w[:, 0]).sum().rsqrt()
        scale_h = torch.ones_like(cos_h[:, 0]).sum().rsqrt()
        cos_w, sin_w = cos_w * scale_w, sin_w * scale_w
        cos_h, sin_h = cos_h * scale_h, sin_h * scale_h
        # rfft along W, then the full DFT along H (e^{-i theta} = cos - i sin).
        real, imag = x @ cos_w, -(x @ sin_w)
        real, imag = cos_h @ real + sin_h @ imag, cos_h @ imag - sin_h @ real
        real, imag = real * filt[0] - imag * filt[1], real * filt[1] + imag * filt[0]
        # inverse along H (e^{+i theta}), then complex-to-real along W.
        real, imag = cos_h @ real - sin_h @ imag, cos_h @ imag + sin_h @ real
        k = torch.arange(freqs, device=x.device)
        twice = 2.0 - (k == 0).float() - (2 * k == width).float()
        y = real @ (cos_w * twice).T - imag @ (sin_w * twice).T
        return y.to(dtype)


def has_global_filters(model: nn.Module) -> bool:
    return any(isinstance(m, GlobalLocalFilter) for m in model.modules())


def use_separable_dft(model: nn.Module) -> nn.Module:
    """Give every Global Filter of `model` a `SeparableDFTBranch`, in place."""
    for layer in model.modules():
        if isinstance(layer, GlobalLocalFilter):
            layer.fixed_branch = SeparableDFTBranch(layer.complex_weight)
    return model


def _gf_rewrite():
    """The DFT-free fixed-size GF rewrite module, or None where it is not installed."""
    if importlib.util.find_spec(GF_REWRITE_MODULE) is None:
        return None
    return importlib.import_module(GF_REWRITE_MODULE)


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _load_weights(model: nn.Module, checkpoint: str | PathLike | None, progress: Progress) -> None:
    """Load `checkpoint` strictly into `model` (in place) through its checkpoint_filter_fn."""
    if checkpoint is None:
        return
    _say(progress, f"loading {checkpoint}")
    load_checkpoint(model, checkpoint)


def _weights(checkpoint: str | PathLike | None) -> dict:
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


def _cfg(model: nn.Module, task: str):
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        raise ValueError("model has no pretrained_cfg; build it with model_export.create_model")
    if cfg.task != task:
        raise ValueError(
            f"{getattr(model, 'variant', type(model).__name__)} is a {cfg.task!r} model; "
            f"this exporter writes {task!r} bundles"
        )
    return cfg


def manifest_labels(cfg, num_classes: int, labels: Sequence[str] | None = None) -> list[str]:
    """One name per output class: `labels`, else cfg.extra['labels'], else the label set."""
    source = "labels argument"
    if labels is None:
        labels, source = cfg.extra.get("labels"), "pretrained_cfg.extra['labels']"
    if labels is None:
        return labels_for(cfg.label_set, num_classes)
    labels = [str(name) for name in labels]
    if len(labels) != num_classes:
        raise ValueError(
            f"{source} has {len(labels)} names but the model has {num_classes} output classes"
        )
    return labels


def _check_gf_mode(gf_mode: str, allowed: tuple[str, ...], task: str) -> None:
    if gf_mode not in allowed:
        raise ValueError(
            f"gf_mode {gf_mode!r} is not supported for {task} export; use one of {allowed}"
        )


def _seg_gf_mode(gf_mode: str, model: nn.Module) -> str:
    """The Global Filter graph for a segmentor (`none` without GF layers)."""
    _check_gf_mode(gf_mode, SEG_GF_MODES, "segmentation")
    if not has_global_filters(model):
        return "none"
    if gf_mode == "dft" or _gf_rewrite() is not None:
        return gf_mode
    if gf_mode == "auto":
        return "separable"
    raise ValueError(f"gf_mode {gf_mode!r} needs {GF_REWRITE_MODULE}, which is not installed")


def _tile_preprocess(cfg, tile: int, scale: tuple[int, int] | None) -> dict:
    """The variant's mmseg preprocess at the exported tile size; a tile other than the
    variant's keeps the stride's ratio to the crop (341/512)."""
    pre = cfg.preprocess()
    window = pre["sliding_window"]
    crop = window["crop"][0]
    stride = window["stride"][0] if tile == crop else max(1, int(window["stride"][0] * tile / crop))
    return pre | {
        "input_size": (tile, tile),
        "scale": tuple(scale) if scale is not None else pre["scale"],
        "sliding_window": {"crop": (tile, tile), "stride": (stride, stride)},
    }


def _export_segmentation_graph(
    graph: nn.Module, example: torch.Tensor, path: Path, opset: int, use_dynamo: bool
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if use_dynamo:
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"image": {0: batch}},
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
            return
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


def _convert_fp16(src: Path, dst: Path) -> None:
    """fp16 copy of an fp32 graph: float32 inputs/outputs, FP16_KEEP_FP32_OPS in float32.

    Casts from non-float tensors (the uint8 image, integer sizes) are left as they are;
    the converter would otherwise retarget them to float16 behind consumers that still
    expect float32.
    """
    import onnx
    from onnxconverter_common import float16

    graph = onnx.load(str(src))
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.value_info, *inferred.input, *inferred.initializer]
        if hasattr(v, "type")
    }
    non_float_casts = [
        node.name
        for node in graph.graph.node
        if node.op_type == "Cast" and types.get(node.input[0]) != onnx.TensorProto.FLOAT
    ]
    with warnings.catch_warnings():
        # One warning per weight below fp16's smallest normal: expected, not actionable.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        graph = float16.convert_float_to_float16(
            graph,
            keep_io_types=True,
            op_block_list=float16.DEFAULT_OP_BLOCK_LIST + list(FP16_KEEP_FP32_OPS),
            node_block_list=non_float_casts,
        )
    onnx.save(graph, str(dst))


def _seg_parity(
    path: Path, example: torch.Tensor, reference: np.ndarray, tolerance: float, precision: str
) -> dict:
    got = _session(path).run(None, {"image": example.numpy()})[0]
    max_abs, rel = _errors(reference, got)
    batch, tile = example.shape[0], example.shape[1]
    return {
        "engine": path.name,
        "reference": "torch fp32 eager",
        "max_abs_error": max_abs,
        "relative_error": rel,
        "top1_agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
        "tolerance": tolerance,
        "passed": rel < tolerance,
        "inputs": f"{batch} seeded random uint8 tiles {tile}x{tile}, {precision} graph; "
        f"relative_error = max abs error / largest torch logit",
    }


def export_segmentation_bundle(
    model: nn.Module,
    out_dir: str | PathLike,
    *,
    checkpoint: str | PathLike | None = None,
    fp16: bool = False,
    gf_mode: str = "auto",
    progress: Progress = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    scale: tuple[int, int] | None = None,
    opset: int = 18,
    parity_batch: int = 2,
    seed: int = 0,
    tolerance: float = SEG_TOLERANCE,
) -> Manifest:
    """Write a segmentation bundle for `model` (a create_model segmentor) at its tile size.

    `checkpoint`, when given, is loaded strictly into `model` (in place) and recorded
    with its sha256; loading a file the model already holds changes nothing. `scale`
    replaces the mmseg fit scale (long, short) the service rescales images to, e.g. for
    a model trained at another resolution. Raises ParityError (after writing the bundle
    and its parity records) when ONNX Runtime's logits differ from torch's by more than
    `tolerance` (fp32) or SEG_FP16_TOLERANCE (fp16), relative to the largest logit.
    """
    cfg = _cfg(model, "segment")
    tile = cfg.image_size
    classes = model.num_classes
    names = manifest_labels(cfg, classes, labels)
    variant = getattr(model, "variant", type(model).__name__)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _load_weights(model, checkpoint, progress)
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randint(0, 256, (parity_batch, tile, tile, 3), generator=gen, dtype=torch.uint8)
    graph = SegmentationTileGraph(model, cfg.mean, cfg.std).eval()
    with torch.no_grad():
        reference = graph(example).numpy()
    normalised = (example[:1].permute(0, 3, 1, 2).float() - graph.mean) / graph.std
    gf_graph = _seg_gf_mode(gf_mode, model)
    mode = ENGINE_GF_MODES.get(gf_graph, gf_graph)
    if gf_graph in REWRITE_GF_MODES:
        _say(progress, f"rewriting Global Filters without DFT ({gf_graph}) for {tile}x{tile} tiles")
        graph.model = _gf_rewrite().rewrite_global_filters(
            copy.deepcopy(model), mode=gf_graph, example_input=normalised
        )
    if gf_graph == "separable":
        _say(progress, "replacing Global Filter FFTs by separable DFT matrices")
        graph.model = use_separable_dft(copy.deepcopy(model))
    if graph.model is model:
        graph.model = copy.deepcopy(model)
    fused_norms = fuse_layer_norms(graph.model)
    use_dynamo = gf_graph == "dft"
    exporter = "dynamo" if use_dynamo else "torchscript"
    _say(progress, f"exporting {variant} ({exporter}, opset {opset}) to {out_dir / MODEL_FILE}")
    _export_segmentation_graph(graph, example, out_dir / MODEL_FILE, opset, use_dynamo)
    _say(progress, "checking fp32 parity with ONNX Runtime")
    parity = [_seg_parity(out_dir / MODEL_FILE, example, reference, tolerance, "fp32")]
    engines = [{"format": "onnx", "precision": "fp32", "file": MODEL_FILE, "gf_mode": mode}]
    if fp16:
        _say(progress, f"converting to fp16: {out_dir / MODEL_FP16_FILE}")
        _convert_fp16(out_dir / MODEL_FILE, out_dir / MODEL_FP16_FILE)
        parity.append(
            _seg_parity(out_dir / MODEL_FP16_FILE, example, reference, SEG_FP16_TOLERANCE, "fp16")
        )
        engines.append(
            {"format": "onnx", "precision": "fp16", "file": MODEL_FP16_FILE, "gf_mode": mode}
        )
    manifest = write_manifest(
        out_dir,
        {
            "name": name or variant,
            "variant": variant,
            "task": "segment",
            "description": f"{variant}: one {tile}x{tile} sliding-window tile per batch row",
            "weights": _weights(checkpoint),
            "inputs": [
                {
                    "name": "image",
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": [-1, tile, tile, 3],
                    "description": "RGB tiles, 0-255",
                }
            ],
            "outputs": [
                {
                    "name": "logits",
                    "dtype": "float32",
                    "layout": "NCHW",
                    "shape": [-1, classes, tile, tile],
                    "description": "class logits resized to the tile (bilinear)",
                }
            ],
            "preprocess": _tile_preprocess(cfg, tile, scale),
            "labels": names,
            "engines": engines,
            "export": {
                "opset": opset,
                "exporter": exporter,
                "image_size": tile,
                "gf_mode": mode,
                "fused_layer_norms": fused_norms,
                "gf_graph": gf_graph,
                "batch": "dynamic",
                "max_batch": MAX_BATCH,
                "align_corners": False,
                "fp16": fp16,
                "fp16_fp32_ops": list(FP16_KEEP_FP32_OPS) if fp16 else [],
            },
            "parity": parity,
        },
    )
    failed = [p for p in parity if not p["passed"]]
    if failed:
        raise ParityError(
            "; ".join(
                f"{out_dir / p['engine']}: relative error {p['relative_error']:.3g} >= "
                f"{p['tolerance']:g}"
                for p in failed
            )
        )
    return manifest


def _match_detections(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray | None:
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


def _detection_parity(
    graph: nn.Module, path: Path, images: list[torch.Tensor], tolerance: float
) -> dict:
    session = _session(path)
    worst_abs, worst_rel, worst_mask, agreement, problems = 0.0, 0.0, 0.0, 1.0, []
    for image in images:
        with torch.no_grad():
            ref = [t.numpy() for t in graph(image)]
        got = session.run(None, {"image": image.numpy()})
        where = f"{image.shape[0]}x{image.shape[1]}"
        if ref[0].shape[0] == 0:
            problems.append(f"no detections on {where}")
        order = _match_detections(ref, got) if ref[0].shape == got[0].shape else None
        if order is None:
            problems.append(
                f"{where}: {got[0].shape[0]} ONNX detections do not pair with "
                f"torch's {ref[0].shape[0]} (count or labels differ)"
            )
            continue
        box_abs, box_rel = _errors(ref[0], got[0][order])
        score_abs, _ = _errors(ref[2], got[2][order])
        mask_abs, _ = _errors(ref[3], got[3][order])
        same = float(((ref[3] > 0.5) == (got[3][order] > 0.5)).mean()) if ref[3].size else 1.0
        worst_abs = max(worst_abs, box_abs, score_abs)
        worst_rel = max(worst_rel, box_rel, score_abs)
        worst_mask = max(worst_mask, mask_abs)
        agreement = min(agreement, same)
    passed = not problems and worst_rel < tolerance and agreement >= MASK_AGREEMENT
    shapes = ", ".join("x".join(map(str, i.shape[:2])) for i in images)
    return {
        "engine": path.name,
        "reference": "torch fp32 eager",
        "max_abs_error": worst_abs,
        "relative_error": worst_rel,
        "top1_agreement": 0.0 if problems else 1.0,
        "tolerance": tolerance,
        "passed": passed,
        "inputs": (
            f"seeded random uint8 images {shapes}; detections paired by label and box; "
            f"relative_error = max(box error / largest coordinate, score error); "
            f"binary mask pixel agreement {agreement:.6f} (limit {MASK_AGREEMENT:g}), "
            f"mask probability max abs error {worst_mask:.3g}; "
            f"top1_agreement = all labels paired"
        )
        + (f"; {'; '.join(problems)}" if problems else ""),
    }


def _detection_preprocess(cfg, model: nn.Module) -> dict:
    """The config's preprocess with the resize the graph actually does (the model's
    transform: fit (max_size, min_size))."""
    min_size, max_size = model.transform.min_size[0], model.transform.max_size
    return cfg.preprocess() | {"input_size": (min_size, max_size), "scale": (max_size, min_size)}


def export_detection_bundle(
    model: nn.Module,
    out_dir: str | PathLike,
    *,
    checkpoint: str | PathLike | None = None,
    gf_mode: str = "auto",
    progress: Progress = None,
    fp16: bool = False,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    opset: int = 17,
    image_sizes: Sequence[tuple[int, int]] = ((480, 640), (400, 320)),
    seed: int = 0,
    tolerance: float = DETECTION_TOLERANCE,
) -> Manifest:
    """Write a detection bundle for `model` (a create_model HorNetMaskRCNN).

    The graph is traced on the first of `image_sizes` and checked on all of them with
    ONNX Runtime: the same number of detections, paired one to one with equal labels,
    boxes (relative to the largest coordinate) and scores within `tolerance`, masks
    thresholded at 0.5 agreeing on MASK_AGREEMENT of their pixels. Raises ParityError
    after writing on failure.
    `checkpoint` is loaded and recorded as for segmentation (this model's own
    torchvision-layout state dicts; mmdet files are refused with the way to load their
    backbone and neck). `fp16` is refused: the detection graph is exported in fp32 only.
    """
    if fp16:
        raise ValueError("fp16 detection bundles are not supported; export without fp16")
    _check_gf_mode(gf_mode, DETECTION_GF_MODES, "detection")
    cfg = _cfg(model, "detect")
    names = manifest_labels(cfg, model.num_object_classes, labels)
    variant = getattr(model, "variant", type(model).__name__)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _load_weights(model, checkpoint, progress)
    model = model.eval()
    mode = "matmul" if has_global_filters(model) else "none"
    gen = torch.Generator().manual_seed(seed)
    images = [
        torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8) for h, w in image_sizes
    ]
    graph = DetectionGraph(model).eval()
    exported = graph
    if mode == "matmul":
        _say(progress, "replacing Global Filter FFTs by in-graph DFT matrices (any image size)")
        exported = DetectionGraph(use_separable_dft(copy.deepcopy(model))).eval()
    outputs = ["boxes", "labels", "scores", "masks"]
    _say(progress, f"exporting {variant} (torchscript, opset {opset}) to {out_dir / MODEL_FILE}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported,
            (images[0],),
            str(out_dir / MODEL_FILE),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={
                "image": {0: "height", 1: "width"},
                "boxes": {0: "detections"},
                "labels": {0: "detections"},
                "scores": {0: "detections"},
                "masks": {0: "detections", 2: "height", 3: "width"},
            },
        )
    _say(progress, f"checking parity with ONNX Runtime on {len(images)} image sizes")
    parity = _detection_parity(graph, out_dir / MODEL_FILE, images, tolerance)
    manifest = write_manifest(
        out_dir,
        {
            "name": name or variant,
            "variant": variant,
            "task": "detect",
            "description": f"{variant}: Mask R-CNN, one image per call, resized in the graph",
            "weights": _weights(checkpoint),
            "inputs": [
                {
                    "name": "image",
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": [-1, -1, 3],
                    "description": "one RGB image, 0-255, any size",
                }
            ],
            "outputs": [
                {
                    "name": "boxes",
                    "dtype": "float32",
                    "shape": [-1, 4],
                    "description": "x1, y1, x2, y2 in input pixels",
                },
                {
                    "name": "labels",
                    "dtype": "int64",
                    "shape": [-1],
                    "description": "index into labels",
                },
                {"name": "scores", "dtype": "float32", "shape": [-1]},
                {
                    "name": "masks",
                    "dtype": "float32",
                    "shape": [-1, 1, -1, -1],
                    "layout": "NCHW",
                    "description": "mask probabilities pasted at image size; 0.5 threshold",
                },
            ],
            "preprocess": _detection_preprocess(cfg, model),
            "labels": names,
            "engines": [
                {"format": "onnx", "precision": "fp32", "file": MODEL_FILE, "gf_mode": mode}
            ],
            "export": {
                "opset": opset,
                "exporter": "torchscript",
                "resize_in_graph": True,
                "min_size": model.transform.min_size[0],
                "max_size": model.transform.max_size,
                "box_score_thresh": model.roi_heads.score_thresh,
                "detections_per_img": model.roi_heads.detections_per_img,
                "gf_mode": mode,
                "gf_graph": "separable" if mode != "none" else "none",
            },
            "parity": [parity],
        },
    )
    if not parity["passed"]:
        raise ParityError(
            f"{out_dir / MODEL_FILE}: relative error {parity['relative_error']:.3g} "
            f"(limit {tolerance:g}); {parity['inputs']}"
        )
    return manifest
