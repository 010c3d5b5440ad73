"""Hostile /v2 infer bodies against a real `python -m service` process: each is refused
with 400 and `{"error": "invalid_infer_request: <the problem>"}`, the server stays alive
and ready, and its peak resident memory stays within MAX_GROWTH_BYTES of where it
started (no case makes it allocate what a body only declares)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx
import pytest

from service.testing import running_server
from tests.helpers.memory import memory_of

MEMORY_CAP_BYTES = 4 << 30  # address space: a case that tried a big allocation fails fast
MAX_GROWTH_BYTES = 100 << 20
IMAGE_SHAPE = [1, 224, 224, 3]
IMAGE_ELEMENTS = 224 * 224 * 3
INFER = "/v2/models/tiny_cls/infer"


@pytest.fixture(scope="module")
def server(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real server over the tiny classifier, its address space capped, warmed by one
    valid request; yields a client, the process and its memory before any hostile case."""
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    log_path = tmp_path_factory.mktemp("hostile") / "server.log"
    server = running_server(flags, log_path=log_path, memory_limit_bytes=MEMORY_CAP_BYTES)
    with server as (base_url, process, _), httpx.Client(base_url=base_url, timeout=60) as client:
        warm = client.post(INFER, json=json_image([0] * IMAGE_ELEMENTS))
        assert warm.status_code == 200, warm.text
        yield client, process, memory_of(process.pid)


def json_body(name: str, shape: list, datatype: str, data: object) -> tuple[bytes, dict]:
    spec = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    return json.dumps({"inputs": [spec]}).encode(), {"Content-Type": "application/json"}


def json_image(data: list, datatype: str = "UINT8") -> dict:
    return {"inputs": [{"name": "image", "shape": IMAGE_SHAPE, "datatype": datatype, "data": data}]}


def binary_body(
    name: str, shape: list, datatype: str, data: bytes, header_length: str | bytes | None = None
) -> tuple[bytes, dict]:
    """A binary-tensor-extension body; `header_length` overrides the true header length."""
    spec = {"name": name, "shape": shape, "datatype": datatype,
            "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    header = json.dumps({"inputs": [spec]}).encode()
    length = str(len(header)) if header_length is None else header_length
    return header + data, {
        "Inference-Header-Content-Length": length,
        "Content-Type": "application/octet-stream",
    }


def raw_body(text: bytes) -> tuple[bytes, dict]:
    return text, {"Content-Type": "application/json"}


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def zeros(datatype_size: int) -> bytes:
    return b"\0" * (IMAGE_ELEMENTS * datatype_size)


def deep(depth: int, inner: bytes = b"0") -> bytes:
    return b"[" * depth + inner + b"]" * depth


ONE_PIXEL = b"\0"
CASES = {
    # Inference-Header-Content-Length that is no byte count of this body.
    "header_length_beyond_the_body": (
        binary_body("image", [1], "UINT8", ONE_PIXEL, header_length="999999"),
        "Inference-Header-Content-Length is '999999'",
    ),
    "header_length_negative": (
        binary_body("image", [1], "UINT8", ONE_PIXEL, header_length="-5"),
        "Inference-Header-Content-Length is '-5'",
    ),
    "header_length_not_a_number": (
        binary_body("image", [1], "UINT8", ONE_PIXEL, header_length="12abc"),
        "Inference-Header-Content-Length is '12abc'",
    ),
    "header_length_in_non_ascii_digits": (  # str.isdigit() is true for '²'; int() is not
        binary_body("image", [1], "UINT8", ONE_PIXEL, header_length=b"\xb2"),
        "Inference-Header-Content-Length is '\u00b2'",
    ),
    # Shapes declaring far more than the few bytes sent.
    **{
        f"json_shape_of_{rows}_rows_over_4_values": (
            json_body("image", [rows, 224, 224, 3], "UINT8", [0, 0, 0, 0]),
            f"4 data elements for shape [{rows}, 224, 224, 3]",
        )
        for rows in (10**5, 10**7, 10**9)
    },
    **{
        f"binary_shape_of_{rows}_rows_over_4_bytes": (
            binary_body("image", [rows, 224, 224, 3], "UINT8", b"\0" * 4),
            f"4 bytes of binary data; shape [{rows}, 224, 224, 3] of UINT8 needs",
        )
        for rows in (10**5, 10**7, 10**9)
    },
    **{
        f"binary_bytes_shape_of_{rows}_rows_over_one_element": (
            binary_body("encoded_image", [rows, 1], "BYTES", bytes_elements(b"ab")),
            f"1 BYTES elements for shape [{rows}, 1]",
        )
        for rows in (10**5, 10**7, 10**9)
    },
    "json_bytes_shape_of_1000000000_rows_over_one_string": (
        json_body("encoded_image", [10**9, 1], "BYTES", ["YWI="]),
        "1 data elements for shape [1000000000, 1]",
    ),
    # Datatypes the image input does not take (at its full shape, so only the type is wrong).
    **{
        f"json_{datatype}_image": (
            raw_body(json.dumps(json_image(data, datatype)).encode()),
            f"must be UINT8 (or FP32 on the 0..255 scale), not {datatype}",
        )
        for datatype, data in [
            ("INT64", [0] * IMAGE_ELEMENTS),
            ("FP64", [0.0] * IMAGE_ELEMENTS),
            ("BOOL", [False] * IMAGE_ELEMENTS),
            ("BYTES", ["AA=="] * IMAGE_ELEMENTS),
        ]
    },
    **{
        f"binary_{datatype}_image": (
            binary_body("image", IMAGE_SHAPE, datatype, data),
            f"must be UINT8 (or FP32 on the 0..255 scale), not {datatype}",
        )
        for datatype, data in [
            ("INT64", zeros(8)),
            ("FP64", zeros(8)),
            ("BOOL", zeros(1)),
            ("BYTES", bytes_elements(*[b""] * IMAGE_ELEMENTS)),
        ]
    },
    "fp32_image_off_the_0_255_scale": (  # FP32 is taken, on the pixel scale only
        raw_body(json.dumps(json_image([1000.0] * IMAGE_ELEMENTS, "FP32")).encode()),
        "as FP32 takes pixel values in 0..255",
    ),
    "fp32_past_its_range": (  # was cast to inf with numpy's overflow warning in the log
        json_body("image", [1, 1, 1, 3], "FP32", [1e40, 0.0, 0.0]),
        "values outside the range of float32",
    ),
    "unknown_datatype": (
        json_body("image", IMAGE_SHAPE, "FP8", [0] * IMAGE_ELEMENTS),
        "unknown datatype 'FP8'",
    ),
    # JSON data whose elements are not all of one numeric type.
    **{
        f"json_data_mixing_{kind}": (
            raw_body(json.dumps(json_image([odd] + [0] * (IMAGE_ELEMENTS - 1))).encode()),
            "data is not numeric",
        )
        for kind, odd in [
            ("strings_and_numbers", "a"),
            ("objects_and_numbers", {"a": 1}),
            ("null_and_numbers", None),
            ("lists_and_numbers", [0]),
        ]
    },
    "json_data_ragged": (json_body("image", [2, 2], "UINT8", [[1, 2], [3]]), "data is not numeric"),
    "json_data_integers_past_int64": (json_body("image", [1], "UINT8", [10**30]), "not numeric"),
    "json_bytes_data_not_strings": (
        json_body("encoded_image", [2], "BYTES", [1, "YWI="]),
        "BYTES data must be strings",
    ),
    # BYTES elements whose length prefix lies.
    "bytes_length_prefix_of_4_gb": (
        binary_body("encoded_image", [1], "BYTES", struct.pack("<I", 0xFFFFFFFF) + b"abcd"),
        "BYTES element of 4294967295 bytes overruns the binary data",
    ),
    "bytes_length_prefix_truncated": (
        binary_body("encoded_image", [1], "BYTES", b"\xff\xff"),
        "truncated BYTES element length",
    ),
    # JSON nested 100,000 deep.
    "data_nested_100000_deep": (
        raw_body(
            b'{"inputs":[{"name":"image","shape":[1],"datatype":"UINT8","data":'
            + deep(100_000)
            + b"}]}"
        ),
        "recursion limit exceeded",
    ),
    "body_nested_100000_deep_in_arrays": (raw_body(deep(100_000)), "recursion limit exceeded"),
    "body_nested_100000_deep_in_objects": (
        raw_body(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        "recursion limit exceeded",
    ),
    "binary_header_nested_100000_deep": (
        (deep(100_000), {"Inference-Header-Content-Length": str(200_001)}),
        "recursion limit exceeded",
    ),
    # Shape entries that are no dimension.
    "negative_dimension": (
        json_body("image", [-1, 224, 224, 3], "UINT8", [0]),
        "inputs.0.shape.0: Input should be greater than or equal to 0",
    ),
    "zero_images": (json_body("image", [0, 224, 224, 3], "UINT8", []), "holds no images"),
    "zero_height": (
        json_body("image", [1, 0, 224, 3], "UINT8", []),
        "must have shape [N, 224, 224, 3]",
    ),
    "fractional_dimension": (
        json_body("image", [1.5, 224, 224, 3], "UINT8", [0]),
        "inputs.0.shape.0: Input should be a valid integer",
    ),
    "string_dimension": (
        json_body("image", ["many", 224, 224, 3], "UINT8", [0]),
        "inputs.0.shape.0: Input should be a valid integer",
    ),
    "dimension_past_int64": (
        json_body("image", [2**64, 224, 224, 3], "UINT8", [0]),
        "inputs.0.shape.0: Input should be less than or equal to 9223372036854775807",
    ),
    "json_shape_whose_product_overflows_int64": (  # 2**62 * 4 wraps round to 0 in int64
        json_body("image", [2**62, 4], "UINT8", []),
        "0 data elements for shape [4611686018427387904, 4] (18446744073709551616 elements)",
    ),
    "binary_shape_whose_product_overflows_int64": (
        binary_body("image", [2**62, 4], "UINT8", b""),
        "0 bytes of binary data; shape [4611686018427387904, 4] of UINT8 needs "
        "18446744073709551616",
    ),
    "empty_shape_too_big_for_numpy": (
        json_body("image", [0, 2**62, 2**62], "UINT8", []),
        "shape [0, 4611686018427387904, 4611686018427387904] is not a valid tensor shape",
    ),
    "shape_of_100_dimensions": (
        json_body("image", [1] * 100, "UINT8", [0]),
        "inputs.0.shape: List should have at most 32 items after validation, not 100",
    ),
    # Request parameters past what Triton's types hold (uint64; a float for the threshold):
    # 10**400 was a 500 from the timeout, whose microseconds no float holds.
    **{
        f"parameter_{name}_{label}": (
            raw_body(
                json.dumps(
                    {**json_image([0] * IMAGE_ELEMENTS), "parameters": {name: value}}
                ).encode()
            ),
            fact,
        )
        for name, label, value, fact in [
            ("timeout", "10_to_400", 10**400, "parameters.timeout takes a whole number"),
            ("timeout", "2_to_64", 2**64, "microseconds up to 2**64 - 1"),
            ("priority", "10_to_400", 10**400, "is not a priority level"),
            ("score_threshold", "10_to_400", 10**400, "takes a number in 0..1"),
        ]
    },
    # A few MB of invalid inputs: refused at the first, not with a million error messages.
    "a_million_empty_inputs": (
        raw_body(b'{"inputs":[' + b"{}," * 1_000_000 + b"{}]}"),
        "inputs.0.name: Field required",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_infer_body_is_refused_with_400_and_memory_stays_flat(server, case) -> None:
    client, process, before = server
    (body, headers), fact = CASES[case]
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400, response.text[:500]
    error = response.json()
    assert set(error) == {"error"}
    assert error["error"].startswith("invalid_infer_request: ")
    assert fact in error["error"]
    assert process.poll() is None
    assert client.get("/v2/health/ready").status_code == 200
    after = memory_of(process.pid)
    assert after["VmHWM"] - before["VmHWM"] < MAX_GROWTH_BYTES, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < MAX_GROWTH_BYTES, (before, after)


def test_json_elements_are_not_kept_once_converted() -> None:
    """A JSON tensor's elements parse to Python objects (a float: 24 bytes and an 8-byte
    pointer); once they are an array, the parsed request no longer holds them, so a
    request waiting for its answer holds its tensor (1 byte an element for UINT8) and
    not 32x that. Measured with tracemalloc, which numpy reports to."""
    import gc
    import tracemalloc

    from service import kserve

    images = 8
    elements = images * IMAGE_ELEMENTS
    body = json.dumps(json_image([1.0] * elements)).encode()
    body = body.replace(b'"shape": [1,', f'"shape": [{images},'.encode())
    tracemalloc.start()
    try:
        parsed, tensors = kserve.parse_infer_request(body, None)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (tensor,) = tensors
    assert tensor.array.shape == (images, 224, 224, 3) and tensor.array.dtype == "uint8"
    assert held < 2 * elements, f"{held / elements:.1f} bytes held per element"
    assert (tensor.array == 1).all() and parsed.inputs[0].name == "image"


def test_json_past_the_element_limit_is_refused_before_it_is_parsed(server) -> None:
    """Seven 224 x 224 RGB images as JSON UINT8 elements (1,053,696 > 2^20): 413 naming the
    binary extension, before a Python object is made of an element (memory flat); six
    (903,168) are served."""
    client, process, before = server
    for images, status in ((7, 413), (6, 200)):
        shape = [images, 224, 224, 3]
        body, headers = json_body("image", shape, "UINT8", [3] * images * IMAGE_ELEMENTS)
        response = client.post(INFER, content=body, headers=headers)
        assert response.status_code == status, response.text[:300]
        if status == 413:
            error = response.json()["error"]
            assert error.startswith("payload_too_large: ") and "binary tensor extension" in error
            after = memory_of(process.pid)
            assert after["VmHWM"] - before["VmHWM"] < MAX_GROWTH_BYTES, (before, after)
    assert len(response.json()["outputs"][0]["data"]) == 6 * 10  # six rows of ten logits


def test_an_error_quotes_at_most_a_bounded_part_of_what_the_client_sent(server) -> None:
    """An input named by a megabyte is refused with an error that quotes its start, cut
    at service.errors.MAX_DETAIL_CHARS and saying how much was cut, not the megabyte."""
    from service.errors import MAX_DETAIL_CHARS

    client, process, _ = server
    name = "n" * (1 << 20)
    body, headers = binary_body(name, [1], "UINT8", ONE_PIXEL)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("invalid_infer_request: ") and "nnnnnnnn" in error
    assert len(response.content) < MAX_DETAIL_CHARS + 100, len(response.content)
    assert error.endswith(" characters more)")
    cut = int(error.rsplit("(", 1)[1].split()[0])
    assert len(error) - len(" characters more)") - len(str(cut)) - len("... (") + cut > 1 << 20
    assert process.poll() is None
