"""What an engine that runs a bundle promises, for the service and for engine plugins.

The service builds its own engines (ONNX Runtime, TensorRT); other packages contribute
engines under the `hornet.engines` entry-point group (the export side registers `torch`,
the eager model for debugging). A plugin is called as `factory(bundle, device=...)`
with a `hornet_bundle.Bundle` and returns an `InferenceEngine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: the contract needs nothing beyond pydantic
    import numpy as np

ENGINE_ENTRY_POINTS = "hornet.engines"


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run this bundle here (missing runtime, GPU, file...)."""


class InferenceEngine(Protocol):
    """Named numpy inputs in, named numpy outputs out; called from one thread at a time.

    An engine may also offer `sibling() -> InferenceEngine | None`: another instance,
    run from another thread, sharing this one's weights (None where it cannot); the
    service's --instances use it instead of loading the bundle again."""

    description: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
