"""ONNX Runtime on the CPU, as the export's parity checks run every graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_session(path: Path, threads: int = 0):
    """A CPU session for `path`, warnings off; `threads` 0 is ONNX Runtime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, inputs: dict[str, np.ndarray], input_name: str) -> dict[str, np.ndarray]:
    """The first output of the graph at `path` for each named batch of `inputs`."""
    session = ort_session(path)
    return {key: session.run(None, {input_name: value})[0] for key, value in inputs.items()}
