"""Suite-wide settings: `gpu` tests run only where CUDA is present."""

from __future__ import annotations

import shutil

import pytest


def _cuda_reason() -> str | None:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return None
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (no nvidia-smi, no CUDA in torch or onnxruntime)"
    return "a GPU is present but neither torch nor onnxruntime can use CUDA here"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
