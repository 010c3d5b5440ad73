"""Service settings: each one is a `hornet serve` flag (service/flags.py) and a HORNET_*
environment variable; `hornet serve --help` lists them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hornet_bundle import MANIFEST_NAME
from service.cors import check_origin
from service.cpus import available_cpus
from service.errors import validation_problems
from service.flags import Flag
from service.image_structure import DEFAULT_MAX_JPEG_SCANS
from service.memory import IMAGE_CACHE_MIB_PER_THREAD
from service.tls import check_certificate
from service.tracing import MAX_SETTING

DEMO_BUNDLES_DIR = Path(__file__).parent / "demo_bundles"


def _comma_list(value: object) -> object:
    """A list setting from the environment's comma-separated string (or a list), its
    strings stripped and the empty ones dropped; anything else as given, for pydantic."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return value
    stripped = (item.strip() if isinstance(item, str) else item for item in value)
    return [item for item in stripped if item != ""]


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def bundle_name(path: Path) -> str:
    """The model name a bundle directory's manifest gives (what the server serves it
    as); the directory's name where the manifest cannot be read (loading it says why)."""
    try:
        with (path / MANIFEST_NAME).open("rb") as manifest:
            name = json.load(manifest).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else path.name


def default_model_dirs() -> list[Path]:
    """Bundles served when no --model-dir is given: every bundle directory (one holding a
    manifest.json) under the package's demo_bundles/, in name order; none if it is absent."""
    if not DEMO_BUNDLES_DIR.is_dir():
        return []
    return sorted(p for p in DEMO_BUNDLES_DIR.iterdir() if _is_bundle(p))


def read_api_key_file(path: Path) -> list[SecretStr]:
    """The keys in `path`, one a line; blank lines and lines starting with `#` are skipped,
    so a mounted Kubernetes Secret can list the current and the next key while rotating."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"API key file {path}: cannot read it: {reason}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(
            f"API key file {path} holds no key (one a line; blank lines and # comments are ignored)"
        )
    return [SecretStr(key) for key in keys]


# The settings a model may be given apart from the server's others (--model-setting): its
# engine and precision, its batching and the layout of its engine instances. The rest
# (the device, the limits on requests, decoding, HTTP) are the server's.
PER_MODEL_SETTINGS = (
    "engine",
    "precision",
    "max_batch_size",
    "max_delay_ms",
    "close_batches_early",
    "warmup_batch_sizes",
    "max_queue_size",
    "priority_levels",
    "default_priority_level",
    "instances",
    "engine_threads",
    "share_weights",
    "solo_engine",
    "openvino_static_shapes",
    "engine_spinning",
    "max_engine_failures",
    "response_cache_mib",
)


def parse_model_setting(text: str) -> tuple[str, str, str]:
    """`MODEL:NAME=VALUE` as (model, name, value); ValueError naming what is wrong. The
    model is what comes before the last colon, so a model name may hold colons."""
    head, equals, value = text.partition("=")
    model, colon, name = head.rpartition(":")
    name = name.strip().replace("-", "_")
    if not (equals and colon and model.strip() and name and value.strip()):
        raise ValueError(f"model setting {text!r} is not MODEL:NAME=VALUE")
    if name not in PER_MODEL_SETTINGS:
        raise ValueError(
            f"model setting {text!r}: {name!r} is not set per model; these are: "
            + ", ".join(PER_MODEL_SETTINGS)
        )
    return model.strip(), name, value.strip()


def model_setting_texts(model: str, values: dict[str, object]) -> list[str]:
    """`MODEL:NAME=VALUE` for each per-model setting in `values` (None left out), the
    inverse of parse_model_setting: what --model-setting and HORNET_MODEL_SETTINGS take."""
    texts = []
    for name, value in values.items():
        if value is None:
            continue
        if name not in PER_MODEL_SETTINGS:
            raise ValueError(f"{name} is not set per model")
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        texts.append(f"{model}:{name}={text}")
    return texts


# Threads of one kind (engine, decoding): the runtimes take the count as a C int.
MAX_THREADS = 1024


class Settings(BaseSettings):
    """What the server runs and the limits that keep it standing.

    `model_dir` accepts a list, or in the environment a comma-separated string
    (HORNET_MODEL_DIR=bundles/a,bundles/b).
    """

    # allow_inf_nan: an infinite limit is the setting's own "off" (0) or a large number;
    # infinity itself failed later, where the setting became an int (a traceback at start,
    # or every JPEG answered 400 under --jpeg-reducing-gap inf)
    model_config = SettingsConfigDict(env_prefix="HORNET_", extra="forbid", allow_inf_nan=False)

    model_dir: Annotated[list[Path], NoDecode, Flag(metavar="DIR")] = Field(
        default_factory=default_model_dirs,
        description="bundle directory; repeat for several models; unset (and no "
        "--model-repository): the packaged demo bundles",
    )
    model_repository: Annotated[list[Path], NoDecode, Flag(metavar="DIR")] = Field(
        default_factory=list,
        description="a directory of bundles, as Triton's --model-repository: every "
        "subdirectory holding a manifest.json is served, in name order (others, such as "
        "lost+found on a volume, are skipped and logged); repeat for several; with "
        "--model-dir, both",
    )
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: every bundle given loads at start and stays; explicit (as "
        "Triton's): models load, reload and unload while the server runs (POST "
        "/v2/repository/models/NAME/load and /unload; gRPC RepositoryModelLoad and "
        "RepositoryModelUnload), and at start only --model-dir's bundles and the "
        "repository's models that --load-model names load; poll (as Triton's): every "
        "bundle loads at start, and every --repository-poll-secs the bundles are looked at "
        "again: one that appears loads, one whose files change reloads, one that goes "
        "unloads",
    )
    repository_poll_secs: float = Field(
        15.0,
        ge=0.1,
        description="with --model-control-mode poll: seconds between two looks at the bundles",
    )
    load_model: Annotated[list[str], NoDecode, Flag(metavar="NAME")] = Field(
        default_factory=list,
        description="with --model-control-mode explicit: a model of the repository to load "
        "at start, by its name (repeat for several; * for all)",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="also serve the KServe v2 protocol over gRPC on this port, on the same "
        "host (Triton's clients: 8001); 0: no gRPC",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="also serve /metrics and the health probes (/healthz, /readyz, "
        "/v2/health/live, /v2/health/ready), and nothing else, on this port of the same host, "
        "with its own --max-connections: the kubelet's probes and Prometheus' scrapes get "
        "through while the API port holds all its connections (Triton's metrics port: "
        "8002); 0: none",
    )
    engine: Literal["onnxruntime", "openvino", "tensorrt", "torch"] = Field(
        "onnxruntime",
        description="onnxruntime, openvino (CPU; fp32 or bf16), tensorrt (the bundle's native "
        "TensorRT engines) or torch (debugging)",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the engines run")
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        None,
        description="engine precision; unset: the bundle's fp32 engine where it has one. bf16: "
        "--engine openvino on a CPU with AVX512_BF16 or AMX. int8: the bundle's int8 graph "
        "(hornet export --int8) on the CPU, --engine onnxruntime or openvino",
    )
    allow_unverified_precision: bool = Field(
        False,
        description="serve a precision the bundle's manifest has no passed parity record for "
        "(see `hornet verify`), with a warning, instead of refusing to start",
    )
    exit_on_load_error: bool = Field(
        True,
        description="exit with status 1 when a model fails to load (an engine this machine "
        "cannot run, a graph that does not build); off: stay up, not ready, /readyz naming "
        "the error",
    )
    max_engine_failures: int = Field(
        0,
        ge=0,
        description="after N batches of one model fail in a row in its engines (none of its "
        "batches succeeding between), turn not ready, drain and exit with status 1, so that "
        "the supervisor (Kubernetes, Docker's restart policy) starts a fresh process: a GPU "
        "whose CUDA context broke fails every batch until then. 0 = never; a failing batch "
        "only fails its own requests",
    )
    ort_tensorrt: bool = Field(
        False,
        description="on CUDA, run ONNX Runtime engines through its TensorRT execution provider "
        "first (CUDA for what it cannot take)",
    )
    cuda_tf32: bool = Field(
        False,
        description="let fp32 engines on CUDA use TF32 matrix units: faster, logits off by "
        "about 1e-3 relative",
    )
    cuda_static_shapes: bool = Field(
        True,
        description="ONNX Runtime on CUDA: one session per batch size (max batch size and "
        "the powers of two below it), each batch padded to the next: the CUDA provider "
        "plans its convolutions again whenever a session's input shape changes (1-2 s "
        "each on an H200), so one session fed batches of varying size stalled for "
        "seconds; costs one copy of the weights on the GPU per size (the detector: "
        "--cuda-shape-sessions)",
    )
    cuda_shape_sessions: Annotated[int, Flag(metavar="K")] = Field(
        4,
        ge=1,
        le=64,
        description="with --cuda-static-shapes, for a graph whose batch axis cannot be "
        "fixed (the detector: its input size follows each image's aspect ratio): one "
        "session per input shape for the K shapes seen last, each a copy of the weights "
        "on the GPU; 1: one session, planned again at each change of shape",
    )
    cuda_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = Field(
        "exhaustive",
        description="how the CUDA provider picks each convolution's cuDNN algorithm for a "
        "new input shape: exhaustive (benchmark them: ONNX Runtime's default, about 1.5 s "
        "per shape for hornet_tiny on an H200), heuristic (cuDNN's guess: 0.25-0.4 s, "
        "the same speed there) or default (one fixed algorithm)",
    )
    max_batch_size: Annotated[int, Flag(metavar="N")] = Field(
        8,
        ge=1,
        le=1024,
        description="a batch closes at N images, or --max-delay-ms after its first request",
    )
    max_delay_ms: Annotated[float, Flag(metavar="T")] = Field(
        5.0,
        ge=0,
        description="a batch closes T ms after its first request, or at --max-batch-size images",
    )
    close_batches_early: bool = Field(
        True,
        description="a batch also closes before --max-delay-ms once no other request for "
        "its model is queued or being decoded (waiting could not fill it: a lone request "
        "runs at once); off: every batch not full waits the whole delay",
    )
    warmup_batch_sizes: Literal["auto", "one", "all"] = Field(
        "auto",
        description="batch sizes each engine instance runs once while the model loads, "
        "before the server is ready: one (a single image) or all (every size from 1 to "
        "--max-batch-size); auto: on CUDA the sizes of --cuda-static-shapes (max batch "
        "size and the powers of two below it: one planning run per session, which first "
        "seen under load would stall a batch for a second or more), one on the CPU",
    )
    max_queue_size: Annotated[int, Flag(metavar="Q")] = Field(
        64,
        ge=1,
        description="images waiting per model (per priority level, with --priority-levels); "
        "beyond it: 503 with Retry-After at once",
    )
    priority_levels: Annotated[int, Flag(metavar="N")] = Field(
        1,
        ge=1,
        le=16,
        description="priority levels of a model's requests (Triton's dynamic batching "
        "priority_levels): a request asks for level 1 (the highest) to N (v2's 'priority' "
        "parameter, the image routes' 'priority' query parameter); a batch takes the "
        "waiting images of the highest level first, each level first come first served, "
        "and each level holds --max-queue-size images. 1: first come first served",
    )
    default_priority_level: Annotated[int, Flag(metavar="L")] = Field(
        0,
        ge=0,
        le=16,
        description="the level of a request that asks for none (or for 0, as Triton's "
        "clients send); 0: the lowest level, --priority-levels",
    )
    instances: Annotated[int, Flag(metavar="K")] = Field(
        1, ge=1, le=64, description="engine instances (worker threads) per model"
    )
    request_timeout_s: Annotated[float, Flag(metavar="S")] = Field(
        30.0, gt=0, description="deadline of a request in seconds; past it: 504"
    )
    max_upload_mb: Annotated[float, Flag(metavar="M")] = Field(
        20.0, gt=0, description="larger uploads (MB): 413"
    )
    max_upload_buffer_mb: Annotated[float, Flag(metavar="M")] = Field(
        0.0,
        ge=0,
        description="request bodies held at once across all requests (MB); a request that "
        "would go past it: 503 with Retry-After. 0 = 16 x --max-upload-mb",
    )
    max_connections: Annotated[int, Flag(metavar="N")] = Field(
        10_000,
        ge=0,
        description="open connections the server holds at once, on each of its ports (HTTP, "
        "gRPC; over TLS from its acceptance, the handshake in progress counted); past it a "
        "new HTTP connection is answered 503 with Retry-After and closed (over TLS closed "
        "before its handshake), a gRPC one closed. 0: no limit",
    )
    max_connections_per_client: Annotated[int, Flag(metavar="N")] = Field(
        0,
        ge=0,
        description="open HTTP connections to the API port from one client address (over "
        "TLS, handshakes in progress counted); past it a new one from that address is "
        "answered 429 with Retry-After and closed as it opens. 0: no limit (keep it 0, or "
        "above the proxy's connections, behind a proxy or ingress: every connection then "
        "comes from its addresses)",
    )
    max_connection_age_s: Annotated[float, Flag(metavar="S")] = Field(
        0.0,
        ge=0,
        description="end a connection to the API once it has been open this long, so that "
        "its client spreads over the replicas added since (a Kubernetes Service balances "
        "connections, not requests): over HTTP the first answer after it says connection: "
        "close and the connection is closed after it; over gRPC, GOAWAY, the calls in "
        "progress given --request-timeout-s to end. 0: never",
    )
    client_timeout_s: Annotated[float, Flag(metavar="S")] = Field(
        10.0,
        gt=0,
        description="longest wait for a client: for a request's head (from the connection's "
        "opening or its last answer) and for each next piece of a body; past it: 408, "
        "connection closed. With TLS: for a connection's handshake. gRPC: for a unary "
        "call's message and a connection's first frames; a stream idle this long may be "
        "ended for a new one when all are taken",
    )
    max_pixels: Annotated[int, Flag(metavar="P")] = Field(
        40_000_000, ge=1, description="larger images (checked before decoding): 413"
    )
    max_listed_elements: int = Field(
        1 << 20,
        ge=1,
        description="KServe v2 inputs given element by element (JSON data, counted by its "
        "commas before it is parsed; gRPC's typed contents) hold at most N elements in a "
        "request, else 413 (gRPC: RESOURCE_EXHAUSTED) naming the binary forms, which carry "
        "any tensor with one copy. Listed elements cost a Python object each while they are "
        "converted, with the interpreter lock held (2^20: about 0.07 s); 2^20 is 6 RGB "
        "images at 224 as UINT8",
    )
    max_images_per_request: Annotated[int, Flag(metavar="N")] = Field(
        64, ge=1, description="more images in one request: 413"
    )
    engine_threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="ONNX Runtime intra-op threads, OpenVINO inference threads; 0 = the CPUs "
        "the process may use where a CPU limit or affinity allows fewer than the machine "
        "has (a container), else the runtime's default",
    )
    share_weights: bool = Field(
        True,
        description="--instances K above 1 on the CPU: the instances share one copy of the "
        "weights (OpenVINO: one compiled model run as K streams; ONNX Runtime with "
        "--engine-threads 1: one session run from K threads) instead of one copy each",
    )
    solo_engine: bool = Field(
        False,
        description="--instances K above 1 on the CPU: one more engine, over all the CPUs the "
        "process may use, runs a lone request (one image, every instance idle, nothing else "
        "queued) where an instance of --engine-threads 1 would take nearly twice as long; "
        "while it runs the instances wait. It holds a copy of the weights of its own",
    )
    openvino_static_shapes: bool = Field(
        False,
        description="--engine openvino: compile one static-shape model per batch size "
        "(max batch size and the powers of two below it) and run batches as pieces of "
        "those: 1.1-1.3x the throughput, one more compiled model's memory per size "
        "(the detector stays dynamic)",
    )
    response_cache_mib: Annotated[int, Flag(metavar="MIB")] = Field(
        0,
        ge=0,
        description="per model, keep the engine results of up to MIB MiB of encoded images "
        "(found by the SHA-256 of their bytes), so that the same file sent again is "
        "answered without decoding or running the engine; 0: off. A hit tells a client the "
        "file was sent before, by anyone: keep it off where that must not be known",
    )
    model_settings: Annotated[
        list[str], NoDecode, Flag("--model-setting", metavar="MODEL:NAME=VALUE")
    ] = Field(
        default_factory=list,
        description="a setting for one model only, over the server's (repeatable; "
        "--model-setting detector:max_batch_size=2): NAME is one of "
        + ", ".join(PER_MODEL_SETTINGS)
        + " (as their flags, with underscores; a switch takes true or false). Each model "
        "named must be served",
    )
    decode_threads: Annotated[int, Flag(metavar="N")] = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="threads decoding uploads, 0 = one per CPU the process may use (its "
        "affinity, a container's CPU limit)",
    )
    decode_nice: Annotated[int, Flag(metavar="N")] = Field(
        0,
        ge=0,
        le=19,
        description="added to the decoding threads' nice value (Linux, per thread): above 0 "
        "the engine's threads go first when both want the cores",
    )
    jpeg_reducing_gap: Annotated[float, Flag(metavar="G")] = Field(
        0.0,
        ge=0,
        description="decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where it "
        "stays at least G times the size the model's first resize makes of it: a 12 MP "
        "photo decodes about 4x faster at G=2, its crop within a few grey levels of the "
        "exact one; 0 = decode in full, bit-exact with the official transform",
    )
    image_cache_mib: Annotated[int | None, Flag(metavar="MIB")] = Field(
        None,
        ge=0,
        le=1 << 20,  # 1 TiB: Pillow counts its blocks in a C int
        description="freed image memory Pillow keeps for the next images while they keep "
        "coming, emptied within a second of the last (MiB): reused, it costs no page "
        "faults (about 50 ms of kernel time per 12 MP photo decoded in full); 0 = none; "
        "unset: 96 per decoding thread",
    )
    max_aspect_ratio: Annotated[float, Flag(metavar="R")] = Field(
        0.0,
        ge=0,
        description="refuse images whose longer side is over R times the shorter with 413; 0 = any",
    )
    max_jpeg_scans: Annotated[int, Flag(metavar="N")] = Field(
        DEFAULT_MAX_JPEG_SCANS,
        ge=1,
        description="refuse JPEGs of more than N scans with 413, before decoding (each scan "
        "of a progressive JPEG is another decoding pass over the whole image; encoders "
        "write 1-10)",
    )
    engine_spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads spin between runs too (off: they spin "
        "during a run only)",
    )
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools",
        description="HTTP/1.1 parser: httptools (C, a request head bounded at 16 KiB by "
        "service.http_protocol) or uvicorn's pure-Python h11 (same bound, more CPU per request)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="event loop: uvloop (libuv) or the standard library's asyncio"
    )
    drain_timeout_s: float = Field(10.0, ge=0, description="graceful shutdown bound in seconds")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info",
        description="the lowest severity logged at start (debug: the verbose lines too); "
        "Triton's logging extension reads it at /v2/logging and, with "
        "--allow-log-settings, changes it while the server runs",
    )
    allow_log_settings: bool = Field(
        False,
        description="let clients change the log settings while the server runs (Triton's "
        "logging extension: POST /v2/logging, gRPC LogSettings: which severities are "
        "written, and the verbose lines); off: they can only read them (403 "
        "log_settings_off). Where API keys are set, only holders of a key can",
    )
    trace_endpoint: Annotated[str | None, Flag(metavar="URL")] = Field(
        None,
        description="export OpenTelemetry traces of inference requests to this OTLP/HTTP "
        "collector URL (e.g. http://otel-collector:4318/v1/traces): a server span per "
        "sampled request with its stages (compute_input, queue, compute_infer, "
        "compute_output); a request with a valid traceparent joins its trace, sampled as "
        "its caller sampled it; OpenTelemetry's OTEL_EXPORTER_OTLP_* and OTEL_BSP_* "
        "variables apply. Unset: no traces",
    )
    trace_rate: int = Field(
        1000,
        ge=1,
        le=MAX_SETTING,
        description="with --trace-endpoint: trace one request in this many of those that "
        "come without a traceparent (Triton's trace_rate; the first is traced)",
    )
    trace_count: int = Field(
        -1,
        ge=-1,
        le=MAX_SETTING,
        description="with --trace-endpoint: stop after this many traces (Triton's "
        "trace_count; -1: no limit)",
    )
    allow_trace_settings: bool = Field(
        False,
        description="let clients change the trace settings while the server runs (Triton's "
        "trace extension: POST /v2/trace/setting and /v2/models/{model}/trace/setting, "
        "gRPC TraceSetting: trace_level, trace_rate, trace_count); off: they can only read "
        "them (403 trace_settings_off). Where API keys are set, only holders of a key can",
    )
    access_log: bool = Field(
        True,
        description="one log line per request answered (method, path, status, time; the "
        "hornet.access logger); off: only the answers with a 5xx status, which are logged "
        "as warnings either way (but a readiness probe's 503, 'not ready': an info line)",
    )
    log_buffer_kib: Annotated[int, Flag(metavar="KIB")] = Field(
        4096,
        ge=1,
        le=1 << 20,
        description="log lines held for standard error when it is read slowly (a blocking "
        "log driver, a full pipe), in KiB: the lines are written by a thread of their own, "
        "so the server never waits for them; past this the newest are dropped, counted in "
        "hornet_log_lines_dropped_total and said in a line once the rest is written",
    )
    api_keys: Annotated[list[SecretStr], NoDecode, Flag("--api-key", metavar="KEY")] = Field(
        default_factory=list,
        description="require this key (Authorization: Bearer KEY or X-API-Key: KEY); repeat "
        "for several. Anyone who can list processes sees it: prefer --api-key-file or the "
        "environment variable",
    )
    api_key_file: Annotated[Path | None, Flag(metavar="PATH")] = Field(
        None, description="require one of the keys in PATH, one a line, # comments allowed"
    )
    tls_certfile: Annotated[Path | None, Flag(metavar="PATH")] = Field(
        None,
        description="serve HTTPS with this certificate (PEM, the chain after it); its key "
        "in --tls-keyfile or in this file",
    )
    tls_keyfile: Annotated[Path | None, Flag(metavar="PATH")] = Field(
        None,
        description="the certificate's private key (PEM, not encrypted)",
        validate_default=True,  # the pair is checked whichever of the two is given
    )
    cors_origins: Annotated[list[str], NoDecode, Flag("--cors-origin", metavar="ORIGIN")] = Field(
        default_factory=list,
        description="let web pages from ORIGIN (scheme://host[:port], or * for any) call the "
        "API from a browser (CORS); repeat for several; unset: pages of other origins cannot",
    )
    protect_probes: bool = Field(
        False,
        description="with API keys, require one on /healthz, /readyz, /metrics and the v2 "
        "health routes too",
    )

    @field_validator("jpeg_reducing_gap")
    @classmethod
    def _gap_reduces(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(
                "a reducing gap under 1 would resize up from a decode smaller than the "
                "model's resize; use 0 (off) or 1 and above"
            )
        return value

    @field_validator("trace_endpoint")
    @classmethod
    def _trace_endpoint_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(  # the value is quoted by settings_problems, credentials cut
                "not an http:// or https:// URL of an OTLP/HTTP collector "
                "(e.g. http://otel-collector:4318/v1/traces)"
            )
        return value

    @field_validator("model_dir", "model_repository", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        if isinstance(value, Path):
            return [value]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_lower_case(cls, value: object) -> object:
        """HORNET_LOG_LEVEL=INFO as info (the flag's choices are lower case)."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("load_model", mode="before")
    @classmethod
    def _split_load_model(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("model_settings", mode="before")
    @classmethod
    def _split_model_settings(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("model_settings")
    @classmethod
    def _model_settings_parse(cls, value: list[str]) -> list[str]:
        seen: dict[tuple[str, str], str] = {}
        for text in value:
            model, name, _ = parse_model_setting(text)
            if (model, name) in seen:
                raise ValueError(
                    f"model {model!r} is given {name} twice: {seen[model, name]!r} and {text!r}"
                )
            seen[model, name] = text
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # No format checks here: pydantic would print the raw value (the keys) in its error.
        return _comma_list(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        value = _comma_list(value)
        if not isinstance(value, list):
            return value
        return [check_origin(o) if isinstance(o, str) else o for o in value]

    @model_validator(mode="after")
    def _tls_pair_loads(self) -> Settings:
        # A check of the pair, not of the key alone (a field validator's problem is named
        # after its field: "--tls-keyfile" for a certificate given without one); an error
        # names the files and what is wrong, never their contents.
        if self.tls_keyfile is not None and self.tls_certfile is None:
            raise ValueError("a TLS key without a certificate: give --tls-certfile too")
        if self.tls_certfile is not None:
            check_certificate(self.tls_certfile, self.tls_keyfile)
        return self

    @field_validator("api_key_file")
    @classmethod
    def _key_file_holds_keys(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_api_key_file(value)
        return value

    @model_validator(mode="after")
    def _probes_protected_only_with_keys(self) -> Settings:
        # Fires only when no key is configured, so its error cannot show one.
        if self.protect_probes and not self.asks_for_keys:
            raise ValueError(
                "protect_probes needs API keys to check: give --api-key-file "
                "(HORNET_API_KEY_FILE) or HORNET_API_KEYS"
            )
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        ports = {"--port": self.port, "--grpc-port": self.grpc_port}
        ports["--metrics-port"] = self.metrics_port  # 0: any (--port) or none
        taken: dict[int, str] = {}
        for flag, port in ports.items():
            if port and port in taken:
                raise ValueError(f"{taken[port]} and {flag} are both {port}: give each its own")
            taken.setdefault(port, flag)
        return self

    @model_validator(mode="after")
    def _load_model_with_control(self) -> Settings:
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                "load_model names the repository's models to load at start with "
                "--model-control-mode explicit; without it every bundle given loads"
            )
        return self

    @model_validator(mode="after")
    def _default_level_is_a_level(self) -> Settings:
        if self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"--default-priority-level {self.default_priority_level} is not one of the "
                f"{self.priority_levels} priority levels (--priority-levels)"
            )
        return self

    @model_validator(mode="after")
    def _buffer_holds_an_upload(self) -> Settings:
        if self.max_upload_buffer_mb and self.max_upload_buffer_mb < self.max_upload_mb:
            raise ValueError(
                f"max_upload_buffer_mb ({self.max_upload_buffer_mb:g}) is under max_upload_mb "
                f"({self.max_upload_mb:g}): the largest upload allowed could never be received"
            )
        return self

    @model_validator(mode="after")
    def _solo_beside_instances(self) -> Settings:
        if self.solo_engine and (self.instances < 2 or self.device != "cpu"):
            raise ValueError(
                "--solo-engine runs beside --instances 2 or more on the CPU (with one "
                "instance, give it the threads instead: --engine-threads)"
            )
        return self

    @model_validator(mode="after")
    def _bf16_only_on_openvino(self) -> Settings:
        if self.precision == "bf16" and self.engine != "openvino":
            raise ValueError(
                f"precision bf16 runs on --engine openvino only: {self.engine} runs the "
                "bundle's fp32 or fp16 graphs as they are"
            )
        return self

    @model_validator(mode="after")
    def _int8_on_the_cpu(self) -> Settings:
        if self.precision == "int8" and (
            self.engine not in ("onnxruntime", "openvino") or self.device != "cpu"
        ):
            raise ValueError(
                "precision int8 runs on the CPU with --engine onnxruntime or openvino: its "
                f"graph was calibrated and verified there, not on {self.engine}/{self.device}"
            )
        return self

    @model_validator(mode="after")
    def _each_model_settings_valid(self) -> Settings:
        # Each model's settings checked as a whole (their own ranges, and beside the
        # server's: bf16 with openvino, the solo engine with instances) before any loads.
        for model in self.models_with_settings():
            try:
                self.for_model(model)
            except ValidationError as exc:
                problems = validation_problems(exc.errors())
                raise ValueError(f"model {model!r} (--model-setting): {problems}") from None
        return self

    def models_with_settings(self) -> list[str]:
        """The models named by --model-setting, in the order first named."""
        return list(dict.fromkeys(parse_model_setting(text)[0] for text in self.model_settings))

    def for_model(self, model: str) -> Settings:
        """The settings `model` is served with: the server's, with its --model-setting
        values over them (validated as the flags are); the server's own where it has none."""
        update = {
            name: value
            for named, name, value in map(parse_model_setting, self.model_settings)
            if named == model
        }
        if not update:
            return self
        given = {name: getattr(self, name) for name in self.model_fields_set}
        given.update(update, model_settings=[])
        return type(self).model_validate(given)

    def check_served(self, models: Iterable[str]) -> None:
        """ValueError when a --model-setting names a model that is not among `models`."""
        served = set(models)
        if self.models_change:  # those it may load later too
            served |= {name for name, _ in self.loadable()}
        unknown = [model for model in self.models_with_settings() if model not in served]
        if unknown:
            raise ValueError(
                f"--model-setting names {', '.join(map(repr, unknown))}, not served here "
                f"(served: {', '.join(sorted(served)) or 'none'})"
            )

    @property
    def asks_for_keys(self) -> bool:
        """Whether requests need an API key: keys given, or a key file (read at start
        and whenever it changes, never left without keys: service.auth.KeyRing)."""
        return bool(self.api_keys) or self.api_key_file is not None

    @field_validator("model_repository")
    @classmethod
    def _repositories_exist(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_dir():
                raise ValueError(f"model repository {path} is not a directory")
        return value

    @property
    def uses_demo_bundles(self) -> bool:
        """True when no model directory or repository was given and the packaged demos
        are served."""
        given = "model_dir" in self.model_fields_set or self.model_repository
        return not given and bool(self.model_dir)

    @property
    def bundle_dirs(self) -> list[Path]:
        """The bundles to serve: --model-dir's, then each --model-repository's bundle
        subdirectories in name order; the demo bundles when neither is given."""
        return self._model_dirs() + [p for p in self._repository_entries() if _is_bundle(p)]

    def _model_dirs(self) -> list[Path]:
        """--model-dir's bundles: those given, or the demo bundles when no repository
        is given either."""
        given = "model_dir" in self.model_fields_set
        return list(self.model_dir) if given or not self.model_repository else []

    @property
    def default_level(self) -> int:
        """The priority level of a request that asks for none (--default-priority-level;
        0: the lowest, --priority-levels)."""
        return self.default_priority_level or self.priority_levels

    @property
    def explicit_control(self) -> bool:
        """Clients load and unload models (--model-control-mode explicit)."""
        return self.model_control_mode == "explicit"

    @property
    def models_change(self) -> bool:
        """Models load and unload while the server runs (explicit or poll model
        control): every bundle the server may load counts, loaded or not."""
        return self.model_control_mode != "none"

    @property
    def start_bundle_dirs(self) -> list[Path]:
        """The bundles loaded at start: every one of `bundle_dirs`; under explicit model
        control --model-dir's and the repository bundles --load-model names (* all)."""
        if not self.explicit_control or "*" in self.load_model:
            return self.bundle_dirs
        wanted = set(self.load_model)
        in_repository = [
            path
            for path in self._repository_entries()
            if _is_bundle(path) and bundle_name(path) in wanted
        ]
        return self._model_dirs() + in_repository

    def loadable(self) -> list[tuple[str, Path]]:
        """Every bundle the server may load, as (its model's name, its directory), read
        again at each call (a bundle added to the repository is found): `bundle_dirs`."""
        return [(bundle_name(path), path) for path in self.bundle_dirs]

    def skipped_in_repositories(self) -> list[Path]:
        """Entries of the model repositories that are no bundles (no manifest.json)."""
        return [path for path in self._repository_entries() if not _is_bundle(path)]

    def _repository_entries(self) -> list[Path]:
        """Every entry of the model repositories, each repository's in name order, but the
        hidden ones (`.NAME`: a copy set aside, an editor's or a volume's own entries)."""
        return [
            path
            for repository in self.model_repository
            for path in sorted(repository.iterdir())
            if not path.name.startswith(".")
        ]

    @property
    def decode_workers(self) -> int:
        """Threads decoding and preprocessing uploads: decode_threads, or one per CPU the
        process may use (service.cpus). Each holds at most one decoded image, which
        bounds their memory together."""
        return self.decode_threads or available_cpus()

    @property
    def engine_thread_count(self) -> int:
        """Each engine's threads: engine_threads; else the CPUs the process may use where
        that is fewer than the machine's (a runtime sizes its own pool from the machine,
        which a container's quota would throttle); else 0, the runtime's default."""
        if self.engine_threads:
            return self.engine_threads
        cpus = available_cpus()
        return cpus if cpus < (os.cpu_count() or cpus) else 0

    def for_solo_engine(self) -> Settings:
        """The settings the solo engine is made with: one instance over every CPU the
        process may use (service.cpus), for batches of one item (all the batcher gives it:
        with --openvino-static-shapes it compiles that size only, not one model per batch
        size), the rest as given."""
        update = {
            "instances": 1,
            "engine_threads": available_cpus(),
            "solo_engine": False,
            "max_batch_size": 1,
        }
        return self.model_copy(update=update)

    @property
    def image_cache_size_mib(self) -> int:
        """Pillow's image block cache: image_cache_mib, or 96 MiB per decoding thread."""
        if self.image_cache_mib is not None:
            return self.image_cache_mib
        return IMAGE_CACHE_MIB_PER_THREAD * self.decode_workers

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_buffer_bytes(self) -> int:
        """Bytes of request bodies the server holds at once, over all requests."""
        return int((self.max_upload_buffer_mb or 16 * self.max_upload_mb) * 1024 * 1024)
