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


@pytest.fixture(scope="session")
def tiny_mmdet_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Cascade Mask R-CNN (the released detectors' layout, seeded weights, COCO
    labels) exported once for the whole run."""
    from tests.helpers.dense_tiny import export_tiny_mmdet_detector

    out = tmp_path_factory.mktemp("tiny_mmdet") / "cascade_mask_rcnn_hornet_tiny_7x7"
    export_tiny_mmdet_detector(out)
    return out
