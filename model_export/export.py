"""Classifier export: a variant plus a checkpoint becomes a verified model bundle.

The exported graph takes uint8 NHWC images (the host sends raw pixels, 4x fewer bytes
than float32, and does no float work) and normalises inside; it returns logits.
Global Filters are rewritten DFT-free by default (model_export.gf_rewrite); the
`dft` mode keeps the ONNX DFT op for runtimes with a fast one.

Every export is verified: ONNX Runtime runs the graph on seeded random images and on
real photos, the logits are compared with the torch model run in float64, and the
report goes into the manifest. The reference runs in float32 by default (float64
torch convolutions are ~50x slower on CPU: minutes for the large variants);
`reference="float64"` (`--reference float64`) uses float64; beyond tolerance the export
fails (after writing the bundle, so the failing artefact can be inspected, but with
`passed: false` and a non-zero exit).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_export.bundle import write_manifest
from model_export.checkpoint import file_sha256
from model_export.gf_rewrite import global_filter_layers, rewrite_global_filters
from model_export.gnconv import fuse_layer_norms
from model_export.labels import labels_for
from service.manifest import Manifest

FP32_TOLERANCE = 1e-5  # relative error of logits vs the torch model
FP16_TOLERANCE = 1e-2  # relative error of fp16 logits vs the fp32 graph
DEFAULT_BATCH = (1, 8, 32)
ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
TRT_FP32 = "model.plan"
TRT_FP16 = "model.fp16.plan"
# Ops whose fp16 form overflows or loses the layer norms' statistics: kept in fp32.
FP16_KEEP_FP32 = ["ReduceMean", "Pow", "Sqrt", "LayerNormalization", "Erf", "Softmax"]

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """The export could not produce a verified bundle; the message says why."""


def _quiet(_: str) -> None:
    pass


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


# ----------------------------------------------------------------------------- ONNX


def export_onnx(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
    max_batch: int,
) -> None:
    """torch.onnx (dynamo) with a dynamic batch axis; weights inside the one file."""
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    program = torch.onnx.export(
        graph,
        (example,),
        dynamic_shapes=({0: batch},),
        input_names=[input_name],
        output_names=output_names,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.save(str(path))


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_op_types(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    for function in model.functions:
        ops |= {node.op_type for node in function.node}
    return ops


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations; uint8 input and float32 logits kept; norms in fp32."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    # The exporter annotates every intermediate value; the converter relabels those
    # annotations to fp16 but leaves the uint8->float Cast's `to`: drop them, ONNX
    # Runtime infers types itself.
    del model.graph.value_info[:]
    converted = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_FP32,
    )
    # The converter relabels a Cast's output (here uint8 -> float) as fp16 without
    # changing the Cast itself; make each such Cast produce what its consumers expect.
    fp16_values = {
        v.name
        for v in converted.graph.value_info
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_values:
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                    attribute.i = onnx.TensorProto.FLOAT16
    onnx.save(converted, str(dst))


# ----------------------------------------------------------------------------- checks


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    max_abs = float(np.abs(got - ref).max())
    relative = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return max_abs, relative, top1


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


def run_onnx(path: Path, inputs: dict[str, np.ndarray], input_name: str) -> dict[str, np.ndarray]:
    session = ort_session(path)
    return {k: session.run(None, {input_name: v})[0] for k, v in inputs.items()}


def parity_entry(engine: str, reference: str, refs: dict, outs: dict, tolerance: float) -> dict:
    ref = np.concatenate([refs[k] for k in refs])
    got = np.concatenate([outs[k] for k in refs])
    max_abs, relative, top1 = _errors(ref, got)
    return {
        "engine": engine,
        "reference": reference,
        "max_abs_error": max_abs,
        "relative_error": relative,
        "top1_agreement": top1,
        "tolerance": tolerance,
        "passed": bool(relative < tolerance),
        "inputs": ", ".join(f"{k}: {len(refs[k])}" for k in refs),
    }


# ----------------------------------------------------------------------------- bundle


def resolve_gf_mode(model: nn.Module, gf_mode: str) -> str:
    if not global_filter_layers(model):
        return "none"
    if gf_mode not in ("auto", "matmul", "dense_dft", "circular_conv", "dft"):
        raise ExportError(
            f"unknown --gf-mode {gf_mode!r}: choose auto, matmul, dense_dft, circular_conv or dft"
        )
    return gf_mode


def export_bundle(
    variant: str,
    out_dir: str | PathLike,
    *,
    checkpoint: str | PathLike | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    fp16: bool = False,
    formats: Sequence[str] = ("onnx",),
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    gf_mode: str = "auto",
    reference: str = "float32",
    model: nn.Module | None = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    demo: bool = False,
    description: str = "",
    progress: Progress | None = None,
) -> Manifest:
    """Export a classifier variant to a verified bundle in `out_dir`; returns its manifest.

    `model` replaces the registry's network (tests and demo models pass tiny ones; it
    must carry a `pretrained_cfg`). Raises ExportError on any failure, including a
    parity check beyond tolerance (the bundle is still written, marked failed).
    """
    say = progress or _quiet
    formats = tuple(formats)
    if any(f not in ("onnx", "tensorrt") for f in formats):
        raise ExportError(f"unknown format in {formats}: use onnx, tensorrt or all")
    if not (1 <= batch[0] <= batch[1] <= batch[2]):
        raise ExportError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    if model is None:
        from model_export.registry import create_model

        say(f"building {variant}" + (f" from {checkpoint}" if checkpoint else " (RANDOM weights)"))
        model = create_model(
            variant, checkpoint=checkpoint, num_classes=num_classes, image_size=image_size
        )
    model = model.eval()
    cfg = model.pretrained_cfg
    if cfg.task != "classify":
        raise ExportError(f"{variant} is a {cfg.task} model; export_bundle handles classifiers")
    preprocess = cfg.preprocess()
    size = cfg.image_size
    label_names = (
        list(labels)
        if labels is not None
        else list(cfg.extra.get("labels") or labels_for(cfg.label_set, cfg.num_classes))
    )
    if len(label_names) != cfg.num_classes:
        raise ExportError(f"{len(label_names)} labels for {cfg.num_classes} outputs")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode = resolve_gf_mode(model, gf_mode)
    export_model = copy.deepcopy(model).float()
    if mode not in ("none", "dft"):
        say(f"rewriting {len(global_filter_layers(model))} Global Filters DFT-free ({mode})")
        rewrite_global_filters(export_model, mode)
    fused_norms = fuse_layer_norms(export_model)
    gf_layers: dict[str, int] = {}
    for layer in global_filter_layers(export_model):
        form = type(layer.fixed_branch).__name__ if layer.fixed_branch is not None else "DFT"
        gf_layers[form] = gf_layers.get(form, 0) + 1
    graph = ClassifierGraph(export_model, cfg.mean, cfg.std).eval()
    reference_graph = ClassifierGraph(model, cfg.mean, cfg.std).eval()

    onnx_path = out / ONNX_FP32
    started = time.perf_counter()
    say(f"exporting ONNX ({size}x{size}, uint8 NHWC input, dynamic batch)")
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    try:
        export_onnx(graph, example, onnx_path, "image", ["logits"], batch[2])
    except Exception as exc:  # the exporter raises many types; name the step
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {exc}") from exc
    ops = onnx_op_types(onnx_path)
    if mode != "dft" and "DFT" in ops:
        raise ExportError("the DFT-free graph still contains a DFT op")
    size_mb, seconds = onnx_path.stat().st_size / 1e6, time.perf_counter() - started
    say(f"  wrote {onnx_path.name} ({size_mb:.1f} MB) in {seconds:.0f} s")

    if reference not in ("float32", "float64"):
        raise ExportError(f"reference must be float32 or float64, got {reference!r}")
    say(f"verifying with ONNX Runtime against the torch model ({reference}, FFT Global Filters)")
    inputs = verification_inputs(preprocess)
    refs = torch_reference(reference_graph, inputs, getattr(torch, reference))
    outs = run_onnx(onnx_path, inputs, "image")
    parity = [parity_entry(ONNX_FP32, f"torch {reference}", refs, outs, FP32_TOLERANCE)]
    engines = [
        {
            "format": "onnx",
            "precision": "fp32",
            "file": ONNX_FP32,
            "gf_mode": _manifest_gf_mode(mode),
            "batch_profile": batch,
        }
    ]
    say(_describe(parity[-1]))

    if fp16:
        say("converting to fp16 (norm statistics stay fp32)")
        fp16_path = out / ONNX_FP16
        convert_fp16(onnx_path, fp16_path)
        outs16 = run_onnx(fp16_path, inputs, "image")
        parity.append(parity_entry(ONNX_FP16, f"onnx {ONNX_FP32}", outs, outs16, FP16_TOLERANCE))
        engines.append(
            {
                "format": "onnx",
                "precision": "fp16",
                "file": ONNX_FP16,
                "gf_mode": _manifest_gf_mode(mode),
                "batch_profile": batch,
            }
        )
        say(_describe(parity[-1]))

    trt_error = None
    if "tensorrt" in formats:
        from model_export.tensorrt_build import TensorRTUnavailable, build_engine

        for precision, source, plan in (("fp32", onnx_path, TRT_FP32),) + (
            (("fp16", out / ONNX_FP16, TRT_FP16),) if fp16 else ()
        ):
            say(f"building TensorRT {precision} engine (batch {batch[0]}:{batch[1]}:{batch[2]})")
            try:
                info = build_engine(
                    source,
                    out / plan,
                    {"image": (size, size, 3)},
                    batch,
                    fp16=precision == "fp16",
                    fp32_onnx_path=onnx_path,
                    timing_cache=out / "timing.cache",
                )
            except TensorRTUnavailable as exc:
                trt_error = str(exc)
                break
            except RuntimeError as exc:
                trt_error = f"TensorRT build failed: {exc}"
                break
            engines.append(
                {
                    "format": "tensorrt",
                    "precision": precision,
                    "file": plan,
                    "gf_mode": _manifest_gf_mode(mode),
                    "batch_profile": batch,
                    **info,
                }
            )

    weights = {"random": checkpoint is None and not cfg.extra.get("trained", False)}
    if checkpoint is not None:
        weights |= {
            "checkpoint": Path(checkpoint).name,
            "checkpoint_sha256": file_sha256(checkpoint),
        }
    manifest = write_manifest(
        out,
        {
            "name": name or out.name,
            "variant": variant,
            "task": "classify",
            "demo": demo,
            "description": description or _default_description(variant, weights),
            "weights": weights,
            "inputs": [
                {
                    "name": "image",
                    "dtype": "uint8",
                    "shape": [-1, size, size, 3],
                    "layout": "NHWC",
                    "description": "RGB pixels after the evaluation resize/crop; "
                    "normalised in the graph",
                }
            ],
            "outputs": [
                {
                    "name": "logits",
                    "dtype": "float32",
                    "shape": [-1, cfg.num_classes],
                    "description": "unnormalised class scores (softmax gives probabilities)",
                }
            ],
            "preprocess": preprocess,
            "labels": label_names,
            "engines": engines,
            "export": {
                "fp16": fp16,
                "formats": list(formats),
                "batch": list(batch),
                "gf_mode": gf_mode,
                "gf_layers": gf_layers,
                "fused_layer_norms": fused_norms,
                "reference": reference,
                "image_size": size,
                "num_classes": cfg.num_classes,
                "opset": _opset(onnx_path),
                "exporter": "torch.onnx dynamo",
            },
            "parity": parity,
        },
    )
    failed = [p for p in parity if not p["passed"]]
    if failed:
        raise ExportError("parity check failed: " + "; ".join(_describe(p) for p in failed))
    if trt_error:
        raise ExportError(f"{trt_error} (the ONNX bundle in {out} is complete)")
    return manifest


def _manifest_gf_mode(mode: str) -> str:
    """The manifest's coarse GF form: the DFT as MatMuls (auto, matmul, dense_dft)."""
    return "matmul" if mode in ("auto", "dense_dft") else mode


def _describe(p: dict) -> str:
    verdict = "ok" if p["passed"] else "FAILED"
    return (
        f"  {p['engine']} vs {p['reference']}: max abs {p['max_abs_error']:.2e}, "
        f"relative {p['relative_error']:.2e} (tolerance {p['tolerance']:.0e}), "
        f"top-1 agreement {p['top1_agreement']:.3f} [{verdict}]"
    )


def _default_description(variant: str, weights: dict) -> str:
    if weights["random"]:
        return f"{variant} with RANDOM weights (no checkpoint): for testing only"
    return f"{variant} from {weights.get('checkpoint', 'trained weights')}"


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def clear_bundle(out: Path) -> None:
    """Remove a previous bundle's files (only the ones a bundle may contain)."""
    for name in ("manifest.json", ONNX_FP32, ONNX_FP16, TRT_FP32, TRT_FP16, "timing.cache"):
        path = out / name
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
