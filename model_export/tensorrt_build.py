"""Serialized TensorRT engines from exported ONNX graphs (tensorrt Python API).

One optimisation profile over the batch axis (--batch MIN:OPT:MAX), a timing cache kept
next to the engine so rebuilds are fast, FP16 the way each TensorRT major wants it:
TensorRT 10 takes the fp32 graph plus `BuilderFlag.FP16`; TensorRT 11 networks are
strongly typed and have no precision flags, so FP16 engines are built from the fp16
ONNX graph (EXPORT_FACTS.md). An engine only runs on the GPU architecture and TensorRT
version it was built with: the manifest records both.

Not run in this project's CI (no GPU there); tests that need it are marked `gpu`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

WORKSPACE_BYTES = 4 << 30


class TensorRTUnavailable(RuntimeError):
    """tensorrt or a CUDA GPU is missing here."""


def _gpu() -> tuple[str, str]:
    try:
        import torch
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT engines need torch with CUDA to identify the GPU"
        ) from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA GPU is visible here, and a TensorRT engine must be built on the GPU type "
            "that will run it"
        )
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def tensorrt_module():
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "the tensorrt package is not installed "
            "(pip install 'hornet-serve[gpu]' on a GPU machine)"
        ) from exc
    return tensorrt


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    input_shapes: Mapping[str, tuple[int, ...]],
    batch: tuple[int, int, int],
    *,
    fp16: bool = False,
    fp32_onnx_path: Path | None = None,
    timing_cache: Path | None = None,
) -> dict:
    """Build and serialize an engine; returns the manifest facts about it.

    `input_shapes` gives each input's shape without the batch axis. With `fp16` on
    TensorRT 10, `fp32_onnx_path` (when given) is parsed instead and the FP16 flag set.
    """
    trt = tensorrt_module()
    gpu_name, capability = _gpu()
    major = int(trt.__version__.split(".")[0])
    source = onnx_path
    use_flag = fp16 and major < 11 and hasattr(trt.BuilderFlag, "FP16")
    if use_flag and fp32_onnx_path is not None:
        source = fp32_onnx_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if use_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in input_shapes.items():
        profile.set_shape(name, (batch[0], *shape), (batch[1], *shape), (batch[2], *shape))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {source.name} (see its log above)"
        )
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
    }
