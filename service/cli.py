"""`hornet serve`: run the service over one or more bundles with uvicorn.

Every flag has a HORNET_* environment variable (pydantic-settings); a flag given on the
command line wins over the environment. On SIGTERM/SIGINT readiness turns false first,
then uvicorn stops accepting and lets in-flight requests finish; drain_timeout_s after
the signal the batch queues close and the requests they still hold are answered 503
with Retry-After, so the whole drain is bounded once, and the process exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.bundle import BundleError, load_bundle
from service.logs import configure_logging
from service.memory import configure_allocator
from service.runtime import ModelPool
from service.settings import DEMO_BUNDLES_DIR, Settings

log = logging.getLogger("hornet.service")

# After the batch queues close at the drain bound, the time uvicorn still gives the
# requests they failed to write their 503s before it cancels what is left.
_LAST_RESPONSES_S = 1.0

_FLAGS: list[tuple[str, dict]] = [
    (
        "--model-dir",
        {
            "action": "append",
            "metavar": "DIR",
            "help": "bundle directory; repeat for several models (HORNET_MODEL_DIR, "
            "comma-separated)",
        },
    ),
    ("--host", {"help": "bind address (HORNET_HOST, default 127.0.0.1)"}),
    ("--port", {"type": int, "help": "port (HORNET_PORT, default 8000)"}),
    ("--engine", {"choices": ["onnxruntime", "tensorrt", "torch"], "help": "HORNET_ENGINE"}),
    ("--device", {"choices": ["cpu", "cuda"], "help": "HORNET_DEVICE"}),
    ("--precision", {"choices": ["fp32", "fp16"], "help": "engine precision (HORNET_PRECISION)"}),
    ("--max-batch-size", {"type": int, "metavar": "N", "help": "HORNET_MAX_BATCH_SIZE"}),
    ("--max-delay-ms", {"type": float, "metavar": "T", "help": "HORNET_MAX_DELAY_MS"}),
    ("--max-queue-size", {"type": int, "metavar": "Q", "help": "HORNET_MAX_QUEUE_SIZE"}),
    ("--instances", {"type": int, "metavar": "K", "help": "engines per model (HORNET_INSTANCES)"}),
    ("--request-timeout-s", {"type": float, "metavar": "S", "help": "HORNET_REQUEST_TIMEOUT_S"}),
    ("--max-upload-mb", {"type": float, "metavar": "M", "help": "HORNET_MAX_UPLOAD_MB"}),
    ("--max-pixels", {"type": int, "metavar": "P", "help": "HORNET_MAX_PIXELS"}),
    (
        "--max-aspect-ratio",
        {
            "type": float,
            "metavar": "R",
            "help": "refuse images whose longer side is over R times the shorter with 413; "
            "0 = any (HORNET_MAX_ASPECT_RATIO, default 0)",
        },
    ),
    (
        "--decode-threads",
        {
            "type": int,
            "metavar": "N",
            "help": "threads decoding uploads, 0 = one per CPU (HORNET_DECODE_THREADS)",
        },
    ),
    ("--engine-threads", {"type": int, "help": "ONNX Runtime intra-op threads, 0 = its default"}),
    (
        "--engine-spinning",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "let ONNX Runtime threads spin between runs (HORNET_ENGINE_SPINNING)",
        },
    ),
    (
        "--cuda-tf32",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "let fp32 engines on CUDA use TF32 matrix units: faster, logits off by "
            "about 1e-3 relative (HORNET_CUDA_TF32, default off)",
        },
    ),
    ("--drain-timeout-s", {"type": float, "help": "HORNET_DRAIN_TIMEOUT_S"}),
    ("--log-level", {"help": "HORNET_LOG_LEVEL"}),
    (
        "--api-key",
        {
            "action": "append",
            "dest": "api_keys",
            "metavar": "KEY",
            "help": "require this key (Authorization: Bearer KEY or X-API-Key: KEY); repeat "
            "for several. Anyone who can list processes sees it: prefer --api-key-file or "
            "HORNET_API_KEYS (comma-separated)",
        },
    ),
    (
        "--api-key-file",
        {
            "metavar": "PATH",
            "help": "require one of the keys in PATH, one a line, # comments allowed "
            "(HORNET_API_KEY_FILE)",
        },
    ),
    (
        "--protect-probes",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "with API keys, require one on /healthz, /readyz, /metrics and the v2 "
            "health routes too (HORNET_PROTECT_PROBES, default off)",
        },
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hornet serve",
        description="Serve HorNet model bundles over HTTP with dynamic batching.",
    )
    for flag, options in _FLAGS:
        parser.add_argument(flag, default=None, **options)
    return parser


def load_settings(argv: list[str] | None) -> Settings:
    """Settings from the environment, overridden by the flags actually given."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    return Settings(**given)


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `hornet serve` and `python -m service`; returns the exit status."""
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        print(f"hornet serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not settings.model_dir:
        print(
            "hornet serve: no model bundles given: pass --model-dir DIR (or HORNET_MODEL_DIR); "
            f"no demo bundles are installed under {DEMO_BUNDLES_DIR}",
            file=sys.stderr,
        )
        return 2
    try:
        bundles = [load_bundle(path) for path in settings.model_dir]
    except BundleError as exc:
        print(f"hornet serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    configure_allocator()
    if settings.uses_demo_bundles:
        log.warning(
            "NO --model-dir GIVEN: SERVING THE PACKAGED DEMO MODELS. They are not meant for "
            "real use (see each model's 'demo' flag in /v1/models); pass --model-dir.",
            extra={"demo_bundles": [str(path) for path in settings.model_dir]},
        )
    app = create_app(settings, bundles=bundles)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s + _LAST_RESPONSES_S,
        access_log=False,
    )
    server = _DrainingServer(config, app.state.pool, settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 1


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal turns readiness false before anything stops,
    whose shutdown closes the batch queues at the drain bound (503s, not uvicorn's bare
    500s for cancelled requests), and which exits normally after a graceful shutdown."""

    def __init__(
        self, config: uvicorn.Config, pool: ModelPool, drain_timeout_s: float = 10.0
    ) -> None:
        super().__init__(config)
        self._pool = pool
        self._drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._pool.begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once shut down (the process would die by
        # SIGTERM); a drained server's exit is a normal one.
        self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._pool.close_within(self._drain_timeout_s)
        await super().shutdown(sockets)
