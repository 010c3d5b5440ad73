"""The model bundle's `manifest.json`: the one contract between export and serving.

Everything the service needs to turn an uploaded image into an answer is here: the
input contract, the preprocessing of the official evaluation pipeline, the labels and
the outputs; and what the export verified (`parity`). Manifests of an older schema
version are read through `hornet_bundle.versions`, which says which versions it reads.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from hornet_bundle.versions import SCHEMA_VERSION, upgrade

Task = Literal["classify", "segment", "detect"]
DType = Literal["uint8", "float32", "float16", "int64", "int32", "bool"]
# What a bundle may be served at: its engines' file precisions (int8: a quantized QDQ
# graph), and bf16 (OpenVINO runs the fp32 graph at it).
Precision = Literal["fp32", "fp16", "bf16", "int8"]
# A side of an image the preprocessing makes (pixels): the service allocates batches of
# them, so a manifest's size is bounded as an upload's is (8192 x 8192 x 3 is 200 MB).
MAX_SIDE = 8192
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    """One graph input or output. `-1` marks a dynamic axis (the batch axis first)."""

    name: str
    dtype: DType
    shape: list[Annotated[int, Field(ge=-1)]]
    layout: Literal["NCHW", "NHWC"] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _axes_sized(self) -> TensorSpec:
        if 0 in self.shape:
            raise ValueError(f"shape {self.shape}: an axis is -1 (dynamic) or at least 1")
        return self

    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of an image input of fixed size, by its layout; else None."""
        if self.layout is None or len(self.shape) < 3:
            return None
        height, width = self.shape[-3:-1] if self.layout == "NHWC" else self.shape[-2:]
        return None if -1 in (height, width) else (height, width)


class SlidingWindow(_Strict):
    """mmseg's slide inference: crop tiles of `crop`, step `stride`, average overlaps."""

    crop: tuple[Side, Side]
    stride: tuple[Side, Side]

    @model_validator(mode="after")
    def _tiles_cover_the_image(self) -> SlidingWindow:
        # a stride past the crop leaves rows and columns no tile covers: their logits
        # would be 0 / 0
        if self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]:
            raise ValueError(f"stride {list(self.stride)} is past crop {list(self.crop)}")
        return self


class Preprocess(_Strict):
    """How a decoded RGB image becomes the graph input.

    resize_mode:
      - "shorter_side_center_crop": resize the shorter side to int(size / crop_pct)
        (aspect kept, long side int(scale * long / short)), then center-crop size x size
        with top = int(round((h - size) / 2)). timm/torchvision eval transform, size < 384.
      - "direct": resize straight to size x size, no crop (HorNet at 384).
      - "fit": keep aspect ratio so the image fits `scale` (long, short) as mmseg's
        Resize(keep_ratio=True); then `sliding_window` tiles of the graph's input size.
    mean/std are given on the 0-255 scale when `pixel_range` is 255, else on 0-1.
    normalize_in_graph: the graph takes raw uint8 pixels and normalises inside.
    """

    resize_mode: Literal["shorter_side_center_crop", "direct", "fit"]
    input_size: tuple[Side, Side]
    crop_pct: float | None = Field(None, gt=0, le=1)
    interpolation: Literal["bicubic", "bilinear", "nearest"]
    resize_backend: Literal["pil", "opencv"] = "pil"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_range: Literal[1, 255] = 1
    normalize_in_graph: bool = True
    scale: tuple[Side, Side] | None = None
    sliding_window: SlidingWindow | None = None


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Engine(_Strict):
    """One runnable artefact of the bundle.

    TensorRT engines only run on the GPU architecture and TensorRT version they were
    built with; those facts are recorded so the service can refuse a mismatch clearly.
    """

    format: Literal["onnx", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"]
    file: str
    gf_mode: Literal["matmul", "circular_conv", "dft", "none"] = "none"
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    batch_profile: tuple[int, int, int] | None = None


ParityMetric = Literal["relative_l2_error", "max_relative_error", "box_score_error"]


# The lowest detection score `/detect` answers unless asked for less (the service's
# default score_threshold): a reduced-precision detector's parity record compares the
# detections scored this or more (model_export.export.precision).
DEFAULT_SCORE_THRESHOLD = 0.5


class Parity(_Strict):
    """Verification of one engine against a reference at export time.

    `metric` names the figure that `tolerance` bounds (passed: figure < tolerance, plus
    `min_mask_pixel_agreement` for detection); every figure is stored under its own
    name, and a figure that does not apply to the task is None.
    """

    engine: str
    reference: str
    # The precision `engine` ran at when not its file's own (bf16: OpenVINO's inference
    # precision over the fp32 graph), or int8 for the quantized graph, whose figures
    # depend on the CPU's integer instructions; and the runtime and CPU that ran it. Both
    # None for the export's own checks of its fp32 and fp16 files.
    precision: Precision | None = None
    runtime: str | None = None
    metric: ParityMetric
    tolerance: float
    passed: bool
    max_abs_error: float
    # classify: ||got - ref|| / ||ref|| over all logits (L2 norms)
    relative_l2_error: float | None = None
    # segment: max |got - ref| / max |ref| over all logits
    max_relative_error: float | None = None
    # detect: max(box error / largest reference coordinate, score abs error), paired
    box_score_error: float | None = None
    # classify: fraction of images whose top-1 class agrees, and its lower limit where
    # the record has one (int8: --min-agreement)
    top1_agreement: float | None = None
    min_top1_agreement: float | None = None
    # segment: fraction of pixels whose argmax class agrees
    pixel_agreement: float | None = None
    # detect: the detections paired: the export's own checks, every image's one to one
    # (same count, same labels); a bf16 record, those scored DEFAULT_SCORE_THRESHOLD or
    # more in either run
    detections_paired: bool | None = None
    # detect: fraction of 0.5-thresholded mask pixels that agree, its lower limit, and
    # the largest mask probability difference
    mask_pixel_agreement: float | None = None
    min_mask_pixel_agreement: float | None = None
    mask_max_abs_error: float | None = None
    inputs: str = ""

    @model_serializer(mode="wrap")
    def _without_unset_precision(self, handler: SerializerFunctionWrapHandler) -> dict:
        """`precision`, `runtime` and `min_top1_agreement` are written only when set, so
        the export's own records read as before in a hornet-serve that predates them."""
        data = handler(self)
        for name in ("precision", "runtime", "min_top1_agreement"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _metric_is_recorded(self) -> Parity:
        if getattr(self, self.metric) is None:
            raise ValueError(f"parity metric {self.metric!r} has no value")
        return self

    @property
    def value(self) -> float:
        """The figure that `tolerance` bounds."""
        return getattr(self, self.metric)


class Weights(_Strict):
    random: bool
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None


class Manifest(_Strict):
    """One bundle's manifest. Older schema versions are upgraded as they are read."""

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str
    variant: str
    task: Task
    demo: bool = False
    description: str = ""
    weights: Weights
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocess: Preprocess
    labels: list[str] = Field(min_length=1)
    engines: list[Engine] = Field(min_length=1)
    files: dict[str, FileEntry]
    export: dict = Field(default_factory=dict)
    parity: list[Parity] = Field(default_factory=list)
    tools: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _read_older_versions(cls, data: object) -> object:
        return upgrade(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _input_is_the_preprocessed_size(self) -> Manifest:
        # The service makes images of preprocess.input_size for the graph's first input:
        # a graph of another fixed size would refuse every batch (or warm-up) with the
        # runtime's own message
        window = self.preprocess.sliding_window
        if window is not None and tuple(window.crop) != tuple(self.preprocess.input_size):
            raise ValueError(
                f"preprocess.sliding_window.crop {list(window.crop)} is not "
                f"preprocess.input_size {list(self.preprocess.input_size)}: each tile is one input"
            )
        fixed = self.inputs[0].image_size()
        if fixed is not None and fixed != tuple(self.preprocess.input_size):
            raise ValueError(
                f"preprocess.input_size {list(self.preprocess.input_size)} is not the size of "
                f"input {self.inputs[0].name!r} ({self.inputs[0].layout} {self.inputs[0].shape})"
            )
        return self

    @model_validator(mode="after")
    def _a_label_per_class(self) -> Manifest:
        # The answers name each class by its label: a class without one was a 500
        # (IndexError) for every image whose top class it was
        logits = self.outputs[0]
        axis = {"classify": (2, -1), "segment": (4, 1)}.get(self.task)
        if axis is None or len(logits.shape) != axis[0] or logits.shape[axis[1]] == -1:
            return self
        classes = logits.shape[axis[1]]
        if classes != len(self.labels):
            raise ValueError(
                f"{len(self.labels)} labels for the {classes} classes of output "
                f"{logits.name!r} {logits.shape}: one label per class"
            )
        return self

    @model_validator(mode="after")
    def _engines_are_listed_files(self) -> Manifest:
        missing = [e.file for e in self.engines if e.file not in self.files]
        if missing:
            raise ValueError(f"engine files not listed under 'files': {missing}")
        return self

    def verified_precisions(self) -> set[str]:
        """The precisions this bundle may be served at without --allow-unverified-precision:
        fp32, the precision it was exported and checked in, and every other precision with
        a passed parity record (an fp16 or int8 engine file's, or a `hornet verify` run's)
        and no failed one (int8 is checked on each runtime that serves it)."""
        file_precision = {e.file: e.precision for e in self.engines}
        checked: dict[str | None, bool] = {}
        for p in self.parity:
            precision = p.precision or file_precision.get(p.engine)
            checked[precision] = checked.get(precision, True) and p.passed
        return {"fp32"} | {precision for precision, ok in checked.items() if ok and precision}

    def engine_for(self, fmt: str, precision: str | None = None) -> Engine:
        """The engine of a format (and precision, when given); fp32 preferred."""
        found = [e for e in self.engines if e.format == fmt]
        if precision is not None:
            found = [e for e in found if e.precision == precision]
        if not found:
            have = [f"{e.format}/{e.precision}" for e in self.engines]
            raise LookupError(
                f"bundle {self.name!r} has no {fmt} engine"
                f"{'' if precision is None else ' in ' + precision}; it has {have}"
            )
        return sorted(found, key=lambda e: e.precision != "fp32")[0]
