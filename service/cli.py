"""`hornet serve` (and `python -m service`): run the service over bundles with uvicorn.

The flags are generated from `Settings`: every setting has a flag and a HORNET_*
environment variable, and a flag given on the command line wins over the environment.

On SIGTERM/SIGINT readiness turns false first, then uvicorn stops accepting and lets
in-flight requests finish; drain_timeout_s after the signal the batch queues close and
the requests they still hold are answered 503 with Retry-After, so the whole drain is
bounded once, and the process exits with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from hornet_cli import Command
from service import thread_names
from service.cpus import available_cpus
from service.flags import (
    add_settings_flags,
    given_settings,
    settings_problems,
    unknown_environment,
)
from service.http_protocol import PortConnections, protocol_class
from service.imaging import configure_decoding
from service.logs import configure_logging, flush_logging
from service.memory import configure_allocator, configure_image_cache
from service.settings import DEMO_BUNDLES_DIR, Settings
from service.tls_listener import TlsListener, listening_sockets

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.types import ASGIApp

    from hornet_bundle import Bundle
    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool
    from service.tls import ServedCertificate

log = logging.getLogger("hornet.service")

DESCRIPTION = "Serve HorNet model bundles over HTTP with dynamic batching."

# After the batch queues close at the drain bound, the time uvicorn still gives the
# requests they failed to write their 503s before it cancels what is left.
_LAST_RESPONSES_S = 1.0


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, generated from `Settings`; and --check, which is none."""
    add_settings_flags(parser, Settings)
    parser.add_argument(
        "--check",
        action="store_true",
        default=None,  # left out of the settings (service.flags.given_settings)
        help="load, verify and warm every model as the server would, print each one as "
        "/v1/models lists it and the process's memory, and exit without listening: 0 it "
        "would serve, 1 a model did not load, 2 settings or bundles refused (a deployment's "
        "preflight)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m service` (the same flags as `hornet serve`)."""
    parser = argparse.ArgumentParser(prog="hornet serve", description=DESCRIPTION)
    add_serve_flags(parser)
    return parser


def load_settings(argv: list[str] | None) -> Settings:
    """Settings from the environment, overridden by the flags actually given."""
    return Settings(**given_settings(build_parser().parse_args(argv)))


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m service`; returns the exit status."""
    return serve(build_parser().parse_args(argv))


def _one_name_twice(bundles: Sequence[Bundle]) -> str | None:
    """Why `bundles` cannot all be served at once: two of one model's name (the same
    directory given twice, or two exports named alike), found before any loads; else
    None. The server would load the first and then stop at the second (status 1)."""
    paths: dict[str, list[str]] = {}
    for bundle in bundles:
        paths.setdefault(bundle.name, []).append(str(bundle.path))
    for name, where in paths.items():
        if len(where) > 1:
            return f"several bundles are of a model named {name!r}: {', '.join(where)}"
    return None


def serve(args: argparse.Namespace) -> int:
    """Run the server the parsed flags (over the environment) describe until it is
    stopped; 2 for settings or bundles it cannot serve, 1 if it never started."""
    # gRPC core (C++) writes log lines of its own to standard error, in plain text, from
    # its threads, and at its default level an INFO line for every failed TLS handshake,
    # which any client can cause; its errors only, unless the operator's GRPC_VERBOSITY
    # says otherwise. Read as gRPC is loaded, with the app just below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # The app (FastAPI, the engines) is imported here, so building the `hornet` parser
    # for another subcommand does not pay for it.
    from hornet_bundle import BundleError, load_bundle
    from service.app import create_app, probes_only

    given = given_settings(args)
    check = given.pop("check", False)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for problem in settings_problems(Settings, exc):
            print(f"hornet serve: invalid setting: {problem}", file=sys.stderr)
        return 2
    bundle_dirs = settings.start_bundle_dirs  # the repositories are read once
    missing = _load_model_missing(settings)
    if missing:
        print(f"hornet serve: {missing}", file=sys.stderr)
        return 2
    # under explicit or poll model control a repository may start empty: models come later
    if not bundle_dirs and not (settings.models_change and settings.model_repository):
        where = (
            f"no bundles (subdirectories holding a manifest.json) in the model repository "
            f"{', '.join(map(str, settings.model_repository))}"
            if settings.model_repository
            else f"no demo bundles are installed under {DEMO_BUNDLES_DIR}"
        )
        print(
            "hornet serve: no model bundles given: pass --model-dir DIR or --model-repository "
            f"DIR (or HORNET_MODEL_DIR, HORNET_MODEL_REPOSITORY); {where}",
            file=sys.stderr,
        )
        return 2
    try:
        bundles = [load_bundle(path) for path in bundle_dirs]
    except BundleError as exc:
        print(f"hornet serve: {exc}", file=sys.stderr)
        return 2
    try:
        settings.check_served(bundle.name for bundle in bundles)
    except ValueError as exc:
        print(f"hornet serve: {exc}", file=sys.stderr)
        return 2
    twice = _one_name_twice(bundles) if not settings.models_change else None
    if twice:  # (a repository that changes loads the others and retries this one)
        print(f"hornet serve: {twice}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.access_log, settings.log_buffer_kib << 10)
    if not _precisions_verified(bundles, settings):
        return 2
    configure_allocator()
    configure_image_cache(settings.image_cache_size_mib)
    configure_decoding()
    unknown = unknown_environment(Settings, os.environ)
    if unknown:
        log.warning(
            "environment variables named like settings that are none: ignored",
            extra={
                "ignored": list(unknown),
                "did_you_mean": {name: near for name, near in unknown.items() if near},
            },
        )
    if check:
        return asyncio.run(_check(settings, bundles))
    log.info(
        "resources",
        extra={
            "cpus": available_cpus(),
            "decode_threads": settings.decode_workers,
            "engine_threads": settings.engine_thread_count or "runtime default",
            "image_cache_mib": settings.image_cache_size_mib,
        },
    )
    _raise_open_file_limit()
    if settings.uses_demo_bundles:
        log.warning(
            "NO --model-dir GIVEN: SERVING THE PACKAGED DEMO MODELS. They are not meant for "
            "real use (see each model's 'demo' flag in /v1/models); pass --model-dir.",
            extra={"demo_bundles": [str(path) for path in settings.model_dir]},
        )
    skipped = settings.skipped_in_repositories()
    if skipped:
        log.warning(
            "skipped entries of the model repository that hold no manifest.json",
            extra={"skipped": [str(path) for path in skipped]},
        )
    if "*" in settings.cors_origins and not settings.asks_for_keys:
        log.warning(
            "--cors-origin * without API keys: any web page its visitors' browsers can reach "
            "this server from may call the API and read its answers; name the origins, or "
            "require keys"
        )
    if settings.explicit_control and not settings.asks_for_keys:
        log.warning(
            "--model-control-mode explicit without API keys: any client that reaches this "
            "server may load, reload and unload its models; require keys (--api-key-file), "
            "or keep the port to trusted callers"
        )
    if settings.allow_log_settings and not settings.asks_for_keys:
        log.warning(
            "--allow-log-settings without API keys: any client that reaches this server may "
            "turn its log lines off, errors included, or on; require keys (--api-key-file), "
            "or keep the port to trusted callers"
        )
    if settings.allow_trace_settings and not settings.asks_for_keys:
        log.warning(
            "--allow-trace-settings without API keys: any client that reaches this server "
            "may have every inference request traced and sent to the collector, or none; "
            "require keys (--api-key-file), or keep the port to trusted callers"
        )
    # The imports' threads, then the event loop's (the threads it starts take its name).
    thread_names.name_library_threads()
    thread_names.set_current(thread_names.SERVE)
    app = create_app(settings, bundles=bundles)
    metrics = app.state.metrics
    config = _http_config(settings, app, metrics, "api")
    metrics_config = (
        _http_config(settings, probes_only(app), metrics, "metrics")
        if settings.metrics_port
        else None
    )
    server = _DrainingServer(
        config,
        app.state.pool,
        settings.drain_timeout_s,
        settings.exit_on_load_error,
        metrics_config,
        app.state.certificate,
        settings.client_timeout_s,
    )
    server.run()
    if server.listen_failed:
        _say(f"hornet serve: {server.listen_failed}")
        return 1
    if server.load_failed:
        _say(
            f"hornet serve: model loading failed: {app.state.pool.load_error} "
            "(--no-exit-on-load-error keeps the server up, not ready)"
        )
        return 1
    if app.state.pool.engine_failure is not None:
        _say(f"hornet serve: {app.state.pool.engine_failure}")
        return 1
    return 0 if server.started else 1


def _say(message: str) -> None:
    """`message` on standard error after every log line waiting (the log's own thread
    writes those): an exit's reason stays the process's last line."""
    flush_logging()
    print(message, file=sys.stderr, flush=True)


def _http_config(
    settings: Settings, app: ASGIApp, metrics: ServiceMetrics, listener: str
) -> uvicorn.Config:
    """uvicorn's configuration of one HTTP port (`listener`: "api", --port, or "metrics",
    --metrics-port), its connections counted and bounded on their own. The per-client
    bound and the connection age are the API's: its clients spread over new replicas,
    while the kubelet and a scraper come from few addresses and may keep a connection."""
    api = listener == "api"
    connections = PortConnections(
        settings.max_connections,
        metrics.connections_refused.labels(listener).inc,
        listener,
        settings.max_connections_per_client if api else 0,
    )
    metrics.http_connections.labels(listener).set_function(lambda: len(connections.open))
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if api else settings.metrics_port,
        log_config=None,
        log_level=settings.log_level,
        # Never uvicorn's own protocols: its httptools one buffers a request head of any
        # size, and neither times a head out (service.http_protocol).
        http=protocol_class(
            settings.http_parser,
            settings.client_timeout_s,
            connections,
            settings.max_connection_age_s if api else 0.0,
        ),
        loop=settings.event_loop,
        # No WebSocket route is served: an Upgrade request is answered as plain HTTP (the
        # route's JSON), never handed to a WebSocket library (wsproto, when installed,
        # took it and answered an empty 403).
        ws="none",
        timeout_graceful_shutdown=settings.drain_timeout_s + _LAST_RESPONSES_S,
        access_log=False,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )


async def _check(settings: Settings, bundles: Sequence[Bundle]) -> int:
    """--check: every model loaded, verified and warmed as the server would (its engines,
    instances and warm-up batches), each printed as /v1/models lists it, then the
    process's memory (what a pod needs before its first request); the engines closed."""
    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool

    pool = ModelPool(settings, ServiceMetrics(), bundles=bundles)
    try:
        await pool.load()
    except Exception:  # noqa: BLE001 - the pool keeps the reason
        _say(f"hornet serve --check: model loading failed: {pool.load_error}")
        return 1
    finally:
        loaded = [
            runner.info(ready=True).model_dump(mode="json") for runner in pool.runners.values()
        ]
        await pool.close(0.0)
    for model in loaded:
        print(json.dumps({"model": model}), flush=True)
    print(json.dumps({"memory_mib": _memory_mib()}), flush=True)
    return 0


def _memory_mib() -> dict[str, float]:
    """The process's resident memory now and at its peak (Linux: /proc; elsewhere the
    peak alone, from getrusage), in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return {
            name: round(int(fields[key].split()[0]) / 1024, 1)
            for name, key in (("resident", "VmRSS"), ("peak", "VmHWM"))
            if key in fields
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return {"peak": round(peak / (1 << 20), 1)}


# The soft limit set when the hard one is unlimited.
_OPEN_FILES_WITHOUT_HARD_LIMIT = 1 << 20


def _raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to the hard one, as the JVM and Go's
    runtime do: each connection holds a descriptor, and a soft limit of 1024 (systemd's
    and most shells' default) would refuse connections past about a thousand (asyncio
    stops accepting for a second at each EMFILE) where the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_FILES_WITHOUT_HARD_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", extra={"error": str(exc)})
            return
        log.info("open-file limit raised", extra={"from": soft, "to": target})


def _precisions_verified(bundles: Sequence[Bundle], served: Settings) -> bool:
    """False, after saying why on stderr, when a bundle was not verified at the requested
    precision (service.runtime.precision_refusal, which warns instead with
    --allow-unverified-precision)."""
    from service.runtime import precision_refusal

    for bundle in bundles:
        refusal = precision_refusal(bundle, served)
        if refusal is not None:
            _say(f"hornet serve: {refusal}")
            return False
    return True


def _load_model_missing(settings: Settings) -> str | None:
    """What --load-model names that no bundle is of, said as a refusal; None if nothing."""
    names = {name for name, _ in settings.loadable()}
    missing = [name for name in settings.load_model if name != "*" and name not in names]
    if not missing:
        return None
    return (
        f"--load-model names {', '.join(map(repr, missing))}: no bundle is of "
        f"{'that model' if len(missing) == 1 else 'those models'} (bundles: "
        f"{', '.join(sorted(names)) or 'none'})"
    )


def page_url(config: uvicorn.Config, port: int | None = None) -> str:
    """The try-it page's address (GET /); a wildcard bind is shown as the loopback.
    `port`: the port bound, where the config asked for any (port 0)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(config.host, config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if config.is_ssl else 'http'}://{host}:{port or config.port}/"


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal turns readiness false before anything stops,
    whose shutdown closes the batch queues at the drain bound (503s, not uvicorn's bare
    500s for cancelled requests), and which exits normally after a graceful shutdown;
    with `exit_on_load_error` it also shuts down when a model fails to load, and it shuts
    down when a model's engines keep failing (--max-engine-failures)."""

    def __init__(
        self,
        config: uvicorn.Config,
        pool: ModelPool,
        drain_timeout_s: float = 10.0,
        exit_on_load_error: bool = False,
        metrics_config: uvicorn.Config | None = None,
        certificate: ServedCertificate | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(config)
        self._pool = pool
        self._drain_timeout_s = drain_timeout_s
        self._exit_on_load_error = exit_on_load_error
        self._metrics_config = metrics_config
        self._certificate = certificate
        self._handshake_timeout_s = handshake_timeout_s
        self.load_failed = False
        self.listen_failed: str | None = None

    async def on_tick(self, counter: int) -> bool:
        """Checked by uvicorn's main loop every 0.1 s: True shuts the server down."""
        if self._exit_on_load_error and self._pool.load_error is not None:
            self.load_failed = True
            return True
        if self._pool.engine_failure is not None:
            self._pool.begin_drain()
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._pool.begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once shut down (the process would die by
        # SIGTERM); a drained server's exit is a normal one.
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn starts the app's lifespan (the models begin loading) and its state; the
        # listeners are made here, where a TLS handshake gets a time limit.
        await super().startup(sockets=[])
        if not self.started:
            return
        listeners = [(self.config, "--port")]
        if self._metrics_config is not None:
            listeners.append((self._metrics_config, "--metrics-port"))
        for config, flag in listeners:
            if not await self._listen(config, flag):
                return
        url = page_url(self.config, self.servers[0].sockets[0].getsockname()[1])
        log.info(f"try the models in a browser: {url}", extra={"url": url})

    async def _listen(self, config: uvicorn.Config, flag: str) -> bool:
        """Listen on `config`'s port with its protocol class and app (uvicorn's shutdown
        closes the listener and its connections). Over TLS a connection is counted by
        --max-connections from its acceptance and its handshake must end within
        --client-timeout-s (service.tls_listener; asyncio's TLS listeners count a
        connection only once its handshake is done, which may take 60 s). False,
        logged and the server stopping, where the port cannot be had."""
        if not config.loaded:
            config.load()
        self._follow_certificate(config)
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        try:
            if config.ssl:
                listener: asyncio.Server | TlsListener = TlsListener(
                    listening_sockets(config.host, config.port, config.backlog),
                    protocol,
                    config.http_protocol_class.port_connections,
                    config.ssl,
                    self._handshake_timeout_s,
                )
            else:
                listener = await loop.create_server(
                    protocol, host=config.host, port=config.port, backlog=config.backlog
                )
        except OSError as exc:
            self.listen_failed = f"{flag} {config.port}: {exc}"
            log.error(f"cannot listen on {flag}", extra={"error": str(exc)})
            self.should_exit = True
            return False
        self.servers.append(listener)
        host, port = listener.sockets[0].getsockname()[:2]
        address = f"{'https' if config.ssl else 'http'}://{f'[{host}]' if ':' in host else host}"
        served = "the API" if flag == "--port" else "/metrics and the probes"
        log.info(f"listening: {served}", extra={"url": f"{address}:{port}"})
        return True

    def _follow_certificate(self, config: uvicorn.Config) -> None:
        """A TLS listener's new handshakes get the certificate read last (service.tls)."""
        if self._certificate is not None and config.ssl is not None:
            self._certificate.serve_on(config.ssl)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._pool.close_within(self._drain_timeout_s)
        await super().shutdown(sockets)


serve_command = Command(
    help="serve model bundles over HTTP (no torch needed)",
    description=DESCRIPTION,
    add_arguments=add_serve_flags,
    run=serve,
)
