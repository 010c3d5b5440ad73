"""The model bundle contract: manifest schema, file names, hashing, reader and writer.

A bundle is a directory holding `manifest.json` and the engine files it lists. The
exporter (`model_export`, needs torch) writes bundles; the service (`service`, no torch)
reads them. Both depend on this package and neither on the other; it needs nothing
beyond pydantic and the standard library, but for `hornet_bundle.preprocess` (the image
transforms the manifest's `preprocess` describes: numpy, Pillow, OpenCV), which is
imported on its own.
"""

from hornet_bundle.engine import ENGINE_ENTRY_POINTS, EngineUnavailable, InferenceEngine
from hornet_bundle.files import (
    MANIFEST_NAME,
    ONNX_FP16,
    ONNX_FP32,
    ONNX_INT8,
    TIMING_CACHE,
    TRT_FP16,
    TRT_FP32,
    sha256_of,
)
from hornet_bundle.manifest import (
    DEFAULT_SCORE_THRESHOLD,
    Engine,
    FileEntry,
    Manifest,
    Parity,
    ParityMetric,
    Preprocess,
    SlidingWindow,
    TensorSpec,
    Weights,
)
from hornet_bundle.reader import Bundle, BundleError, load_bundle
from hornet_bundle.versions import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from hornet_bundle.writer import write_manifest

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "ENGINE_ENTRY_POINTS",
    "MANIFEST_NAME",
    "ONNX_FP16",
    "ONNX_FP32",
    "ONNX_INT8",
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "TIMING_CACHE",
    "TRT_FP16",
    "TRT_FP32",
    "Bundle",
    "BundleError",
    "Engine",
    "EngineUnavailable",
    "FileEntry",
    "InferenceEngine",
    "Manifest",
    "Parity",
    "ParityMetric",
    "Preprocess",
    "SlidingWindow",
    "TensorSpec",
    "Weights",
    "load_bundle",
    "sha256_of",
    "write_manifest",
]
