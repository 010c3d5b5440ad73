"""Classifier export: uint8 NHWC images in (normalised inside), logits out.

The host sends raw pixels (4x fewer bytes than float32) and does no float work. Global
Filters are rewritten DFT-free by default (`model_export.gf_rewrite`); `dft` keeps the
ONNX DFT op for runtimes with a fast one. ONNX Runtime runs the graph on seeded random
images and on real photos, and the logits are compared with the torch model, in float32
by default (float64 torch convolutions are ~50x slower on CPU) or float64.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hornet_bundle import (
    ONNX_FP16,
    ONNX_FP32,
    TIMING_CACHE,
    TRT_FP16,
    TRT_FP32,
    Manifest,
    write_manifest,
)
from model_export.export import fields, parity
from model_export.export.errors import ExportError
from model_export.export.fp16 import KEEP_FP32_OPS, convert_fp16
from model_export.export.onnx_graph import export_dynamo, onnx_op_types, onnx_opset
from model_export.export.options import ExportOptions
from model_export.export.session import run_onnx
from model_export.gf_mode import GFMode, check_gf_mode, engine_gf_mode
from model_export.gf_rewrite import global_filter_layers, rewrite_global_filters
from model_export.gnconv import fuse_layer_norms

FP32_TOLERANCE = 1e-5  # relative L2 error of logits vs the torch model
FP16_TOLERANCE = 1e-2  # relative L2 error of fp16 logits vs the fp32 graph
DEFAULT_BATCH = (1, 8, 32)
FORMATS = ("onnx", "tensorrt")
REFERENCES = ("float32", "float64")


class ClassifierGraph(nn.Module):
    """uint8 NHWC images -> normalised float NCHW -> classifier logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))
        shift = -torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1))
        self.register_buffer("shift", shift.float().view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(self.scale.dtype)
        return self.model(x * self.scale + self.shift)


# ----------------------------------------------------------------------------- inputs


def _photos() -> list[np.ndarray]:
    """A few real photographs (scikit-image's data set); none when it is not installed."""
    try:
        from skimage import data
    except ImportError:
        return []
    return [
        np.asarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]


def eval_crop(image: np.ndarray, preprocess: dict) -> np.ndarray:
    """The official evaluation transform up to the uint8 crop (PIL resize, center crop)."""
    from PIL import Image

    size = preprocess["input_size"][0]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[preprocess["interpolation"]]
    pil = Image.fromarray(image).convert("RGB")
    if preprocess["resize_mode"] == "direct":
        return np.asarray(pil.resize((size, size), resample))
    scale = int(size / preprocess["crop_pct"])
    w, h = pil.size
    if w <= h:
        new = (scale, int(scale * h / w))
    else:
        new = (int(scale * w / h), scale)
    pil = pil.resize(new, resample)
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)))


def verification_inputs(preprocess: dict, seed: int = 0, count: int = 4) -> dict[str, np.ndarray]:
    size = preprocess["input_size"][0]
    rng = np.random.default_rng(seed)
    inputs = {"random": rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)}
    photos = _photos()
    if photos:
        inputs["photos"] = np.stack([eval_crop(p, preprocess) for p in photos])
    return inputs


def torch_reference(
    graph: nn.Module, inputs: dict[str, np.ndarray], dtype: torch.dtype = torch.float32
) -> dict[str, np.ndarray]:
    reference = copy.deepcopy(graph).to(dtype).eval()
    with torch.no_grad():
        return {k: reference(torch.from_numpy(v)).numpy() for k, v in inputs.items()}


def logits_parity(engine: str, reference: str, refs: dict, outs: dict, tolerance: float) -> dict:
    """The parity record of `outs` against `refs` (logits, batches keyed alike)."""
    ref = np.concatenate([refs[k] for k in refs])
    got = np.concatenate([outs[k] for k in refs])
    figures = {
        "max_abs_error": parity.max_abs_error(ref, got),
        "relative_l2_error": parity.relative_l2_error(ref, got),
        "top1_agreement": parity.argmax_agreement(ref, got, axis=-1),
    }
    inputs = ", ".join(f"{k}: {len(refs[k])}" for k in refs)
    return parity.record(engine, reference, "relative_l2_error", tolerance, figures, inputs)


# ----------------------------------------------------------------------------- steps


def _checked_options(options: ExportOptions) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    batch = tuple(options.batch or DEFAULT_BATCH)
    formats = tuple(options.formats)
    if any(f not in FORMATS for f in formats):
        raise ValueError(f"unknown format in {formats}: use onnx, tensorrt or all")
    if not (1 <= batch[0] <= batch[1] <= batch[2]):
        raise ValueError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    if options.reference not in REFERENCES:
        raise ValueError(f"reference must be float32 or float64, got {options.reference!r}")
    return batch, formats


def _gf_graph(model: nn.Module, options: ExportOptions) -> str:
    """The GF graph for this classifier: `none` without GF layers."""
    mode = check_gf_mode(options.gf_mode, GFMode, "classify")
    return mode if global_filter_layers(model) else "none"


def _export_model(
    model: nn.Module, gf_graph: str, options: ExportOptions
) -> tuple[nn.Module, dict]:
    """A float32 copy of `model` as it is exported: GF rewritten, norms fused; and the
    facts the manifest records about it."""
    export_model = copy.deepcopy(model).float()
    if gf_graph not in ("none", GFMode.DFT):
        options.say(
            f"rewriting {len(global_filter_layers(model))} Global Filters DFT-free ({gf_graph})"
        )
        rewrite_global_filters(export_model, gf_graph)
    fused_norms = fuse_layer_norms(export_model)
    gf_layers: dict[str, int] = {}
    for layer in global_filter_layers(export_model):
        form = type(layer.fixed_branch).__name__ if layer.fixed_branch is not None else "DFT"
        gf_layers[form] = gf_layers.get(form, 0) + 1
    return export_model, {"gf_layers": gf_layers, "fused_layer_norms": fused_norms}


def _write_onnx(graph: nn.Module, path: Path, size: int, gf_graph: str, options, batch) -> None:
    started = time.perf_counter()
    options.say(f"exporting ONNX ({size}x{size}, uint8 NHWC input, dynamic batch)")
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    try:
        export_dynamo(graph, example, path, ["logits"], batch[2], options.opset)
    except Exception as exc:  # the exporter raises many types; name the step
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {exc}") from exc
    if gf_graph != GFMode.DFT and "DFT" in onnx_op_types(path):
        raise ExportError("the DFT-free graph still contains a DFT op")
    size_mb, seconds = path.stat().st_size / 1e6, time.perf_counter() - started
    options.say(f"  wrote {path.name} ({size_mb:.1f} MB) in {seconds:.0f} s")


def _verify(reference_graph, out: Path, preprocess: dict, options, engine) -> tuple[list, list]:
    """fp32 parity against torch, and with fp16 the fp16 graph against the fp32 one;
    returns the parity records and the engine entries."""
    reference = options.reference
    options.say(
        f"verifying with ONNX Runtime against the torch model ({reference}, FFT Global Filters)"
    )
    inputs = verification_inputs(preprocess)
    refs = torch_reference(reference_graph, inputs, getattr(torch, reference))
    outs = run_onnx(out / ONNX_FP32, inputs, "image")
    tolerance = options.tolerance if options.tolerance is not None else FP32_TOLERANCE
    records = [logits_parity(ONNX_FP32, f"torch {reference}", refs, outs, tolerance)]
    engines = [engine(ONNX_FP32, "fp32")]
    options.say("  " + parity.describe(records[-1]))
    if options.fp16:
        options.say("converting to fp16 (norm statistics stay fp32)")
        convert_fp16(out / ONNX_FP32, out / ONNX_FP16)
        outs16 = run_onnx(out / ONNX_FP16, inputs, "image")
        records.append(logits_parity(ONNX_FP16, f"onnx {ONNX_FP32}", outs, outs16, FP16_TOLERANCE))
        engines.append(engine(ONNX_FP16, "fp16"))
        options.say("  " + parity.describe(records[-1]))
    return records, engines


def _build_tensorrt(out: Path, size: int, batch, options, engine) -> tuple[list, str | None]:
    """TensorRT engines for the ONNX graphs; the engine entries and the reason none
    (or not all) could be built."""
    from model_export.tensorrt_build import TensorRTUnavailable, build_engine

    plans = [("fp32", ONNX_FP32, TRT_FP32)]
    if options.fp16:
        plans.append(("fp16", ONNX_FP16, TRT_FP16))
    engines = []
    profile = ":".join(map(str, batch))
    for precision, source, plan in plans:
        options.say(f"building TensorRT {precision} engine (batch {profile})")
        try:
            info = build_engine(
                out / source,
                out / plan,
                {"image": (size, size, 3)},
                batch,
                fp16=precision == "fp16",
                fp32_onnx_path=out / ONNX_FP32,
                timing_cache=out / TIMING_CACHE,
            )
        except TensorRTUnavailable as exc:
            return engines, str(exc)
        except RuntimeError as exc:
            return engines, f"TensorRT build failed: {exc}"
        engines.append(engine(plan, precision) | {"format": "tensorrt", **info})
    return engines, None


# ----------------------------------------------------------------------------- bundle


def export_classifier(model: nn.Module, out_dir: str | Path, options: ExportOptions) -> Manifest:
    """Write a verified classifier bundle for `model` (weights as they are) to `out_dir`.

    Raises ValueError on invalid options, ParityError after writing the bundle (marked
    failed) when a graph is beyond tolerance, ExportError when TensorRT was asked for
    and could not be built (the ONNX bundle is complete).
    """
    cfg = fields.task_cfg(model, "classify")
    batch, formats = _checked_options(options)
    labels = fields.manifest_labels(cfg, cfg.num_classes, options.labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gf_graph = _gf_graph(model, options)
    export_model, facts = _export_model(model, gf_graph, options)
    graph = ClassifierGraph(export_model, cfg.mean, cfg.std).eval()
    _write_onnx(graph, out / ONNX_FP32, cfg.image_size, gf_graph, options, batch)

    def engine(file: str, precision: str) -> dict:
        return fields.onnx_engine(file, precision, engine_gf_mode(gf_graph), batch)

    reference_graph = ClassifierGraph(model, cfg.mean, cfg.std).eval()
    records, engines = _verify(reference_graph, out, cfg.preprocess(), options, engine)
    trt_error = None
    if "tensorrt" in formats:
        trt_engines, trt_error = _build_tensorrt(out, cfg.image_size, batch, options, engine)
        engines += trt_engines
    export = {
        "fp16": options.fp16,
        "fp16_fp32_ops": list(KEEP_FP32_OPS) if options.fp16 else [],
        "formats": list(formats),
        "batch": list(batch),
        "gf_mode": str(options.gf_mode),
        **facts,
        "reference": options.reference,
        "image_size": cfg.image_size,
        "num_classes": cfg.num_classes,
        "opset": onnx_opset(out / ONNX_FP32),
        "exporter": "torch.onnx dynamo",
    }
    common = _manifest_fields(model, out, options, labels, fields.export_record(export, options))
    manifest = write_manifest(out, common | {"engines": engines, "parity": records})
    parity.raise_on_failure(records, out)
    if trt_error:
        raise ExportError(f"{trt_error} (the ONNX bundle in {out} is complete)")
    return manifest


def _manifest_fields(model, out: Path, options: ExportOptions, labels, export: dict) -> dict:
    """Every manifest field but the engines and parity records."""
    cfg = model.pretrained_cfg
    size = cfg.image_size
    return fields.bundle_identity(model, options, "classify", out.name, _default_description) | {
        "inputs": [
            fields.image_input(
                [-1, size, size, 3],
                "RGB pixels after the evaluation resize/crop; normalised in the graph",
            )
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": [-1, cfg.num_classes],
                "description": "unnormalised class scores (softmax gives probabilities)",
            }
        ],
        "preprocess": cfg.preprocess(),
        "labels": labels,
        "export": export,
    }


def _default_description(variant: str, weights) -> str:
    if weights.random:
        return f"{variant} with RANDOM weights (no checkpoint): for testing only"
    return f"{variant} from {weights.checkpoint or 'trained weights'}"
