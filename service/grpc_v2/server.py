"""The Open Inference Protocol (KServe v2) over gRPC (`--grpc-port`), beside the REST routes.

Triton's and KServe's gRPC clients (`tritonclient.grpc`, perf_analyzer `-i grpc`) reach the
same models as /v2 over REST: one model pool, pipeline and batcher, the same request
checks, limits, API keys, TLS certificate and metrics. The messages are those of
grpc_predict_v2.proto, read from its compiled descriptors into a descriptor pool of this
module's own (a process that also imports tritonclient, which registers the same
`inference.*` names in protobuf's default pool, keeps both); the handlers are generic
ones, so no generated code is needed.

Errors carry the REST route's code and sentence as their details ("bad_image: ...") under
the gRPC status of its HTTP status (`STATUS_CODES`); a 503 carries `retry-after` in its
trailing metadata. Bounds, as for the REST bodies: a message is at most --max-upload-mb
(gRPC refuses a bigger one, RESOURCE_EXHAUSTED, before it is read); at most
`max_upload_buffer / max_upload` calls run at once (more: RESOURCE_EXHAUSTED), and while
one runs its message counts in the budget for request bodies that REST uploads share
(--max-upload-buffer-mb; past it: UNAVAILABLE, retry-after 1). Counts of tensors,
parameters and dimensions are checked before they are copied out of the message, and an
input's elements before they are converted (in InferTensorContents, 4 or 8 bytes each).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

from service import __version__, kserve
from service.auth import KeyRing, key_refusal, presented_keys
from service.errors import (
    MAX_DETAIL_CHARS,
    InvalidParameters,
    RequestTimeout,
    ServiceError,
    bounded,
)
from service.kserve import BYTES, InvalidInferRequest, OutputTensor, Tensor
from service.logs import request_context
from service.metrics import ServiceMetrics
from service.middleware import UploadBuffer, record_request
from service.routers import v2
from service.runtime import ModelPool, ModelRunner
from service.settings import Settings
from service.statistics import RequestTimes
from service.tls import ServedCertificate
from service.tracing import grpc_span

log = logging.getLogger("hornet.service.grpc")

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"  # gRPC's health checking protocol (health.proto)
# The gRPC status of each HTTP status the service answers with.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# A connection with no call open this long is sent GOAWAY. Not --client-timeout-s (10 s) as
# for HTTP: an idle channel between a client's calls is ordinary, and gRPC clients log
# each GOAWAY they get.
IDLE_CONNECTION_S = 300.0
# RPCs that answer without a key unless --protect-probes (as /v2/health/* over REST).
PROBES = frozenset({"ServerLive", "ServerReady", "Check", "Watch"})
# How often an open stream looks at the server's state: a health Watch for a change of
# status, an idle ModelStreamInfer for the drain, which ends it (so that open streams do
# not hold the shutdown until --drain-timeout-s).
STREAM_CHECK_S = 0.5
# InferTensorContents' field for each datatype (FP16 has none: raw_input_contents only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
# Bounds checked before a request's fields become Python objects (every model takes one
# input; the classification and detection answers have two to five outputs).
MAX_TENSORS = 16
MAX_PARAMETERS = 64
# The parameter of a stream's answer that carries its stages (Server-Timing's syntax).
STREAM_TIMING = "server_timing"
# Requests of one ModelStreamInfer stream held at once, from their reading until their
# answers are written: enough to fill batches, few enough that one stream cannot take
# the queue (--max-queue-size: 64 by default).
STREAM_IN_FLIGHT = 16


def _load_services() -> tuple[dict[str, type], dict[str, Any]]:
    """Every message of the served services by its name, and the services' descriptors,
    built from the compiled protocol files in a descriptor pool of our own."""
    data = resources.files(__package__).joinpath("grpc_predict_v2.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    services = {name: pool.FindServiceByName(name) for name in (SERVICE, HEALTH)}
    messages = {
        message.name: message_factory.GetMessageClass(message)
        for service in services.values()
        for method in service.methods
        for message in (method.input_type, method.output_type)
    }
    return messages, services


MESSAGES, SERVICES = _load_services()


class UnknownService(ServiceError):
    status_code = 404
    code = "unknown_service"


class MalformedMessage(ServiceError):
    """A request message that is not the method's protobuf message (gRPC's framing held,
    its bytes did not parse): the REST routes' 400 for a malformed body."""

    status_code = 400
    code = "bad_request"


def _malformed(message_type: str, error: DecodeError) -> MalformedMessage:
    return MalformedMessage(f"the request is not a valid {message_type} message: {error}")


class Abort(Exception):
    """Ends a call with `code`, `details` and `metadata` (a 503's retry-after)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        http_status: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(details)
        self.code, self.details, self.http_status = code, details, http_status
        self.metadata = metadata


class InferenceService:
    """The RPCs' bodies: each takes a request message and returns a response message."""

    def __init__(self, pool: ModelPool, settings: Settings) -> None:
        self.pool, self.settings = pool, settings

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return MESSAGES["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return MESSAGES["ServerReadyResponse"](ready=self.pool.ready)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """gRPC health checking: the server ("") or the inference service SERVING once
        every model is loaded and warmed up (as /readyz), else NOT_SERVING; another
        service name is NOT_FOUND, as the protocol asks."""
        if request.service not in ("", SERVICE):
            raise UnknownService(
                f"no service {request.service[:200]!r}; this server has {SERVICE!r}"
            )
        return _health(self._serving())

    def _serving(self) -> str:
        """Check's and Watch's status of the server: SERVING once ready (never while
        draining: the drain turns readiness off), else NOT_SERVING."""
        return "SERVING" if self.pool.ready else "NOT_SERVING"

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """gRPC health checking's streaming form: Check's status at once, then each change
        of it (seen within STREAM_CHECK_S). Once the server drains: NOT_SERVING, and the
        call ends, so that it does not hold the shutdown. An unknown service is
        SERVICE_UNKNOWN, and the call stays open, as the protocol asks."""
        known = request.service in ("", SERVICE)
        sent = None
        while True:
            status = self._serving() if known else "SERVICE_UNKNOWN"
            if status != sent:
                yield _health(status)
                sent = status
            if self.pool.draining:
                return
            await asyncio.sleep(STREAM_CHECK_S)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        v2.find_model(self.pool, request.name, request.version or None)
        return MESSAGES["ModelReadyResponse"](ready=self.pool.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return MESSAGES["ServerMetadataResponse"](
            name=v2.SERVER_NAME, version=__version__, extensions=v2.EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = await v2.model_metadata(self.pool, request.name, request.version or None)
        tensor = MESSAGES["ModelMetadataResponse"].TensorMetadata
        return MESSAGES["ModelMetadataResponse"](
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]],
            outputs=[tensor(**t) for t in metadata["outputs"]],
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every bundle given and its state, as `POST /v2/repository/index` (read-only)."""
        if request.repository_name:
            raise InvalidParameters(
                "this server's model repositories have no names: send an empty repository_name"
            )
        entries = v2.repository_entries(self.pool, request.ready)
        return json_format.ParseDict({"models": entries}, MESSAGES["RepositoryIndexResponse"]())

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Load or reload a model (--model-control-mode explicit), as
        `POST /v2/repository/models/{model}/load`."""
        _control_request(request, allowed={})
        await self.pool.load_model(request.model_name)
        return MESSAGES["RepositoryModelLoadResponse"]()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Unload a model (--model-control-mode explicit), as
        `POST /v2/repository/models/{model}/unload`."""
        _control_request(request, allowed={"unload_dependents": "bool_param"})
        await self.pool.unload_model(request.model_name)
        return MESSAGES["RepositoryModelUnloadResponse"]()

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's logging extension, as GET (an empty request) and POST /v2/logging."""
        settings = v2.change_log_settings(self.settings, parameters(request.settings))
        answer = MESSAGES["LogSettingsResponse"]()
        for name, value in settings.items():
            kind = _SETTING_KINDS[type(value)]
            setattr(answer.settings[name], kind, value)
        return answer

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's trace extension, as GET (no settings) and POST /v2/trace/setting, or
        /v2/models/{model}/trace/setting for a request's model_name; a setting given
        without a value is cleared (JSON's null over REST)."""
        changes = {name: list(value.value) or None for name, value in request.settings.items()}
        settings = v2.change_trace_settings(self.pool, request.model_name or None, changes)
        answer = MESSAGES["TraceSettingResponse"]()
        for name, value in settings.items():
            answer.settings[name].value.extend(value if isinstance(value, list) else [value])
        return answer

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The configuration /v2/models/{model}/config answers, as Triton's message."""
        config = await v2.model_config(self.pool, request.name, request.version or None)
        return json_format.ParseDict({"config": config}, MESSAGES["ModelConfigResponse"]())

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model's statistics, or every model's for an empty name (as /v2/models/stats)."""
        answer = v2.statistics(self.pool, request.name, request.version or None)
        return json_format.ParseDict(answer, MESSAGES["ModelStatisticsResponse"]())

    async def ModelInfer(
        self, request: Any, context: grpc.aio.ServicerContext, *, unary: bool = True
    ) -> Any:
        """One inference, with its stages (as the REST answers' Server-Timing header): a
        unary call's in its trailing metadata (`server-timing`), a stream's answer in its
        `server_timing` parameter (a stream's trailers come once, at its end)."""
        runner = v2.find_model(self.pool, request.model_name, request.model_version or None)
        self.pool.require_ready()
        times = RequestTimes()
        method = "ModelInfer" if unary else "ModelStreamInfer"
        span = functools.partial(grpc_span, SERVICE, method)
        traced = self.pool.tracing.request(runner.name, times, span)
        with traced, runner.in_use():  # an unload or reload answers this request first
            answer = await self._infer(runner, request, context, times)
        if unary:  # beside the request id the call's wrapper put there
            timing = ("server-timing", times.server_timing())
            context.set_trailing_metadata((*context.trailing_metadata(), timing))
        else:
            answer.parameters[STREAM_TIMING].string_param = times.server_timing()
        return answer

    async def _infer(
        self, runner: ModelRunner, request: Any, context: Any, times: RequestTimes
    ) -> Any:
        deadline = time.monotonic() + self.settings.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, time.monotonic() + remaining)
        limit = self.settings.max_listed_elements
        if request.raw_input_contents:  # numpy views of the message's bytes: at once
            parsed, tensors = parse_infer_request(request, limit)
        else:  # typed contents are converted element by element: off the event loop
            parsed, tensors = await asyncio.to_thread(parse_infer_request, request, limit)

        async def gone() -> bool:
            return context.cancelled()

        outputs = await v2.infer_outputs(
            self.pool, runner, parsed, tensors, deadline=deadline, is_gone=gone, times=times
        )
        return infer_response(request.model_name, parsed.id, outputs)


# A log setting's value in Triton's message, by its type.
_SETTING_KINDS = {bool: "bool_param", int: "uint32_param", str: "string_param"}


def _control_request(request: Any, allowed: dict[str, str]) -> None:
    """A load or unload request holds no repository name and only the `allowed`
    parameters, each of its kind (as the REST routes' bodies: v2._control_parameters)."""
    if request.repository_name:
        raise InvalidParameters(
            "this server's model repositories have no names: send an empty repository_name"
        )
    wrong = sorted(
        name
        for name, value in request.parameters.items()
        if allowed.get(name) != value.WhichOneof("parameter_choice")
    )
    if wrong:
        taken = ", ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
        raise InvalidParameters(
            f"parameters not taken: {', '.join(map(repr, wrong))}; the parameters taken: "
            f"{taken} (a model's settings come from --model-setting, its files from its bundle)"
        )


def parse_infer_request(
    request: Any, max_elements: int | None = None
) -> tuple[kserve.InferRequest, list[Tensor]]:
    """A ModelInferRequest as the REST route's parsed request and input tensors; with
    `max_elements`, typed contents listing more elements are refused before any is
    converted."""
    _check_counts(request)
    if max_elements is not None and not request.raw_input_contents:
        listed = sum(len(getattr(t.contents, f)) for t in request.inputs for f in _CONTENTS)
        kserve.check_listed(
            listed,
            max_elements,
            "elements in the inputs' typed contents",
            "in raw_input_contents (tritonclient sends it)",
        )
    header = {
        "id": request.id or None,
        "parameters": parameters(request.parameters),
        "inputs": [
            {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in request.inputs
        ],
        "outputs": [
            {"name": o.name, "parameters": parameters(o.parameters)} for o in request.outputs
        ]
        or None,
    }
    parsed = kserve.validated_request(header)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInferRequest(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs: "
            "give every input's data there, or none"
        )
    tensors = []
    for index, (spec, given) in enumerate(zip(parsed.inputs, request.inputs, strict=True)):
        if raw:
            tensors.append(kserve.from_binary(spec, raw[index]))
            continue
        field = CONTENTS_FIELDS.get(spec.datatype)
        if field is None:
            raise InvalidInferRequest(
                f"input {spec.name!r}: {spec.datatype} data goes in raw_input_contents "
                "(InferTensorContents has no field for it)"
            )
        values = getattr(given.contents, field)
        tensors.append(kserve.from_values(spec, values, _CONTENTS_TYPES.get(field)))
    return parsed, tensors


# The numpy type of each InferTensorContents field: its values as the message holds them.
_CONTENTS_TYPES = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


_CONTENTS = sorted(set(CONTENTS_FIELDS.values()))  # each field once


def _check_counts(request: Any) -> None:
    """Refuses more tensors, parameters or dimensions than any model takes, before they
    are copied out of the message (each would cost tens of bytes per byte sent)."""
    tensors = [*request.inputs, *request.outputs]
    if len(request.inputs) > MAX_TENSORS or len(request.outputs) > MAX_TENSORS:
        raise InvalidInferRequest(
            f"{len(request.inputs)} inputs and {len(request.outputs)} outputs; at most "
            f"{MAX_TENSORS} of each"
        )
    if any(len(t.parameters) > MAX_PARAMETERS for t in [request, *tensors]):
        raise InvalidInferRequest(f"more than {MAX_PARAMETERS} parameters in one map")
    for given in request.inputs:
        if len(given.shape) > kserve.MAX_DIMENSIONS:
            raise InvalidInferRequest(
                f"input {given.name[:64]!r}: {len(given.shape)} dimensions; at most "
                f"{kserve.MAX_DIMENSIONS}"
            )


def parameters(entries: Any) -> dict[str, Any]:
    """A map of InferParameter as plain values."""
    values = {}
    for key, value in entries.items():
        choice = value.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(value, choice)
    return values


def _parameter(value: Any) -> Any:
    parameter = MESSAGES["ModelInferResponse"].ParametersEntry().value
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)
    return parameter


def infer_response(model: str, request_id_: str | None, outputs: list[OutputTensor]) -> Any:
    """The outputs as a ModelInferResponse, their data in raw_output_contents."""
    response = MESSAGES["ModelInferResponse"](
        model_name=model, model_version=v2.MODEL_VERSION, id=request_id_ or ""
    )
    for output in outputs:
        described = response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.array.shape)
        )
        for key, value in output.parameters.items():
            described.parameters[key].CopyFrom(_parameter(value))
        response.raw_output_contents.append(kserve.raw_bytes(output))
    return response


def _health(status: str) -> Any:
    """A HealthCheckResponse of the named ServingStatus."""
    response = MESSAGES["HealthCheckResponse"]
    return response(status=response.ServingStatus.Value(status))


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[bytes, bytes]]:
    """The call's metadata as (name, value) bytes, as the REST middleware reads headers."""
    return [
        (k.encode("latin-1"), v if isinstance(v, bytes) else v.encode("latin-1"))
        for k, v in context.invocation_metadata() or ()
    ]


async def _end(context: grpc.aio.ServicerContext, abort: Abort, rid: str) -> None:
    """End the call with the abort's status, its trailing metadata and the request id."""
    await context.abort(abort.code, abort.details, (*abort.metadata, ("x-request-id", rid)))


def _abort_for(exc: Exception) -> Abort:
    if isinstance(exc, ServiceError):
        code = STATUS_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)
        metadata = tuple(
            (k.lower(), v) for k, v in exc.headers.items() if k.lower() == "retry-after"
        )
        return Abort(code, bounded(f"{exc.code}: {exc.detail}"), exc.status_code, metadata)
    log.exception("unhandled error")
    return Abort(grpc.StatusCode.INTERNAL, f"internal_error: {type(exc).__name__}", 500)


class _Stream:
    """An open stream's place: the requests it holds (read, their answers not yet
    written), since when it has held none, and the task serving it (to end it when a new
    stream needs its place)."""

    def __init__(self) -> None:
        self.held = 0
        self.idle_since = time.monotonic()
        self.task = asyncio.current_task()
        self.evicted = False

    def took(self) -> None:
        self.held += 1

    def answered(self) -> None:
        self.held -= 1
        if self.held == 0:
            self.idle_since = time.monotonic()


class _Calls:
    """Wraps each RPC body with what the REST middleware does around a route: the API
    key, a request id, the errors as statuses, the request metrics and log line."""

    def __init__(
        self,
        service: InferenceService,
        settings: Settings,
        metrics: ServiceMetrics,
        uploads: UploadBuffer,
        keys: KeyRing,
    ) -> None:
        self.service, self.metrics, self.uploads = service, metrics, uploads
        self._keys = keys
        self._protect_probes = settings.protect_probes
        self._max_streams = concurrent_streams(settings)
        self._streams: set[_Stream] = set()
        # a unary call's message must arrive within it; a stream idle as long may be ended
        self._client_timeout_s = settings.client_timeout_s

    def handler(self, service: str, name: str) -> grpc.RpcMethodHandler:
        """A unary call. Registered as one whose request streams in (the same frames on the
        wire) so that its message is awaited here, within --client-timeout-s of the call's
        start: gRPC counts a call among its concurrent ones from its start, and a unary
        call's message is otherwise awaited for ever, so 16 calls each sending 10 bytes of
        a 1000-byte message took every place and every later call was refused."""
        body: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = getattr(
            self.service, name
        )
        route = f"/{service}/{name}"
        method = SERVICES[service].methods_by_name[name]

        async def call(_requests: object, context: grpc.aio.ServicerContext) -> Any:
            # (the message is read with context.read(): cheaper than the request iterator)
            metadata = _metadata(context)
            with request_context(dict(metadata)) as rid:
                # The id goes back with the status (one frame, not headers of their own).
                context.set_trailing_metadata((("x-request-id", rid),))
                try:
                    return await self._counted(route, lambda: checked(context, metadata))
                except Abort as abort:
                    await _end(context, abort, rid)

        async def checked(
            context: grpc.aio.ServicerContext, metadata: list[tuple[bytes, bytes]]
        ) -> Any:
            self._check_key(name, metadata)  # before its message is waited for
            request = await self._message(context, method.input_type.name)
            with self._held(request):
                return await body(request, context)

        return grpc.stream_unary_rpc_method_handler(
            call,
            request_deserializer=MESSAGES[method.input_type.name].FromString,
            response_serializer=MESSAGES[method.output_type.name].SerializeToString,
        )

    async def _message(self, context: grpc.aio.ServicerContext, message_type: str) -> Any:
        """A unary call's one request message, once it has all arrived; RequestTimeout
        (DEADLINE_EXCEEDED) when it has not within --client-timeout-s."""
        try:
            async with asyncio.timeout(self._client_timeout_s):
                request = await context.read()
        except DecodeError as exc:
            raise _malformed(message_type, exc) from None
        except TimeoutError:
            raise RequestTimeout(
                f"the request message did not arrive within {self._client_timeout_s:g} s of "
                "the call's start (--client-timeout-s)"
            ) from None
        if request is grpc.aio.EOF:
            raise InvalidParameters("the call ended without its request message")
        return request

    def stream_handler(self, service: str, name: str) -> grpc.RpcMethodHandler:
        """A call that answers with a stream: ModelStreamInfer (each request on it answered
        as ModelInfer answers it, counted, timed and logged as a request of its own, its
        failure an `error_message` that leaves the stream open) or the health Watch. Its
        key is checked once, at its start, and it takes one of the stream slots (at most
        half the concurrent calls: an open stream holds its call's slot, idle or not).
        When every slot is taken, the stream that has held no request for longest, if for
        --client-timeout-s or more, is ended (UNAVAILABLE) and its slot given to the new
        one: 8 streams opened and left idle, or sending a message that never completes,
        no longer keep every other client's streams out."""
        route = f"/{service}/{name}"
        method = SERVICES[service].methods_by_name[name]
        if method.client_streaming:
            answers = functools.partial(self._answered, route=route)
            make = grpc.stream_stream_rpc_method_handler
        else:
            watch = getattr(self.service, name)

            def answers(opening: Any, context: grpc.aio.ServicerContext, _: _Stream) -> Any:
                return watch(opening, context)  # idle from its start: it holds no request

            make = grpc.unary_stream_rpc_method_handler

        async def call(opening: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metadata = _metadata(context)
            with request_context(dict(metadata)) as rid:
                context.set_trailing_metadata((("x-request-id", rid),))
                try:
                    self._check_key(name, metadata)
                    if len(self._streams) >= self._max_streams and not self._evict_idlest():
                        raise Abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"overloaded: {self._max_streams} streams are open, the most this "
                            "server keeps (half its concurrent calls, the rest left to unary "
                            "calls), none idle for --client-timeout-s; close one, or call "
                            "ModelInfer",
                            503,
                        )
                except Abort as abort:
                    record_request(self.metrics, route, "gRPC", route, abort.http_status, 0.0)
                    await _end(context, abort, rid)
                stream = _Stream()
                self._streams.add(stream)
                try:
                    async for answer in answers(opening, context, stream):
                        yield answer
                except asyncio.CancelledError:
                    if not stream.evicted or stream.task is None:
                        raise
                    stream.task.uncancel()
                    await _end(context, self._evicted(), rid)
                finally:
                    self._streams.discard(stream)

        return make(
            call,
            request_deserializer=MESSAGES[method.input_type.name].FromString,
            response_serializer=MESSAGES[method.output_type.name].SerializeToString,
        )

    def _evict_idlest(self) -> bool:
        """End the open stream idle longest, if for --client-timeout-s or more (its task
        cancelled: it ends UNAVAILABLE); False when none has been idle that long."""
        now = time.monotonic()
        idle = [
            s for s in self._streams if s.held == 0 and now - s.idle_since >= self._client_timeout_s
        ]
        if not idle:
            return False
        idlest = min(idle, key=lambda stream: stream.idle_since)
        idlest.evicted = True
        self._streams.discard(idlest)  # its place is the new stream's from now
        if idlest.task is not None:
            idlest.task.cancel()
        return True

    def _evicted(self) -> Abort:
        return Abort(
            grpc.StatusCode.UNAVAILABLE,
            f"overloaded: this stream held no request for {self._client_timeout_s:g} s or more "
            "(--client-timeout-s) while every stream slot was taken, and its slot went to a "
            "new stream; open another when it is needed",
            503,
        )

    async def _answered(
        self,
        _requests: AsyncIterator[Any],  # read with context.read() instead: _next_request
        context: grpc.aio.ServicerContext,
        stream: _Stream,
        route: str,
    ) -> AsyncIterator[Any]:
        """The answers to a stream's requests as they are finished. At most
        STREAM_IN_FLIGHT of its requests are held at once, from their reading until their
        answers are written: the next message is read only then, so a client that sends
        without reading its answers is held back by gRPC's flow control, not buffered."""
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        finished: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        answer_type = MESSAGES["ModelStreamInferResponse"]

        async def infer(request: Any) -> Any:
            if isinstance(request, MalformedMessage):
                raise request  # answered as any failed request is, the stream left open
            with self._held(request):
                return await self.service.ModelInfer(request, context, unary=False)

        async def answer(request: Any) -> None:
            try:
                response = await self._counted(route, lambda: infer(request))
            except Abort as abort:
                echo = MESSAGES["ModelInferResponse"]()
                if not isinstance(request, MalformedMessage):
                    echo.model_name, echo.id = request.model_name[:MAX_DETAIL_CHARS], request.id
                finished.put_nowait(answer_type(error_message=abort.details, infer_response=echo))
            else:
                finished.put_nowait(answer_type(infer_response=response))

        async def read() -> None:
            try:
                while True:
                    await slots.acquire()  # before the next message is read
                    request = await self._next_request(context)
                    if request is None:
                        break
                    stream.took()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                finished.put_nowait(None)  # the end, or the reading failed

        reader = asyncio.create_task(read())
        try:
            while (item := await finished.get()) is not None:
                yield item
                stream.answered()
                slots.release()
            await reader  # raises what ended the reading early (the client's stream broke)
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _next_request(self, context: grpc.aio.ServicerContext) -> Any:
        """The stream's next request; None at its end, or when the server drains while
        none is coming (a request read is always answered: while draining, with 503); a
        message that is not a ModelInferRequest as its MalformedMessage, to be answered.
        Read with context.read(), not the call's request iterator, which ends for good at
        a message it cannot parse: the messages after it would go unanswered."""
        coming = asyncio.ensure_future(context.read())
        try:
            while not coming.done():
                await asyncio.wait({coming}, timeout=STREAM_CHECK_S)
                if not coming.done() and self.service.pool.draining:
                    return None
            request = coming.result()
        except DecodeError as exc:
            return _malformed("ModelInferRequest", exc)
        finally:
            coming.cancel()
        return None if request is grpc.aio.EOF else request

    async def _counted(self, route: str, run: Callable[[], Awaitable[Any]]) -> Any:
        """`run()`'s answer to one request, counted in flight, timed and logged under
        `route` (service.middleware.record_request); any failure raised as the Abort of its
        status (a client that cancelled: 499)."""
        started, status = time.perf_counter(), 200
        self.metrics.in_flight.inc()
        try:
            try:
                return await run()
            except Abort:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                raise _abort_for(exc) from exc
        except Abort as abort:
            status = abort.http_status
            raise
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            status = 499
            raise
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            record_request(self.metrics, route, "gRPC", route, status, elapsed)

    @contextlib.contextmanager
    def _held(self, request: Any) -> Iterator[None]:
        """The request's message counted in the server's budget for request bodies while
        its call runs (503 when the budget is spent, as a REST upload's)."""
        size = request.ByteSize()
        if not self.uploads.reserve(size):
            raise self.uploads.refusal(size)
        try:
            yield
        finally:
            self.uploads.release(size)

    def _check_key(self, name: str, metadata: list[tuple[bytes, bytes]]) -> None:
        if not self._keys.enabled or (name in PROBES and not self._protect_probes):
            return
        refusal = key_refusal(presented_keys(metadata), self._keys.keys())
        if refusal is not None:
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthorized: {refusal}", 401)


def concurrent_calls(settings: Settings) -> int:
    """How many calls run at once: as many largest messages as the upload budget holds."""
    return max(settings.upload_buffer_bytes // max(settings.max_upload_bytes, 1), 1)


def concurrent_streams(settings: Settings) -> int:
    """How many ModelStreamInfer streams are open at once: half the concurrent calls (at
    least one), since an open stream holds its call's slot for as long as it stays open,
    idle or not, and the other half stays for unary calls."""
    return max(concurrent_calls(settings) // 2, 1)


async def start_server(
    pool: ModelPool,
    settings: Settings,
    metrics: ServiceMetrics,
    uploads: UploadBuffer,
    keys: KeyRing,
    certificate: ServedCertificate | None = None,
) -> grpc.aio.Server:
    """The gRPC service listening on --host:--grpc-port (TLS with the HTTPS `certificate`,
    read again as its files change); `uploads` is the budget for request bodies and
    `keys` the API keys, which the REST routes share."""
    calls = _Calls(InferenceService(pool, settings), settings, metrics, uploads, keys)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.max_send_message_length", -1),
            # A connection that has not begun HTTP/2 (its preface) --client-timeout-s after
            # it opened is closed, as an HTTP connection's head clock closes it (it stayed
            # 60 s), and one with no call open for IDLE_CONNECTION_S gets GOAWAY (a client
            # makes a new one at its next call; it stayed for ever), so that neither can
            # fill --max-connections for long.
            ("grpc.server_handshake_timeout_ms", round(settings.client_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", round(IDLE_CONNECTION_S * 1000)),
            # --max-connection-age-s: GOAWAY once a connection is that old (its client
            # reconnects, through the Service, to any replica); its calls then have
            # --request-timeout-s before the connection is closed under them.
            *(
                [
                    ("grpc.max_connection_age_ms", round(age * 1000)),
                    ("grpc.max_connection_age_grace_ms", round(settings.request_timeout_s * 1000)),
                ]
                if (age := settings.max_connection_age_s)
                else []
            ),
            # gRPC core closes a connection past it as it is accepted (its connection quota)
            *(
                [("grpc.max_allowed_incoming_connections", n)]
                if (n := settings.max_connections)
                else []
            ),
        ],
        maximum_concurrent_rpcs=concurrent_calls(settings),
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                name,
                {
                    m.name: (calls.stream_handler if m.server_streaming else calls.handler)(
                        name, m.name
                    )
                    for m in service.methods
                },
            )
            for name, service in SERVICES.items()
        ]
    )
    address = f"{settings.host}:{settings.grpc_port}"
    if certificate is not None:
        bound = server.add_secure_port(address, _credentials(certificate))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"gRPC could not listen on {address}")
    await server.start()
    log.info("gRPC listening", extra={"address": address, "tls": certificate is not None})
    return server


def _credentials(certificate: ServedCertificate) -> grpc.ServerCredentials:
    """The HTTPS certificate and key as gRPC server credentials that follow the files: gRPC
    asks the fetcher before each new connection's handshake, and it answers the pair read
    last where that is newer than the one gRPC has (None: keep it)."""
    served, key, chain = certificate.grpc_pair()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        generation, key, chain = certificate.grpc_pair()
        if generation == served:
            return None
        served = generation
        return grpc.ssl_server_certificate_configuration([(key, chain)])

    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, chain)]), fetch
    )
