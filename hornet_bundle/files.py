"""The names of a bundle's files and how their contents are fingerprinted."""

from __future__ import annotations

import hashlib
from os import PathLike
from pathlib import PurePosixPath

MANIFEST_NAME = "manifest.json"
ONNX_FP32 = "model.onnx"
# Bundles of schema version 1 may name their fp16 graph `model_fp16.onnx` (the dense
# exporter did); the manifest's `engines` says which file is which, so both load.
ONNX_FP16 = "model.fp16.onnx"
# Post-training static int8 quantization of the fp32 graph (QDQ format).
ONNX_INT8 = "model.int8.onnx"
TRT_FP32 = "model.plan"
TRT_FP16 = "model.fp16.plan"
# TensorRT's timing cache: kept next to the engines to speed up rebuilds, never listed.
TIMING_CACHE = "timing.cache"


def inside_bundle(name: str) -> bool:
    """Whether a file name the manifest lists stays inside the bundle's directory
    (relative, no `..`)."""
    relative = PurePosixPath(name)
    return not relative.is_absolute() and ".." not in relative.parts


def sha256_of(path: str | PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB engines do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
