"""Verifying a bundle at a precision it has no graph of its own for: bf16 on OpenVINO.

    hornet verify bundles/t7 --precision bf16
    hornet export --variant hornet_tiny_7x7 --verify-precision bf16

bf16 is OpenVINO's inference precision over the bundle's fp32 graph, so nothing new is
written but the evidence: the graph runs through the engine the service serves it with
(the `openvino` entry point of `hornet.engines`, found by name: the exporter imports no
service code) and through ONNX Runtime in fp32 (the graph the export verified against
torch), on the images the export checks (seeded random images, and the scikit-image
photographs), and the figures go into the manifest as a parity record with `precision`
and `runtime` set; `hornet serve` refuses a precision without a passed record. Torch is
not needed, except for detection bundles (the pairing of detections is the exporter's).

Tolerances, per task, of the bf16 outputs against fp32:
- classify: relative L2 error of the logits under 2e-2, and the same top-1 class on
  every photograph (`top1_agreement` is over all images; random images of a random-weight
  model have near-ties that may flip);
- segment: largest logit difference under 5e-2 of the largest logit;
- detect: detections paired one to one, boxes and scores within 2e-2, and 0.99 of the
  0.5-thresholded mask pixels agreeing.
The segment and detect bounds were set without bf16 hardware to measure them on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hornet_bundle import (
    DEFAULT_SCORE_THRESHOLD,
    ENGINE_ENTRY_POINTS,
    Bundle,
    EngineUnavailable,
    Manifest,
    load_bundle,
)
from hornet_bundle.host import runtime_on
from hornet_bundle.preprocess import classification_input, fit_image, tile, window_boxes
from hornet_bundle.writer import rewrite_manifest
from model_export.export import parity
from model_export.export.core import VERIFIABLE_PRECISIONS
from model_export.export.errors import ExportError
from model_export.export.session import ort_session

TOLERANCES = {"classify": 2e-2, "segment": 5e-2, "detect": 2e-2}
MIN_MASK_PIXEL_AGREEMENT = 0.99
# The lowest score `/detect` answers unless asked for less (the service's default
# `score_threshold`, from the bundle package both read): the detections a reduced
# precision must leave as they are.
ANSWER_SCORE = DEFAULT_SCORE_THRESHOLD
RANDOM_IMAGES = 4
SEED = 0
DETECT_SIZES = ((480, 640), (400, 320))
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Images per engine call when a folder's many are verified (bounds the engines' memory).
VERIFY_BATCH = 16

Run = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Pictures:
    """The pictures a precision is verified on, and what the record calls them."""

    images: list[np.ndarray]
    name: str


def image_files(directory: str | PathLike) -> list[Path]:
    """The image files under `directory`, recursively, sorted by path; ValueError when it
    is not a folder."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def verification_files(directory: str | PathLike) -> list[Path]:
    """`image_files` of a folder to verify on; ValueError when it holds none."""
    files = image_files(directory)
    if not files:
        raise ValueError(f"image folder {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_pictures(directory: str | PathLike) -> Pictures:
    """The images of a folder (`read_picture`) to verify on instead of the photographs:
    pictures like those the model will serve."""
    files = verification_files(directory)
    return Pictures([np.asarray(read_picture(path)) for path in files], f"images of {directory}")


def read_picture(path: Path) -> Image.Image:
    """An image file as the service sees an upload of it: turned upright as its EXIF
    orientation says, RGB; ValueError when it cannot be read."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {path} cannot be read: {exc}") from exc


def chunked(
    run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int = VERIFY_BATCH
) -> np.ndarray:
    """`run` over `batch` `size` items at a time (bounding the engines' memory), its
    outputs joined."""
    return np.concatenate([run(batch[i : i + size]) for i in range(0, len(batch), size)])


def classification_inputs(images: list[np.ndarray], preprocess) -> np.ndarray:
    """RGB images as a classifier's input batch (its resize and centre crop)."""
    return np.stack([classification_input(Image.fromarray(i), preprocess) for i in images])


def photographs() -> list[np.ndarray]:
    """The scikit-image photographs the classifier export checks (uint8 RGB)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ExportError(
            "precision verification runs the scikit-image photographs: pip install scikit-image"
        ) from exc
    return [np.asarray(getattr(data, name)()) for name in PHOTO_NAMES]


def precision_engine(bundle: Bundle, precision: str):
    """The served engine that runs `bundle` at `precision` (the `openvino` entry point)."""
    found = metadata.entry_points(group=ENGINE_ENTRY_POINTS, name="openvino")
    if not found:
        raise ExportError(
            f"no {ENGINE_ENTRY_POINTS!r} entry point named 'openvino': reinstall hornet-serve"
        )
    try:
        return next(iter(found)).load()(bundle, device="cpu", precision=precision)
    except (EngineUnavailable, ImportError) as exc:
        raise ExportError(f"{precision} cannot be verified here: {exc}") from exc


def verify_precision(
    bundle_dir: str | PathLike,
    precision: str,
    say: Callable[[str], None] = lambda _: None,
    images: str | PathLike | None = None,
) -> Manifest:
    """Check `precision` against the bundle's fp32 graph and record the parity record in
    its manifest (replacing an earlier one for that precision). On the scikit-image
    photographs, or on the images of the folder `images` (pictures like those the model
    will serve: a detector trained on X-rays is verified on X-rays) besides the seeded
    random ones.

    Raises ValueError for a precision or bundle this cannot verify, ExportError when the
    engine cannot run it here, ParityError (after writing the failed record) beyond
    tolerance.
    """
    if precision not in VERIFIABLE_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} cannot be verified; one of {VERIFIABLE_PRECISIONS}"
        )
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    image = manifest.inputs[0]
    if (image.dtype, image.layout) != ("uint8", "NHWC"):
        raise ValueError(f"{bundle.path}: verification needs a uint8 NHWC image input")
    pictures = Pictures(photographs(), "photos") if images is None else folder_pictures(images)
    reference_file = manifest.engine_for("onnx", "fp32").file
    names = [output.name for output in manifest.outputs]
    session = ort_session(bundle.file(reference_file))
    engine = precision_engine(bundle, precision)
    say(f"verifying {bundle.path} at {precision} ({engine.description}) against fp32")

    def reference(x: np.ndarray) -> list[np.ndarray]:
        return session.run(names, {image.name: x})

    def candidate(x: np.ndarray) -> list[np.ndarray]:
        out = engine.run({image.name: x})
        return [out[name] for name in names]

    try:
        figures, inputs, passed = RECORDERS[manifest.task](manifest, reference, candidate, pictures)
    finally:
        engine.close()
    metric = METRICS[manifest.task]
    tolerance = TOLERANCES[manifest.task]
    record = parity.record(
        reference_file,
        f"onnxruntime fp32 {reference_file}",
        metric,
        tolerance,
        figures,
        inputs,
        passed,
    ) | {"precision": precision, "runtime": runtime_on(engine.description)}
    kept = [p.model_dump(mode="json") for p in manifest.parity if p.precision != precision]
    written = rewrite_manifest(bundle, {"parity": [*kept, record]})
    say("  " + parity.describe(record))
    parity.raise_on_failure([record], bundle.path)
    return written


# ----------------------------------------------------------------------------- tasks


def _classify(
    manifest: Manifest, reference: Run, candidate: Run, pictures: Pictures
) -> tuple[dict, str, bool]:
    pre = manifest.preprocess
    height, width = pre.input_size
    rng = np.random.default_rng(SEED)
    batches = {
        "random": rng.integers(0, 256, (RANDOM_IMAGES, height, width, 3), dtype=np.uint8),
        "pictures": classification_inputs(pictures.images, pre),
    }
    refs = {k: chunked(lambda x: reference(x)[0], v) for k, v in batches.items()}
    outs = {k: chunked(lambda x: candidate(x)[0], v) for k, v in batches.items()}
    ref, got = np.concatenate(list(refs.values())), np.concatenate(list(outs.values()))
    agree = parity.argmax_agreement(refs["pictures"], outs["pictures"], axis=-1)
    figures = {
        "max_abs_error": parity.max_abs_error(ref, got),
        "relative_l2_error": parity.relative_l2_error(ref, got),
        "top1_agreement": parity.argmax_agreement(ref, got, axis=-1),
    }
    count = len(batches["pictures"])
    inputs = (
        f"random: {RANDOM_IMAGES}, {pictures.name}: {count}; "
        f"top-1 agreement on the {pictures.name} {agree:.3f} (must be 1)"
    )
    return figures, inputs, agree == 1.0


def _segment(
    manifest: Manifest, reference: Run, candidate: Run, pictures: Pictures
) -> tuple[dict, str, bool]:
    pre = manifest.preprocess
    crop = pre.input_size
    window = pre.sliding_window
    rng = np.random.default_rng(SEED)
    tiles = list(rng.integers(0, 256, (2, *crop, 3), dtype=np.uint8))
    for picture in pictures.images:
        fitted = fit_image(Image.fromarray(picture), pre.scale, pre.resize_backend)
        box = next(window_boxes(fitted.shape[0], fitted.shape[1], window))
        tiles.append(tile(fitted, box, crop))
    batch = np.stack(tiles)
    ref = chunked(lambda x: reference(x)[0], batch)
    got = chunked(lambda x: candidate(x)[0], batch)
    figures = {
        "max_abs_error": parity.max_abs_error(ref, got),
        "max_relative_error": parity.max_relative_error(ref, got),
        "pixel_agreement": parity.argmax_agreement(ref, got, axis=1),
    }
    inputs = f"2 seeded random tiles and the first tile of {len(tiles) - 2} {pictures.name}, {crop}"
    return figures, inputs, True


def answered_pairs(
    ref: list[np.ndarray], got: list[np.ndarray], tolerance: float
) -> tuple[list[tuple[int, int]], list[str]]:
    """Pair each detection `/detect` answers by default (score >= ANSWER_SCORE) in either
    run with the other run's detection of the same label and nearest box, one to one,
    the highest scores first, looking among all the other run's detections (a score of
    0.51 against 0.49 is the same detection); the pairs (ref index, got index), and a
    line for each answered detection without a counterpart whose box is within
    `tolerance` of the run's largest box coordinate.

    Detections under ANSWER_SCORE are not compared: near the graph's own score threshold
    (0.05) and through NMS they come and go with any change of arithmetic (on 30 scenes
    like the demo detector's training images, bf16's full lists did not pair one to one
    with fp32's on 12, its answered detections paired on all 30), and no one is answered
    them unless asking."""
    used: tuple[set[int], set[int]] = (set(), set())
    pairs: list[tuple[int, int]] = []
    problems: list[str] = []
    for side, (mine, theirs) in enumerate(((ref, got), (got, ref))):
        scale = max(float(np.abs(mine[0]).max(initial=0.0)), 1.0)
        for i in map(int, np.argsort(-mine[2], kind="stable")):
            if mine[2][i] < ANSWER_SCORE or i in used[side]:
                continue
            distance = np.abs(theirs[0] - mine[0][i]).max(1, initial=0.0)
            distance[theirs[1] != mine[1][i]] = np.inf
            distance[sorted(used[1 - side])] = np.inf
            j = int(np.argmin(distance)) if distance.size else -1
            if j < 0 or distance[j] > tolerance * scale:
                run = "fp32" if side == 0 else "the candidate's"
                box = np.round(mine[0][i]).astype(int).tolist()
                problems.append(
                    f"{run} label {int(mine[1][i])} at {box} (score {float(mine[2][i]):.2f}) "
                    "has no counterpart"
                )
                continue
            used[side].add(i)
            used[1 - side].add(j)
            pairs.append((i, j) if side == 0 else (j, i))
    return sorted(pairs), problems


def _detect(
    manifest: Manifest, reference: Run, candidate: Run, pictures: Pictures
) -> tuple[dict, str, bool]:
    rng = np.random.default_rng(SEED)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in DETECT_SIZES]
    images += pictures.images
    tolerance = TOLERANCES["detect"]
    worst = {"max_abs_error": 0.0, "box_score_error": 0.0, "mask_max_abs_error": 0.0}
    agreement, problems, answered = 1.0, [], 0
    for image in images:
        ref, got = reference(image), candidate(image)
        where = f"{image.shape[0]}x{image.shape[1]}"
        pairs, unpaired = answered_pairs(ref, got, tolerance)
        problems += [f"{where}: {problem}" for problem in unpaired]
        answered += len(pairs)
        if not pairs:
            continue
        r, g = (np.array(index) for index in zip(*pairs, strict=True))
        score = parity.max_abs_error(ref[2][r], got[2][g])
        figures = {
            "max_abs_error": max(parity.max_abs_error(ref[0][r], got[0][g]), score),
            "box_score_error": max(parity.max_relative_error(ref[0][r], got[0][g]), score),
            "mask_max_abs_error": parity.max_abs_error(ref[3][r], got[3][g]),
        }
        worst = {k: max(v, figures[k]) for k, v in worst.items()}
        agreement = min(agreement, float(((ref[3][r] > 0.5) == (got[3][g] > 0.5)).mean()))
    figures = worst | {
        "detections_paired": not problems and answered > 0,
        "mask_pixel_agreement": agreement,
        "min_mask_pixel_agreement": MIN_MASK_PIXEL_AGREEMENT,
    }
    if not answered:  # nothing compared is nothing verified
        problems.append(f"no detection scored {ANSWER_SCORE} or more in either run")
    shapes = ", ".join(f"{i.shape[0]}x{i.shape[1]}" for i in images)
    inputs = (
        f"seeded random images and {pictures.name} {shapes}; the {answered} detections scored "
        f"{ANSWER_SCORE} or more (what /detect answers by default) compared"
        + "".join(f"; {p}" for p in problems)
    )
    return figures, inputs, not problems and agreement >= MIN_MASK_PIXEL_AGREEMENT


RECORDERS = {"classify": _classify, "segment": _segment, "detect": _detect}
METRICS = {
    "classify": "relative_l2_error",
    "segment": "max_relative_error",
    "detect": "box_score_error",
}
