"""Writing a torch graph to one ONNX file, and reading facts back from it.

The dynamo exporter is torch's default and the only one that lowers rfft2/irfft2 to
the DFT op; torchvision's Mask R-CNN and the fixed-size DFT-free graphs go through the
TorchScript exporter (EXPORT_FACTS.md). Weights stay inside the one file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def export_dynamo(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: list[str],
    max_batch: int,
    opset: int | None = None,
) -> None:
    """The `image` input's first axis dynamic, 1..max_batch (at least 2)."""
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def export_torchscript(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )


def onnx_op_types(path: Path) -> set[str]:
    """Every op type in the graph at `path`: local functions and the subgraphs of
    control-flow nodes (If, Loop, Scan) included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()
    pending = [list(model.graph.node), *(list(f.node) for f in model.functions)]
    while pending:
        for node in pending.pop():
            ops.add(node.op_type)
            for attribute in node.attribute:
                pending.extend(list(g.node) for g in [attribute.g, *attribute.graphs] if g)
    return ops


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
