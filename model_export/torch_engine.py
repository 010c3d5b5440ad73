"""The eager torch model as a serving engine, for debugging and parity checks.

Registered under the `hornet.engines` entry points (pyproject.toml) as `torch`, so
`hornet serve --engine torch` finds it where the export side is installed, and the
service itself never imports torch or this package.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hornet_bundle import Bundle, EngineUnavailable, Preprocess
from model_export.registry import create_model


class TorchEngine:
    """The eager model rebuilt from the registry and the manifest's checkpoint.

    Takes the same inputs as the bundle's graph; uint8 NHWC is normalised with the
    manifest's mean/std first, since the eager model takes normalised float32 NCHW.
    """

    def __init__(self, bundle: Bundle, *, device: str = "cpu") -> None:
        manifest = bundle.manifest
        if manifest.task != "classify":
            raise EngineUnavailable(f"the torch engine serves classify, not {manifest.task}")
        if manifest.weights.random or not manifest.weights.checkpoint:
            raise EngineUnavailable(
                f"bundle {manifest.name!r} was exported with random weights; the torch "
                "engine cannot rebuild them (it needs manifest.weights.checkpoint)"
            )
        self._device = torch.device(device)
        self._preprocess = manifest.preprocess
        self._output = manifest.outputs[0].name
        self._model = create_model(
            manifest.variant,
            checkpoint=manifest.weights.checkpoint,
            num_classes=len(manifest.labels),
            image_size=manifest.preprocess.input_size[0],
        ).to(self._device)
        self.description = f"torch {torch.__version__} {manifest.variant} on {device}"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        (array,) = inputs.values()
        batch = torch.from_numpy(np.ascontiguousarray(array))
        if batch.dtype == torch.uint8:
            batch = normalize_nchw(batch, self._preprocess)
        with torch.inference_mode():
            logits = self._model(batch.to(self._device))
        return {self._output: logits.float().cpu().numpy()}

    def close(self) -> None:
        self._model = None


def normalize_nchw(batch: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW normalised by the manifest's mean/std (and 0-1 range)."""
    values = batch.float()
    if preprocess.pixel_range == 1:
        values = values / 255.0
    mean = torch.tensor(preprocess.mean, dtype=torch.float32)
    std = torch.tensor(preprocess.std, dtype=torch.float32)
    return ((values - mean) / std).permute(0, 3, 1, 2).contiguous()
