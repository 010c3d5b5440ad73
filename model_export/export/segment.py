"""Segmentation export: one fixed-size tile graph for mmseg's sliding-window inference.

uint8 NHWC tiles [-1, crop, crop, 3] in (normalised inside), logits
[-1, classes, crop, crop] out, resized to the tile as mmseg's `encode_decode` does. The
manifest carries the sliding-window settings; the service tiles, averages and takes the
argmax.

Global Filters: "auto", "matmul", "dense_dft" and "circular_conv" are
`model_export.gf_rewrite`'s DFT-free graphs for the tile's fixed feature sizes (without
that module "auto" falls back to `SeparableDFTBranch`); "dft" keeps rfft2/irfft2 as the
ONNX DFT op through the dynamo exporter. On ONNX Runtime CPU (2 threads) the separable
DFT ran HorFPN's 128x128 GF layer in 1.1 s, the circular conv in 7.8 s.

Parity: ONNX Runtime against the torch model on seeded random tiles, as the largest
logit difference over the largest torch logit (`max_relative_error`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from hornet_bundle import ONNX_FP16, ONNX_FP32, Manifest, write_manifest
from model_export.export import fields, parity
from model_export.export.fp16 import KEEP_FP32_OPS, convert_fp16
from model_export.export.onnx_graph import export_dynamo, export_torchscript
from model_export.export.options import ExportOptions
from model_export.export.session import ort_session
from model_export.gf_mode import REWRITE_MODES, GFMode, check_gf_mode, engine_gf_mode
from model_export.gnconv import fuse_layer_norms
from model_export.separable_dft import has_global_filters, use_separable_dft

GF_REWRITE_MODULE = "model_export.gf_rewrite"
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 2e-2
DEFAULT_BATCH = (1, 8, 64)
DEFAULT_OPSET = 18


class SegmentationTileGraph(nn.Module):
    """uint8 NHWC tiles -> normalised NCHW -> the segmentor's tile-sized logits."""

    def __init__(self, model: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std)


def _gf_rewrite():
    """The DFT-free fixed-size GF rewrite module, or None where it is not installed."""
    if importlib.util.find_spec(GF_REWRITE_MODULE) is None:
        return None
    return importlib.import_module(GF_REWRITE_MODULE)


def _gf_graph(gf_mode: str, model: nn.Module) -> str:
    """The Global Filter graph for a segmentor (`none` without GF layers)."""
    mode = check_gf_mode(gf_mode, GFMode, "segmentation")
    if not has_global_filters(model):
        return "none"
    if mode == GFMode.DFT or _gf_rewrite() is not None:
        return mode
    if mode == GFMode.AUTO:
        return "separable"
    raise ValueError(f"gf_mode {mode!r} needs {GF_REWRITE_MODULE}, which is not installed")


def _tile_preprocess(cfg, tile: int, scale: tuple[int, int] | None) -> dict:
    """The variant's mmseg preprocess at the exported tile size; a tile other than the
    variant's keeps the stride's ratio to the crop (341/512)."""
    pre = cfg.preprocess()
    window = pre["sliding_window"]
    crop = window["crop"][0]
    stride = window["stride"][0] if tile == crop else max(1, int(window["stride"][0] * tile / crop))
    return pre | {
        "input_size": (tile, tile),
        "scale": tuple(scale) if scale is not None else pre["scale"],
        "sliding_window": {"crop": (tile, tile), "stride": (stride, stride)},
    }


def _exported_model(graph: SegmentationTileGraph, gf_graph: str, example, say) -> None:
    """Give `graph` a copy of its model with the Global Filters in `gf_graph` form."""
    model = graph.model
    tile = example.shape[1]
    normalised = (example[:1].permute(0, 3, 1, 2).float() - graph.mean) / graph.std
    if gf_graph in REWRITE_MODES:
        say(f"rewriting Global Filters without DFT ({gf_graph}) for {tile}x{tile} tiles")
        graph.model = _gf_rewrite().rewrite_global_filters(
            copy.deepcopy(model), mode=gf_graph, example_input=normalised
        )
    elif gf_graph == "separable":
        say("replacing Global Filter FFTs by separable DFT matrices")
        graph.model = use_separable_dft(copy.deepcopy(model))
    else:
        graph.model = copy.deepcopy(model)


def _write_onnx(graph, example, path: Path, gf_graph: str, batch, opset: int, say) -> str:
    """The tile graph at `path`; returns the exporter used."""
    exporter = "dynamo" if gf_graph == GFMode.DFT else "torchscript"
    say(f"exporting {fields.variant_of(graph.model)} ({exporter}, opset {opset}) to {path}")
    if exporter == "dynamo":
        export_dynamo(graph, example, path, ["logits"], batch[2], opset)
    else:
        axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
        export_torchscript(graph, example, path, ["logits"], axes, opset)
    return exporter


def tile_parity(path: Path, example: torch.Tensor, reference, tolerance: float, precision: str):
    """The parity record of the graph at `path` against torch's logits on `example`."""
    got = ort_session(path).run(None, {"image": example.numpy()})[0]
    figures = {
        "max_abs_error": parity.max_abs_error(reference, got),
        "max_relative_error": parity.max_relative_error(reference, got),
        "pixel_agreement": parity.argmax_agreement(reference, got, axis=1),
    }
    batch, tile = example.shape[0], example.shape[1]
    inputs = f"{batch} seeded random uint8 tiles {tile}x{tile}, {precision} graph"
    return parity.record(
        path.name, "torch fp32 eager", "max_relative_error", tolerance, figures, inputs
    )


def _verify(out: Path, example, reference, options: ExportOptions, engine) -> tuple[list, list]:
    options.say("checking fp32 parity with ONNX Runtime")
    tolerance = options.tolerance if options.tolerance is not None else FP32_TOLERANCE
    records = [tile_parity(out / ONNX_FP32, example, reference, tolerance, "fp32")]
    engines = [engine(ONNX_FP32, "fp32")]
    options.say("  " + parity.describe(records[-1]))
    if options.fp16:
        options.say(f"converting to fp16: {out / ONNX_FP16}")
        convert_fp16(out / ONNX_FP32, out / ONNX_FP16)
        records.append(tile_parity(out / ONNX_FP16, example, reference, FP16_TOLERANCE, "fp16"))
        engines.append(engine(ONNX_FP16, "fp16"))
        options.say("  " + parity.describe(records[-1]))
    return records, engines


def export_segmentation(model: nn.Module, out_dir: str | Path, options: ExportOptions) -> Manifest:
    """Write a segmentation bundle for `model` (a create_model segmentor) at its tile size.

    `options.scale` replaces the mmseg fit scale (long, short) the service rescales
    images to. Raises ParityError (after writing the bundle and its parity records)
    when ONNX Runtime's logits differ from torch's by more than the tolerance (fp32) or
    FP16_TOLERANCE (fp16), relative to the largest logit.
    """
    cfg = fields.task_cfg(model, "segment")
    tile, batch = cfg.image_size, tuple(options.batch or DEFAULT_BATCH)
    opset = options.opset or DEFAULT_OPSET
    labels = fields.manifest_labels(cfg, model.num_classes, options.labels)
    gf_graph = _gf_graph(options.gf_mode, model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(options.seed)
    shape = (options.parity_batch, tile, tile, 3)
    example = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    graph = SegmentationTileGraph(model, cfg.mean, cfg.std).eval()
    with torch.no_grad():
        reference = graph(example).numpy()
    _exported_model(graph, gf_graph, example, options.say)
    fused_norms = fuse_layer_norms(graph.model)
    exporter = _write_onnx(graph, example, out / ONNX_FP32, gf_graph, batch, opset, options.say)

    def engine(file: str, precision: str) -> dict:
        return fields.onnx_engine(file, precision, engine_gf_mode(gf_graph))

    records, engines = _verify(out, example, reference, options, engine)
    export = {
        "opset": opset,
        "exporter": exporter,
        "image_size": tile,
        "gf_mode": engine_gf_mode(gf_graph),
        "fused_layer_norms": fused_norms,
        "gf_graph": str(gf_graph),
        "batch": list(batch),
        "align_corners": False,
        "fp16": options.fp16,
        "fp16_fp32_ops": list(KEEP_FP32_OPS) if options.fp16 else [],
    }
    common = _manifest_fields(model, options, labels, fields.export_record(export, options))
    manifest = write_manifest(out, common | {"engines": engines, "parity": records})
    parity.raise_on_failure(records, out)
    return manifest


def _manifest_fields(model, options: ExportOptions, labels, export: dict) -> dict:
    """Every manifest field but the engines and parity records."""
    cfg, variant = model.pretrained_cfg, fields.variant_of(model)
    tile, classes = cfg.image_size, model.num_classes
    identity = fields.bundle_identity(
        model,
        options,
        "segment",
        variant,
        lambda variant, _: f"{variant}: one {tile}x{tile} sliding-window tile per batch row",
    )
    return identity | {
        "inputs": [fields.image_input([-1, tile, tile, 3], "RGB tiles, 0-255")],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "layout": "NCHW",
                "shape": [-1, classes, tile, tile],
                "description": "class logits resized to the tile (bilinear)",
            }
        ],
        "preprocess": _tile_preprocess(cfg, tile, options.scale),
        "labels": labels,
        "export": export,
    }
