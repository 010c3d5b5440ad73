"""The one fp16 policy: which ops stay float32, and how the fp16 graph is written.

onnxconverter-common's `op_block_list` replaces its default list, so ours extends it
(EXPORT_FACTS.md). Kept in float32: the hand-written channels-first layer norms'
statistics (ReduceMean/Pow/Sqrt overflow or lose precision in fp16, converter issue
#323), LayerNormalization, Erf (exact GELU), Softmax and the DFT op. The fp16 graph is
`hornet_bundle.ONNX_FP16` (`model.fp16.onnx`), with the fp32 graph's input and output
types.
"""

from __future__ import annotations

import warnings
from pathlib import Path

KEEP_FP32_OPS = ("ReduceMean", "Pow", "Sqrt", "LayerNormalization", "Erf", "Softmax", "DFT")


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations from the fp32 graph `src`, written to `dst`.

    Casts from non-float tensors (the uint8 image, integer sizes) are left as they are;
    the converter would otherwise retarget them to float16 behind consumers that still
    expect float32.
    """
    import onnx
    from onnxconverter_common import float16

    graph = onnx.load(str(src))
    non_float_casts = _non_float_casts(graph)
    # The exporters annotate intermediate values, and the converter places its casts by
    # those annotations rather than by the blocked ops' needs (measured on a tiny
    # HorNet-GF: fp16 logits 4.8e-4 from fp32 with them, 3.6e-4 without): drop them,
    # ONNX Runtime infers types itself.
    del graph.graph.value_info[:]
    with warnings.catch_warnings():
        # One warning per weight below fp16's smallest normal: expected, not actionable.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        graph = float16.convert_float_to_float16(
            graph,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(KEEP_FP32_OPS),
            node_block_list=non_float_casts,
        )
    onnx.save(graph, str(dst))


def _non_float_casts(graph) -> list[str]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(graph).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.value_info, *inferred.input, *inferred.initializer]
        if hasattr(v, "type")
    }
    return [
        node.name
        for node in graph.graph.node
        if node.op_type == "Cast" and types.get(node.input[0]) != onnx.TensorProto.FLOAT
    ]
