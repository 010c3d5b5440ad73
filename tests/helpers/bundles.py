"""Small real ONNX graphs and bundles for the service tests, and their numpy references.

The graphs follow docs/bundle-format.md's contracts (uint8 NHWC in, normalised inside);
the references compute the same math in float64 numpy, independently of ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 10
LABELS = [f"class{i}" for i in range(NUM_CLASSES)]
_RNG = np.random.default_rng(7)
CONV_W = _RNG.normal(0, 0.5, (8, 3, 4, 4)).astype(np.float32)
CONV_B = _RNG.normal(0, 0.1, (8,)).astype(np.float32)
FC_W = _RNG.normal(0, 1.0, (8, NUM_CLASSES)).astype(np.float32)
FC_B = _RNG.normal(0, 0.1, (NUM_CLASSES,)).astype(np.float32)
SEG_CLASSES = 4
SEG_W = _RNG.normal(0, 0.05, (SEG_CLASSES, 3, 1, 1)).astype(np.float32)
SEG_B = np.array([0.0, 0.5, -0.5, 0.2], dtype=np.float32)
DET_BOXES = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
DET_SCORES = np.array([0.9, 0.3], dtype=np.float32)
DET_LABELS = np.array([1, 2], dtype=np.int64)


def _model(nodes, inputs, outputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def classifier_onnx(size: int, normalize_in_graph: bool = True) -> bytes:
    """image -> (normalise) -> Conv 4x4/4 -> ReLU -> global mean -> Gemm -> 10 logits."""
    inits = [
        _const("conv_w", CONV_W),
        _const("conv_b", CONV_B),
        _const("fc_w", FC_W),
        _const("fc_b", FC_B),
    ]
    nodes = []
    if normalize_in_graph:
        image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])
        inits += [
            _const("scale", np.float32(255.0)),
            _const("mean", np.asarray(MEAN, np.float32)),
            _const("std", np.asarray(STD, np.float32)),
        ]
        nodes += [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["f", "scale"], ["f01"]),
            helper.make_node("Sub", ["f01", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["normed"]),
            helper.make_node("Transpose", ["normed"], ["x"], perm=[0, 3, 1, 2]),
        ]
    else:
        image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
        nodes.append(helper.make_node("Identity", ["image"], ["x"]))
    nodes += [
        helper.make_node(
            "Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[4, 4], strides=[4, 4]
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])
    return _model(nodes, [image], [logits], inits)


def reference_logits(crop: np.ndarray) -> np.ndarray:
    """The classifier's math in float64 numpy for one uint8 HWC crop."""
    x = (crop.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    h, w = x.shape[0] // 4, x.shape[1] // 4
    patches = x[: h * 4, : w * 4].reshape(h, 4, w, 4, 3)
    conv = np.einsum("ypxqc,ocpq->yxo", patches, CONV_W.astype(np.float64)) + CONV_B
    pooled = np.maximum(conv, 0).mean(axis=(0, 1))
    return pooled @ FC_W.astype(np.float64) + FC_B


def reference_probabilities(crop: np.ndarray) -> np.ndarray:
    logits = reference_logits(crop)
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def segmenter_onnx(crop: int) -> bytes:
    """image tile -> Cast -> NCHW -> 1x1 Conv -> SEG_CLASSES logits at the tile size."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", crop, crop, 3])
    logits = helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["batch", SEG_CLASSES, crop, crop]
    )
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w", "b"], ["logits"], kernel_shape=[1, 1]),
    ]
    return _model(nodes, [image], [logits], [_const("w", SEG_W), _const("b", SEG_B)])


def detector_onnx() -> bytes:
    """[H, W, 3] uint8 -> two fixed-fraction boxes, fixed labels/scores, red-channel masks."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["H", "W", 3])
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [2, 4]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2]),
        helper.make_tensor_value_info("masks", TensorProto.FLOAT, [2, 1, "H", "W"]),
    ]
    inits = [
        _const("fractions", DET_BOXES),
        _const("label_values", DET_LABELS),
        _const("score_values", DET_SCORES),
        _const("i0", np.array([0], np.int64)),
        _const("i1", np.array([1], np.int64)),
        _const("order", np.array([1, 0, 1, 0], np.int64)),
        _const("c255", np.float32(255.0)),
        _const("one", np.float32(1.0)),
        _const("ax01", np.array([0, 1], np.int64)),
    ]
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Gather", ["shape", "order"], ["whwh_i"]),
        helper.make_node("Cast", ["whwh_i"], ["whwh"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["fractions", "whwh"], ["boxes"]),
        helper.make_node("Identity", ["label_values"], ["labels"]),
        helper.make_node("Identity", ["score_values"], ["scores"]),
        helper.make_node("Slice", ["image", "i0", "i1", _axis_name(inits)], ["red"]),
        helper.make_node("Squeeze", ["red", _axis_name(inits)], ["red2d"]),
        helper.make_node("Cast", ["red2d"], ["redf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["redf", "c255"], ["m0"]),
        helper.make_node("Sub", ["one", "m0"], ["m1"]),
        helper.make_node("Unsqueeze", ["m0", "ax01"], ["m0u"]),
        helper.make_node("Unsqueeze", ["m1", "ax01"], ["m1u"]),
        helper.make_node("Concat", ["m0u", "m1u"], ["masks"], axis=0),
    ]
    return _model(nodes, [image], outputs, inits)


def _axis_name(inits: list) -> str:
    if not any(t.name == "ax2" for t in inits):
        inits.append(_const("ax2", np.array([2], np.int64)))
    return "ax2"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(
    directory: Path,
    *,
    name: str,
    task: str,
    onnx_bytes: bytes,
    preprocess: dict,
    labels: list[str],
    inputs: list[dict],
    outputs: list[dict],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write model.onnx (+ extra files) and a manifest.json listing their sha256/bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": onnx_bytes, **(extra_files or {})}
    for file_name, data in files.items():
        (directory / file_name).write_bytes(data)
    manifest = {
        "schema_version": 1,
        "name": name,
        "variant": f"test_{task}",
        "task": task,
        "weights": {"random": True},
        "inputs": inputs,
        "outputs": outputs,
        "preprocess": preprocess,
        "labels": labels,
        "engines": [{"format": "onnx", "precision": "fp32", "file": "model.onnx"}],
        "files": {
            file_name: {"sha256": sha256_bytes(data), "bytes": len(data)}
            for file_name, data in files.items()
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def classify_preprocess(size: int = 224, normalize_in_graph: bool = True) -> dict:
    return {
        "resize_mode": "shorter_side_center_crop" if size < 384 else "direct",
        "input_size": [size, size],
        "crop_pct": 0.875 if size < 384 else 1.0,
        "interpolation": "bicubic",
        "mean": list(MEAN),
        "std": list(STD),
        "normalize_in_graph": normalize_in_graph,
    }


def write_classifier(
    directory: Path, name: str = "tiny_cls", size: int = 224, normalize_in_graph: bool = True
) -> Path:
    layout = "NHWC" if normalize_in_graph else "NCHW"
    shape = [-1, size, size, 3] if normalize_in_graph else [-1, 3, size, size]
    dtype = "uint8" if normalize_in_graph else "float32"
    return write_bundle(
        directory,
        name=name,
        task="classify",
        onnx_bytes=classifier_onnx(size, normalize_in_graph),
        preprocess=classify_preprocess(size, normalize_in_graph),
        labels=LABELS,
        inputs=[{"name": "image", "dtype": dtype, "shape": shape, "layout": layout}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, NUM_CLASSES]}],
    )


def write_segmenter(directory: Path, crop: int = 64, stride: int = 43) -> Path:
    return write_bundle(
        directory,
        name="tiny_seg",
        task="segment",
        onnx_bytes=segmenter_onnx(crop),
        preprocess={
            "resize_mode": "fit",
            "input_size": [crop, crop],
            "interpolation": "bilinear",
            "resize_backend": "pil",
            "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375],
            "pixel_range": 255,
            "scale": [192, 64],
            "sliding_window": {"crop": [crop, crop], "stride": [stride, stride]},
        },
        labels=[f"seg{i}" for i in range(SEG_CLASSES)],
        inputs=[
            {"name": "image", "dtype": "uint8", "shape": [-1, crop, crop, 3], "layout": "NHWC"}
        ],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, SEG_CLASSES, crop, crop]}],
    )


def write_detector(directory: Path) -> Path:
    return write_bundle(
        directory,
        name="tiny_det",
        task="detect",
        onnx_bytes=detector_onnx(),
        preprocess={
            "resize_mode": "direct",
            "input_size": [64, 64],
            "interpolation": "bilinear",
            "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375],
            "pixel_range": 255,
        },
        labels=["background", "cat", "dog"],
        inputs=[{"name": "image", "dtype": "uint8", "shape": [-1, -1, 3], "layout": "NHWC"}],
        outputs=[
            {"name": "boxes", "dtype": "float32", "shape": [-1, 4]},
            {"name": "labels", "dtype": "int64", "shape": [-1]},
            {"name": "scores", "dtype": "float32", "shape": [-1]},
            {"name": "masks", "dtype": "float32", "shape": [-1, 1, -1, -1]},
        ],
    )


def slow_classifier_onnx(size: int, matmuls: int) -> bytes:
    """A classifier of the usual contract whose engine run takes long enough for requests
    to queue behind it: the image's rows through `matmuls` MatMul + Tanh layers of width
    3 x size (about matmuls x 0.1 GMAC per image at 224), averaged, then 10 logits."""
    width = 3 * size
    rng = np.random.default_rng(11)
    inits = [
        _const("shape", np.array([0, size, width], np.int64)),
        _const("w", (rng.normal(0, 1, (width, width)) / np.sqrt(width)).astype(np.float32)),
        _const("head", rng.normal(0, 1, (width, NUM_CLASSES)).astype(np.float32)),
        _const("scale", np.float32(255.0)),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["f01"]),
        helper.make_node("Reshape", ["f01", "shape"], ["h0"]),
    ]
    for layer in range(matmuls):
        nodes += [
            helper.make_node("MatMul", [f"h{layer}", "w"], [f"m{layer}"]),
            helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceMean", [f"h{matmuls}"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])
    return _model(nodes, [image], [logits], inits)


def write_slow_classifier(
    directory: Path, name: str = "slow_cls", size: int = 224, matmuls: int = 10
) -> Path:
    """A classifier bundle (slow_classifier_onnx) whose requests queue behind each other."""
    return write_bundle(
        directory,
        name=name,
        task="classify",
        onnx_bytes=slow_classifier_onnx(size, matmuls),
        preprocess=classify_preprocess(size),
        labels=LABELS,
        inputs=[
            {"name": "image", "dtype": "uint8", "shape": [-1, size, size, 3], "layout": "NHWC"}
        ],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, NUM_CLASSES]}],
    )
