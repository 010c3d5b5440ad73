"""`hornet export` and `hornet list`, the exporter's subcommands of the `hornet` command
(hornet_cli), contributed through the `hornet.commands` entry points. Both need torch
(the export extra); without it they say so in one sentence.

Export exits non-zero on any failure, including a parity check beyond tolerance.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from hornet_cli import Command
from model_export.export.core import VERIFIABLE_PRECISIONS
from model_export.gf_mode import GFMode

EXPORT_EPILOG = """\
Without --checkpoint the weights are RANDOM: the bundle is marked so and is only good
for testing the pipeline. --format tensorrt needs the tensorrt package and a CUDA GPU of
the type that will serve the engine; --format all writes the ONNX bundle first and
keeps it even when the TensorRT step cannot run.
"""

# Import names of what the `export` extra installs (pyproject.toml).
EXPORT_MODULES = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "onnx",
    "onnxscript",
    "onnxconverter_common",
)


def missing_export_modules() -> list[str]:
    """The export extra's modules this environment lacks (the serve images lack them all)."""
    return [name for name in EXPORT_MODULES if not _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # an import hook that refuses the module
        return False


def _export_extra_missing(command: str) -> bool:
    """True, after saying so in one sentence, when the export extra is not installed."""
    missing = missing_export_modules()
    if missing:
        print(
            f"hornet {command}: error: {', '.join(missing)} not installed; this command needs "
            "the export extra: pip install 'hornet-serve[export]'",
            file=sys.stderr,
        )
    return bool(missing)


def _batch(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3 or not (1 <= values[0] <= values[1] <= values[2]):
        raise argparse.ArgumentTypeError(
            f"expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}"
        )
    return values  # type: ignore[return-value]


def export_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--variant", required=True, help="variant or alias (see `hornet list`)")
    parser.add_argument("--checkpoint", type=Path, help="official .pth or .safetensors file")
    parser.add_argument("--num-classes", type=int, help="e.g. 1000 for a 22k checkpoint's 1k head")
    parser.add_argument(
        "--image-size", type=int, help="serve at this square size (GF filters resized)"
    )
    parser.add_argument(
        "--fp16", action="store_true", help="also write a verified fp16 graph/engine"
    )
    parser.add_argument("--format", choices=("onnx", "tensorrt", "all"), default="onnx")
    parser.add_argument(
        "--batch",
        type=_batch,
        metavar="MIN:OPT:MAX",
        help="dynamic batch range (TensorRT optimisation profile), default 1:8:32 "
        "(segmentation 1:8:64)",
    )
    parser.add_argument(
        "--gf-mode",
        choices=[mode.value for mode in GFMode],
        default=GFMode.AUTO.value,
        help="Global Filter graph: auto (DFT-free), or keep the ONNX DFT op (dft)",
    )
    parser.add_argument(
        "--reference",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of the torch reference the graph is verified against",
    )
    parser.add_argument(
        "--verify-precision",
        action="append",
        choices=VERIFIABLE_PRECISIONS,
        default=[],
        help="also verify the bundle at this precision (bf16: OpenVINO on this CPU) and "
        "record it in the manifest; `hornet serve` refuses unverified precisions",
    )
    parser.add_argument(
        "--verify-images",
        type=Path,
        metavar="DIR",
        help="verify --verify-precision on the images of DIR (searched recursively; "
        "pictures like those the model will serve) instead of the scikit-image photographs",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 graph (classifiers), calibrated on --calibration and verified "
        "against fp32 on ONNX Runtime and OpenVINO",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="folder of images (searched recursively) like those the model will serve, for "
        "--int8; every fifth is held out to verify",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        metavar="FRACTION",
        help="--int8 fails when fewer of the verification images keep fp32's top-1 class "
        "(default 0.99)",
    )
    parser.add_argument("--out", type=Path, help="bundle directory (default bundles/<variant>)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def export_variant(args: argparse.Namespace) -> int:
    """Run `hornet export` with its parsed arguments; returns the exit status."""
    if _export_extra_missing("export"):
        return 1
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        manifest = run_export(args, progress)
    except Exception as exc:  # every failure: one clear line and a non-zero exit
        from model_export.checkpoint import CheckpointError
        from model_export.export import ExportError

        known = (ExportError, CheckpointError, KeyError, ValueError, FileNotFoundError)
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if not isinstance(exc, known):
            reason = f"{type(exc).__name__}: {exc}"
        print(f"hornet export: error: {reason}", file=sys.stderr)
        return 1
    print(summary(manifest, Path(args.out), time.perf_counter() - started))
    return 0


def run_export(args: argparse.Namespace, progress):
    from model_export.registry import get_variant

    variant = get_variant(args.variant)
    args.out = args.out or Path("bundles") / variant.name
    formats = {"onnx": ("onnx",), "tensorrt": ("onnx", "tensorrt"), "all": ("onnx", "tensorrt")}[
        args.format
    ]
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    if args.checkpoint is None:
        progress("WARNING: no --checkpoint: exporting RANDOM weights (the manifest records it)")
    if variant.cfg.task != "classify" and args.format != "onnx":
        raise ValueError(
            f"{variant.name}: dense models export to ONNX only for now (--format onnx)"
        )
    if variant.cfg.task == "detect" and args.fp16:
        raise ValueError("--fp16 is not supported for detection bundles yet")
    if args.int8 != (args.calibration is not None):
        raise ValueError("--int8 and --calibration DIR go together: int8 is calibrated on DIR")
    from model_export.export import ExportOptions, export

    options = ExportOptions(
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        image_size=args.image_size,
        fp16=args.fp16,
        formats=formats,
        batch=args.batch,
        gf_mode=args.gf_mode,
        reference=args.reference,
        verify_precisions=tuple(args.verify_precision),
        verify_images=args.verify_images,
        int8_calibration=args.calibration,
        min_agreement=args.min_agreement,
        progress=progress,
    )
    return export(variant.name, args.out, options)


def summary(manifest, out: Path, seconds: float) -> str:
    lines = [f"bundle {out} ({manifest.task}, {manifest.variant}) in {seconds:.0f} s"]
    if manifest.weights.random:
        lines.append("  weights: RANDOM (no checkpoint): for testing only")
    else:
        lines.append(
            f"  weights: {manifest.weights.checkpoint} sha256 {manifest.weights.checkpoint_sha256}"
        )
    for engine in manifest.engines:
        size = manifest.files[engine.file].bytes / 1e6
        extra = (
            f", TensorRT {engine.tensorrt_version} on {engine.gpu_name}"
            if engine.tensorrt_version
            else ""
        )
        detail = f"{size:.1f} MB, GF {engine.gf_mode}{extra}"
        lines.append(f"  {engine.format:8} {engine.precision}  {engine.file} ({detail})")
    lines += parity_lines(manifest)
    return "\n".join(lines)


def parity_lines(manifest) -> list[str]:
    lines = []
    for p in manifest.parity:
        top1 = "" if p.top1_agreement is None else f", top-1 agreement {p.top1_agreement:.3f}"
        at = "" if p.precision is None else f" at {p.precision} ({p.runtime})"
        lines.append(
            f"  parity {p.engine}{at} vs {p.reference}: {p.metric} {p.value:.1e}, max abs "
            f"{p.max_abs_error:.1e}{top1} ({'ok' if p.passed else 'FAILED'})"
        )
    return lines


def list_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--task", choices=("classify", "segment", "detect"))
    return parser


def print_variants(args: argparse.Namespace) -> int:
    """Run `hornet list`: one line per variant."""
    if _export_extra_missing("list"):
        return 1
    from model_export.registry import get_variant, list_variants

    for name in list_variants(args.task):
        variant = get_variant(name)
        cfg = variant.cfg
        aliases = f"  (alias {', '.join(variant.aliases)})" if variant.aliases else ""
        print(f"{name:48} {cfg.task:8} {cfg.image_size:4}px {cfg.num_classes:6} classes{aliases}")
    return 0


VERIFY_DESCRIPTION = """\
Verify an existing bundle at a precision it has no graph of its own for (bf16:
OpenVINO's inference precision over the fp32 graph, on this CPU) against its fp32 graph,
on seeded random images and the scikit-image photographs or the images of --images DIR,
and record the figures in its manifest; `hornet serve` refuses to serve a precision the
manifest has no passed record for. Needs the openvino extra and scikit-image (the
photographs); detection bundles also the export extra.
"""


def verify_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("bundle", type=Path, help="bundle directory")
    parser.add_argument("--precision", required=True, choices=VERIFIABLE_PRECISIONS)
    parser.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="verify on the images of DIR (searched recursively; pictures like those the "
        "model will serve, a few dozen) instead of the scikit-image photographs",
    )
    return parser


def verify_bundle(args: argparse.Namespace) -> int:
    """Run `hornet verify`; 0 when the precision passed, 1 otherwise (said in one line)."""
    from hornet_bundle import BundleError
    from model_export.export import ExportError
    from model_export.export.precision import verify_precision

    try:
        manifest = verify_precision(args.bundle, args.precision, images=args.images)
    except (ExportError, BundleError, ValueError) as exc:
        print(f"hornet verify: error: {exc}", file=sys.stderr)
        return 1
    print(f"bundle {args.bundle}: {args.precision} verified, recorded in its manifest")
    print("\n".join(line for line in parity_lines(manifest) if f"at {args.precision}" in line))
    return 0


export_command = Command(
    help="export a HorNet variant to a verified model bundle (needs torch)",
    description="Export a HorNet variant to a verified model bundle.",
    epilog=EXPORT_EPILOG,
    add_arguments=export_parser,
    run=export_variant,
)
list_command = Command(
    help="list the model variants (needs torch)",
    description="List model variants.",
    add_arguments=list_parser,
    run=print_variants,
)
verify_command = Command(
    help="verify a bundle at another precision (bf16 on OpenVINO) and record it",
    description=VERIFY_DESCRIPTION,
    add_arguments=verify_parser,
    run=verify_bundle,
)
