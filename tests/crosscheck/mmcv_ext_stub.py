"""A stand-in `mmcv._ext` for the pure-Python mmcv install (MMCV_WITH_OPS=0).

mmseg and mmdet import `mmcv.ops` at import time, whose modules look their compiled
kernels up by name in `mmcv._ext`. The segmentation cross-check runs none of them, so
every name resolves to a function that fails when called, naming the kernel. Detection
needs `nms` and `roi_align_forward`: shared/reference/MMDET_FACTS.md says how to provide
them with torchvision's ops.
"""

from __future__ import annotations

import sys
import types


def _missing(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def kernel(*args, **kwargs):
        raise NotImplementedError(f"mmcv kernel {name!r} is not built (pure-Python mmcv)")

    kernel.__name__ = name
    return kernel


def install() -> types.ModuleType:
    """Register the stand-in as `mmcv._ext` (before mmseg or mmdet is imported)."""
    module = types.ModuleType("mmcv._ext", __doc__)
    module.__getattr__ = _missing
    sys.modules["mmcv._ext"] = module
    return module
