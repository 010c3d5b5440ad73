"""The Global Filter graph an export writes (`--gf-mode`): the modes, named once.

Torch-free, so the command line can offer the choices without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class GFMode(StrEnum):
    """How the GF layers' FFT global branch is written into the exported graph.

    The first four are DFT-free (`model_export.gf_rewrite`, for the graph's fixed
    feature sizes): AUTO picks per layer (DENSE_DFT on small maps, MATMUL above),
    MATMUL is the separable real DFT as MatMuls, DENSE_DFT one MatMul over the whole
    map, CIRCULAR_CONV a wrap-padded depthwise convolution. DFT keeps rfft2/irfft2 as
    the ONNX DFT op (dynamo exporter; slow on ONNX Runtime CPU, TensorRT >= 11.2 only).
    """

    AUTO = "auto"
    MATMUL = "matmul"
    DENSE_DFT = "dense_dft"
    CIRCULAR_CONV = "circular_conv"
    DFT = "dft"


REWRITE_MODES = (GFMode.AUTO, GFMode.MATMUL, GFMode.DENSE_DFT, GFMode.CIRCULAR_CONV)


def check_gf_mode(value: str, allowed: Iterable[GFMode], task: str) -> GFMode:
    """`value` as a GFMode when `task` export supports it; a ValueError naming the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = tuple(mode.value for mode in allowed)
        raise ValueError(
            f"gf_mode {value!r} is not supported for {task} export; use one of {choices}"
        )
    return GFMode(value)


def engine_gf_mode(graph: str) -> str:
    """The manifest's coarse form of a GF graph (Engine.gf_mode): the DFT written as
    MatMuls (auto, dense_dft, the separable any-size form) is "matmul"; "none" and the
    other modes stay as they are."""
    return "matmul" if graph in (GFMode.AUTO, GFMode.DENSE_DFT, "separable") else str(graph)
