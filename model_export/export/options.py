"""The settings of one export, for every task: `export(model, out_dir, ExportOptions())`.

Torch-free, so the command line can build them before torch is imported. A field that
applies to one task only says so; a None default means "the task's own default".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from model_export.gf_mode import GFMode

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ParityImages:
    """The images (uint8 HWC arrays) a detection export is checked on, and their
    description in the manifest's parity record."""

    images: Sequence[Any]
    description: str


@dataclass(frozen=True)
class ExportOptions:
    # The weights: loaded into the model (strictly, through its checkpoint_filter_fn)
    # and recorded with their sha256. Without one the bundle is marked random unless
    # the model's pretrained_cfg.extra says it was trained.
    checkpoint: str | PathLike | None = None
    # A registry variant is built with these; a model passed in is used as it is.
    num_classes: int | None = None
    image_size: int | None = None
    # An fp16 graph next to the fp32 one, verified against it (classify, segment).
    fp16: bool = False
    # Precisions the bundle is also verified at once written (("bf16",): OpenVINO's bf16
    # over the fp32 graph, model_export.export.precision), each recorded in the manifest.
    verify_precisions: Sequence[str] = ()
    # The folder of images those are verified on besides seeded random ones (pictures
    # like those the model will serve); None: the scikit-image photographs.
    verify_images: str | PathLike | None = None
    # classify: an int8 graph too, calibrated on the images of this folder and verified
    # against the fp32 graph (model_export.export.int8); the export fails when its top-1
    # agreement with fp32 is under min_agreement.
    int8_calibration: str | PathLike | None = None
    min_agreement: float = 0.99
    # classify: ("onnx",) or ("onnx", "tensorrt").
    formats: Sequence[str] = ("onnx",)
    # MIN:OPT:MAX batch sizes of the graph (classify 1:8:32, segment 1:8:64 by default;
    # detection graphs take one image per call and have no batch axis).
    batch: tuple[int, int, int] | None = None
    gf_mode: GFMode | str = GFMode.AUTO
    # classify: dtype of the torch reference the graph is checked against.
    reference: str = "float32"
    # One name per output class (default: pretrained_cfg.extra["labels"], else the
    # variant's label set).
    labels: Sequence[str] | None = None
    name: str | None = None
    demo: bool = False
    description: str = ""
    # More entries for the manifest's `export` record, after the exporter's own (the demo
    # builder's `demo_training`); one the exporter writes itself is refused.
    export_extra: Mapping[str, Any] | None = None
    # segment: the (long, short) scale images are fitted to, replacing the variant's.
    scale: tuple[int, int] | None = None
    opset: int | None = None
    # fp32 parity tolerance (default: the task's).
    tolerance: float | None = None
    # segment: how many seeded random tiles parity is checked on; segment, detect: seed.
    parity_batch: int = 2
    seed: int = 0
    # detect: the graph is traced on the first size and checked on all (seeded noise),
    # or on `parity_images` when given.
    image_sizes: Sequence[tuple[int, int]] = ((480, 640), (400, 320))
    parity_images: ParityImages | None = None
    progress: Progress | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
