"""Open Inference Protocol (KServe v2) tensors: request and response bodies, JSON and binary.

A request body is JSON, or, with the binary tensor extension, a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw data of the inputs that
declare `parameters.binary_data_size`, in input order. Numeric tensors travel as
little-endian row-major bytes; BYTES tensors as elements each prefixed by its 4-byte
little-endian length (Triton's serialisation). This module knows no models and no HTTP
framework: it turns bodies into numpy arrays and arrays into bodies.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import PayloadTooLarge, ServiceError, validation_problems

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMERIC_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
# Bounds that keep a declared shape cheap to check and printable in an error message:
# numpy 1's dimension limit, and numpy's index type (int64) per dimension.
MAX_DIMENSIONS = 32
MAX_DIMENSION = int(np.iinfo(np.int64).max)


class InvalidInferRequest(ServiceError):
    status_code = 400
    code = "invalid_infer_request"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestInput(_Open):
    name: str
    shape: list[Annotated[int, Field(ge=0, le=MAX_DIMENSION)]] = Field(
        max_length=MAX_DIMENSIONS, fail_fast=True, description="dimensions, the batch axis first"
    )
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Open):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(_Open):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    # fail_fast: a body of a million bad inputs reports the first, not a million errors.
    inputs: list[RequestInput] = Field(min_length=1, fail_fast=True)
    outputs: list[RequestOutput] | None = Field(None, fail_fast=True)


@dataclass
class Tensor:
    """One decoded input: a numpy array (object array of bytes for BYTES)."""

    name: str
    datatype: str
    array: np.ndarray
    binary: bool


@dataclass
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def json_length(body: bytes, header_length: str | None) -> int:
    """The byte count of the request's JSON: the whole body, or its header under the
    binary extension (nothing is copied)."""
    return len(body) if header_length is None else _header_end(body, header_length)


def check_listed(count: int, max_elements: int, counted: str, instead: str) -> None:
    """Refuse a request listing more than `max_elements` elements (`count` of `counted`)
    before any is converted: a listed element costs a Python object while it is parsed or
    converted, with the interpreter lock held; `instead` names the binary form, which
    carries any tensor with one copy."""
    if count > max_elements:
        raise PayloadTooLarge(
            f"{count} {counted}; listed elements are taken up to {max_elements} a request "
            f"(--max-listed-elements): send larger tensors {instead}"
        )


def parse_infer_request(
    body: bytes, header_length: str | None, max_elements: int | None = None
) -> tuple[InferRequest, list[Tensor]]:
    """The request's JSON header and its inputs as arrays, checked against their shapes;
    with `max_elements`, JSON that could list more elements is refused before it is
    parsed (elements are separated by commas, which the header's other parts and base64
    strings use a few of at most)."""
    header, binary = _split(body, header_length)
    if max_elements is not None:
        check_listed(
            header.count(b",") + 1,
            max_elements,
            "comma-separated values in the request's JSON",
            "with the binary tensor extension (tritonclient: binary_data=True)",
        )
    request = validated_request(header)
    tensors, offset = [], 0
    for spec in request.inputs:
        size = spec.parameters.get("binary_data_size")
        if size is None:
            tensors.append(_from_json(spec))
            # The parsed elements are Python objects, 8 to 32 bytes each (a float: its
            # object and a pointer): not kept while the request waits for its answer.
            spec.data = None
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInferRequest(
                f"input {spec.name!r}: binary_data_size {size!r} does not fit the "
                f"{len(binary) - offset} binary bytes left after the JSON header"
            )
        tensors.append(from_binary(spec, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidInferRequest(
            f"{len(binary) - offset} bytes after the inputs' binary data belong to no input"
        )
    return request, tensors


def validated_request(header: bytes | dict[str, Any]) -> InferRequest:
    """The request's header (JSON text, or the fields of a gRPC request), checked."""
    try:
        if isinstance(header, dict):
            return InferRequest.model_validate(header)
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        problems = validation_problems(exc.errors(), whole="body")
        raise InvalidInferRequest(f"not an inference request: {problems}") from exc


def from_values(spec: RequestInput, values: Sequence[Any], dtype: type | None) -> Tensor:
    """An input whose elements came as typed values (gRPC's InferTensorContents, each
    field read as numpy `dtype`; None for BYTES, whose elements are kept as they are),
    their count checked against the shape before any is converted, numbers then checked
    against the datatype's range as JSON data is."""
    count = _element_count(spec)
    if len(values) != count:
        raise InvalidInferRequest(
            f"input {spec.name!r}: {len(values)} data elements for shape {spec.shape} "
            f"({count} elements)"
        )
    if spec.datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    else:
        typed = np.fromiter(values, dtype=dtype, count=count)
        array = _cast_checked(typed, _numeric_dtype(spec), spec.name)
    return Tensor(spec.name, spec.datatype, _shaped(array, spec), binary=True)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    length = _header_end(body, header_length)
    return body[:length], body[length:]


def _header_end(body: bytes, header_length: str) -> int:
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > len(body):
        raise InvalidInferRequest(
            f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON header's byte count "
            f"(the body has {len(body)} bytes)"
        )
    return int(text)


def _element_count(spec: RequestInput) -> int:
    """The shape's element count, exact: a product that overflowed int64 could wrap
    round to the few elements sent."""
    return math.prod(spec.shape)


def _shaped(array: np.ndarray, spec: RequestInput) -> np.ndarray:
    """`array` in the declared shape; one numpy cannot hold (a zero next to dimensions
    whose product is past its maximum size) is the client's mistake, not ours."""
    try:
        return array.reshape(spec.shape)
    except (ValueError, OverflowError) as exc:
        raise InvalidInferRequest(
            f"input {spec.name!r}: shape {spec.shape} is not a valid tensor shape ({exc})"
        ) from exc


def _from_json(spec: RequestInput) -> Tensor:
    if spec.data is None:
        raise InvalidInferRequest(
            f"input {spec.name!r} has neither 'data' nor parameters.binary_data_size"
        )
    count = _element_count(spec)
    if spec.datatype == BYTES:
        flat = list(_flatten(spec.data))
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInferRequest(f"input {spec.name!r}: BYTES data must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [v.encode("utf-8") for v in flat]
    else:
        dtype = _numeric_dtype(spec)
        try:
            values = np.asarray(spec.data, dtype=np.float64 if dtype.kind == "f" else None)
        except (TypeError, ValueError) as exc:
            raise InvalidInferRequest(f"input {spec.name!r}: data is not numeric") from exc
        if values.dtype == object or values.dtype.kind not in "biuf":
            raise InvalidInferRequest(f"input {spec.name!r}: data is not numeric")
        array = _cast_checked(values.reshape(-1), dtype, spec.name)
    if array.size != count:
        raise InvalidInferRequest(
            f"input {spec.name!r}: {array.size} data elements for shape {spec.shape} "
            f"({count} elements)"
        )
    return Tensor(spec.name, spec.datatype, _shaped(array, spec), binary=False)


def _flatten(data: Any):
    if isinstance(data, list):
        for value in data:
            yield from _flatten(value)
    else:
        yield data


def _cast_checked(values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.dtype.kind == "f" and not np.all(np.equal(np.floor(values), values)):
            raise InvalidInferRequest(f"input {name!r}: non-integer values for {dtype}")
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInferRequest(
                f"input {name!r}: values outside {info.min}..{info.max} for {dtype}"
            )
    # a JSON number past FP32's range would become inf, with numpy's overflow warning
    with np.errstate(over="raise"):
        try:
            return values.astype(dtype)
        except FloatingPointError:
            raise InvalidInferRequest(
                f"input {name!r}: values outside the range of {dtype}"
            ) from None


def _numeric_dtype(spec: RequestInput) -> np.dtype:
    dtype = NUMERIC_DATATYPES.get(spec.datatype)
    if dtype is None:
        raise InvalidInferRequest(
            f"input {spec.name!r}: unknown datatype {spec.datatype!r}; "
            f"known: {[*NUMERIC_DATATYPES, BYTES]}"
        )
    return dtype


def from_binary(spec: RequestInput, data: bytes) -> Tensor:
    """An input whose elements came as raw bytes (the binary extension, gRPC's
    raw_input_contents)."""
    count = _element_count(spec)
    if spec.datatype == BYTES:
        elements = deserialize_bytes(data, spec.name)
        if len(elements) != count:
            raise InvalidInferRequest(
                f"input {spec.name!r}: {len(elements)} BYTES elements for shape {spec.shape}"
            )
        array = np.empty(count, dtype=object)
        array[:] = elements
        return Tensor(spec.name, BYTES, _shaped(array, spec), binary=True)
    dtype = _numeric_dtype(spec)
    if len(data) != count * dtype.itemsize:
        raise InvalidInferRequest(
            f"input {spec.name!r}: {len(data)} bytes of binary data; shape {spec.shape} of "
            f"{spec.datatype} needs {count * dtype.itemsize}"
        )
    array = _shaped(np.frombuffer(data, dtype=dtype), spec)
    return Tensor(spec.name, spec.datatype, array, binary=True)


def deserialize_bytes(data: bytes, name: str = "") -> list[bytes]:
    """Elements of a BYTES tensor serialised as (uint32 little-endian length, bytes)*."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidInferRequest(f"input {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInferRequest(
                f"input {name!r}: BYTES element of {length} bytes overruns the binary data"
            )
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    return elements


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for element in array.reshape(-1):
        raw = element if isinstance(element, bytes) else str(element).encode("utf-8")
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: list[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    described, chunks = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.array.shape),
        }
        parameters = dict(output.parameters)
        if output.binary:
            raw = raw_bytes(output)
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        elif output.datatype == BYTES:
            entry["data"] = [_text(v) for v in output.array.reshape(-1)]
        else:
            entry["data"] = output.array.reshape(-1).tolist()
        if parameters:
            entry["parameters"] = parameters
        described.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = described
    header = json.dumps(response, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def raw_bytes(output: OutputTensor) -> bytes:
    """An output's elements as raw bytes."""
    if output.datatype == BYTES:
        return serialize_bytes(output.array)
    dtype = NUMERIC_DATATYPES[output.datatype]
    return np.ascontiguousarray(output.array, dtype=dtype).tobytes()


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
