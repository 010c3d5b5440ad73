"""An int8 graph for a classifier bundle: post-training static quantization, calibrated
on the user's images and verified against the fp32 graph.

    hornet export --variant hornet_tiny_7x7 --checkpoint t7.pth --int8 --calibration DIR
    quantize_int8("bundles/t7", "calibration/", min_agreement=0.99)

The images in the calibration folder go through the bundle's own preprocessing
(hornet_bundle.preprocess, as the service does per request); every fifth is held out,
the rest calibrate ONNX Runtime's `quantize_static`: QDQ format (ONNX Runtime and
OpenVINO both run it as int8), Conv/MatMul/Gemm quantized, weights per channel with
7-bit range (`reduce_range`: on x86 CPUs without VNNI, such as the AVX2 Zen 3 we measure
on, 8-bit weights overflow the u8 x s8 pair sums and both runtimes then compute
something else than the graph says), activations uint8 over the moving average of
each calibration batch's min and max. The int8 graph
runs beside the fp32 one on the verification photographs and the held-out images, with
ONNX Runtime and, where installed, the service's OpenVINO engine: each gives a parity
record (relative L2 error of the logits, top-1 agreement with fp32), and the export
fails when the agreement is under `min_agreement` on either. docs/export.md says why
this quantizer and not NNCF.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from importlib import metadata
from os import PathLike
from pathlib import Path

import numpy as np

from hornet_bundle import (
    ENGINE_ENTRY_POINTS,
    ONNX_INT8,
    Bundle,
    EngineUnavailable,
    Manifest,
    load_bundle,
)
from hornet_bundle.host import runtime_on
from hornet_bundle.preprocess import classification_input
from hornet_bundle.writer import rewrite_manifest
from model_export.export import parity
from model_export.export.errors import ExportError, ParityError
from model_export.export.precision import (
    IMAGE_SUFFIXES,
    chunked,
    classification_inputs,
    image_files,
    photographs,
    read_picture,
)
from model_export.export.session import ort_session

DEFAULT_MIN_AGREEMENT = 0.99
# The relative L2 error of int8 logits against fp32 above which a graph is broken even
# where its top-1 classes survive (measured: 0.04 on hornet_tiny_7x7, 0.17 on the demo
# classifier); the agreement is the bound the user sets.
INT8_TOLERANCE = 0.5
MIN_CALIBRATION_IMAGES = 10
HELD_OUT_EVERY = 5  # every fifth calibration image verifies instead of calibrating
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_BATCH = 8


def calibration_files(directory: str | PathLike) -> list[Path]:
    """The image files under `directory` (recursively, sorted by path), at least
    MIN_CALIBRATION_IMAGES; ValueError otherwise."""
    root = Path(directory)
    files = image_files(root)
    if len(files) < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"calibration folder {root} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); "
            f"int8 calibration needs at least {MIN_CALIBRATION_IMAGES}, better a few hundred "
            "of what the model will be served"
        )
    return files


def calibration_set(directory: str | PathLike, manifest: Manifest) -> tuple[np.ndarray, str]:
    """The folder's images preprocessed as the bundle says (uint8 NHWC), and the sha256
    of the set (each file's relative path and contents, in order)."""
    root = Path(directory)
    digest = hashlib.sha256()
    images = []
    for path in calibration_files(root):
        data = path.read_bytes()
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
        images.append(classification_input(read_picture(path), manifest.preprocess))
    return np.stack(images), digest.hexdigest()


def check_min_agreement(min_agreement: float) -> None:
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(
            f"--min-agreement is a fraction of images, between 0 and 1; got {min_agreement}"
        )


def check_task(task: str) -> None:
    if task != "classify":
        raise ValueError(
            f"int8 export is for classifiers only; this is a {task} model (its int8 graph "
            "would need its own calibration and verification, not written yet)"
        )


def quantize_int8(
    bundle_dir: str | PathLike,
    calibration_dir: str | PathLike,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    say: Callable[[str], None] = lambda _: None,
) -> Manifest:
    """Write the bundle's int8 graph from its fp32 one, calibrated on the images of
    `calibration_dir`, verify it and record its engine entry and parity records.

    Raises ValueError (not a classifier, too few or unreadable images, a bound outside
    [0, 1]), ExportError when ONNX Runtime's quantizer is missing, ParityError (after
    writing the records, marked failed) when the top-1 agreement is under
    `min_agreement` or the logits are broken.
    """
    check_min_agreement(min_agreement)
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    check_task(manifest.task)
    images, calibration_sha = calibration_set(calibration_dir, manifest)
    held_out = images[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    calibrating = np.delete(images, np.s_[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY], axis=0)
    fp32 = manifest.engine_for("onnx", "fp32")
    input_name = manifest.inputs[0].name
    say(
        f"quantizing {fp32.file} to int8 on {len(calibrating)} calibration images "
        f"({len(held_out)} held out for verification)"
    )
    _quantize(bundle.file(fp32.file), bundle.path / ONNX_INT8, input_name, calibrating)
    int8_engine = fp32.model_dump(mode="json") | {"precision": "int8", "file": ONNX_INT8}
    engines = [e.model_dump(mode="json") for e in manifest.engines if e.file != ONNX_INT8]
    export = manifest.export | {
        "int8": {
            "quantizer": f"onnxruntime {metadata.version('onnxruntime')} quantize_static",
            "format": "QDQ",
            "op_types": list(QUANTIZED_OPS),
            "weights": "int8 per channel, 7-bit range (reduce_range)",
            "activations": "uint8, moving average of each batch's min/max",
            "calibration": {
                "images": len(images),
                "calibrated_on": len(calibrating),
                "held_out": len(held_out),
                "sha256": calibration_sha,
            },
            "min_agreement": min_agreement,
        }
    }
    rewrite_manifest(bundle, {"engines": [*engines, int8_engine]})
    bundle = load_bundle(bundle.path)
    records = verify_int8(bundle, held_out, min_agreement, say)
    kept = [p.model_dump(mode="json") for p in manifest.parity if p.precision != "int8"]
    written = rewrite_manifest(
        bundle, {"engines": [*engines, int8_engine], "export": export, "parity": [*kept, *records]}
    )
    _raise_on_failure(records, bundle.path)
    return written


def _raise_on_failure(records: list[dict], bundle_dir: Path) -> None:
    failed = [r for r in records if not r["passed"]]
    if failed:
        raise ParityError(
            f"int8 graph {bundle_dir / ONNX_INT8} failed verification against fp32: "
            + "; ".join(
                f"{r['runtime']}: top-1 agreement {r['top1_agreement']:.3f} "
                f"(--min-agreement {r['min_top1_agreement']:g}), relative L2 error "
                f"{r['relative_l2_error']:.3g} (tolerance {r['tolerance']:g}) on {r['inputs']}"
                for r in failed
            )
        )


def _quantize(src: Path, dst: Path, input_name: str, images: np.ndarray) -> None:
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError as exc:  # the quantizer needs onnx (the export extra)
        raise ExportError(f"ONNX Runtime's quantizer cannot be imported: {exc}") from exc

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(images, -(-len(images) // CALIBRATION_BATCH)))

        def get_next(self) -> dict | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        # ONNX Runtime's recommended first step: shapes inferred, graph optimised, so the
        # quantizer sees the ops that will run.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            Batches(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Ranges from the moving average of each batch's min and max, not the extremes
            # of the whole set: on the demo classifier 0.995 of 200 new images kept their
            # fp32 class, against 0.98 with the extremes (tests/export/test_int8.py).
            extra_options={"CalibMovingAverage": True, "CalibMaxIntermediateOutputs": 4},
        )


# ----------------------------------------------------------------------------- verification


def verify_int8(
    bundle: Bundle,
    held_out: np.ndarray,
    min_agreement: float,
    say: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """One parity record per runtime that serves the bundle's int8 graph (ONNX Runtime,
    and OpenVINO where installed), against ONNX Runtime's fp32 run, on the photographs and
    the held-out calibration images."""
    manifest = bundle.manifest
    fp32 = manifest.engine_for("onnx", "fp32").file
    input_name = manifest.inputs[0].name
    batches = {
        "photos": classification_inputs(photographs(), manifest.preprocess),
        "held-out calibration images": held_out,
    }
    reference_session = ort_session(bundle.file(fp32))
    refs = {
        k: chunked(lambda x: reference_session.run(None, {input_name: x})[0], v, CALIBRATION_BATCH)
        for k, v in batches.items()
    }
    records = []
    for runtime, run, close in _int8_runtimes(bundle, say):
        try:
            outs = {k: chunked(run, v, CALIBRATION_BATCH) for k, v in batches.items()}
        finally:
            close()
        record = _record(refs, outs, min_agreement) | {
            "precision": "int8",
            "runtime": runtime_on(runtime),
        }
        record["reference"] = f"onnxruntime fp32 {fp32}"
        say(f"  {runtime}: " + parity.describe(record))
        records.append(record)
    return records


def _int8_runtimes(bundle: Bundle, say: Callable[[str], None]):
    """(description, run, close) of ONNX Runtime on the int8 graph, and of the service's
    OpenVINO engine at int8 where it can be loaded."""
    import onnxruntime as ort

    input_name = bundle.manifest.inputs[0].name
    session = ort_session(bundle.file(ONNX_INT8))
    yield (
        f"onnxruntime {ort.__version__} CPU",
        lambda x: session.run(None, {input_name: x})[0],
        lambda: None,
    )
    found = metadata.entry_points(group=ENGINE_ENTRY_POINTS, name="openvino")
    try:
        engine = next(iter(found)).load()(bundle, device="cpu", precision="int8")
    except (StopIteration, EngineUnavailable, ImportError) as exc:
        say(f"  OpenVINO not checked: {exc or 'no openvino engine entry point'}")
        return
    output = bundle.manifest.outputs[0].name
    yield engine.description, lambda x: engine.run({input_name: x})[output], engine.close


def _record(refs: dict, outs: dict, min_agreement: float) -> dict:
    ref = np.concatenate(list(refs.values()))
    got = np.concatenate(list(outs.values()))
    agreement = parity.argmax_agreement(ref, got, axis=-1)
    figures = {
        "max_abs_error": parity.max_abs_error(ref, got),
        "relative_l2_error": parity.relative_l2_error(ref, got),
        "top1_agreement": agreement,
        "min_top1_agreement": min_agreement,
    }
    inputs = "; ".join(
        f"{name}: {len(refs[name])}, top-1 agreement "
        f"{parity.argmax_agreement(refs[name], outs[name], axis=-1):.3f}"
        for name in refs
    )
    return parity.record(
        ONNX_INT8,
        "",
        "relative_l2_error",
        INT8_TOLERANCE,
        figures,
        inputs,
        agreement >= min_agreement,
    )
