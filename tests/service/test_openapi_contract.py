"""The OpenAPI document tells the truth: every status a route answers is documented with
the body it carries, and requests the schema calls valid are served.

Two kinds of test. The document itself, walked as `app.openapi()` returns it: which
statuses each route lists and with which error schema. And schemathesis against a real
`python -m service` process on the demo bundles, twice: a plain server, and one with every
control on (explicit model control, log and trace settings, an API key), whose control
routes answer for real where the plain one refuses them with 403. Through its CLI (`st
run`, in a subprocess): the CLI runs the same phases and checks as a manual run does (coverage,
fuzzing, stateful), where the pytest plugin runs fewer; it needs no schema at collection
time; and a subprocess keeps hypothesis' hostile inputs away from this test process.
One test per phase, so each stays well inside conftest's TEST_TIMEOUT_S; the examples
phase is left out because the document holds no request examples (it would skip all).

The schemathesis run is deterministic (`--generation-deterministic`: derandomised, no
example database), single-worker and bounded (`--max-examples`). Its configuration:
- model names are drawn half the time from the demo models, so the /v2 routes reach real
  models and not only 404;
- `positive_data_acceptance` also expects 400, 413 and 415 from the image and infer
  routes: the schema says "bytes" and "a tensor", it cannot say "bytes that decode as an
  image of at most --max-pixels" or "a tensor of this model's shape", so a schema-valid
  body can still be refused with a documented client error;
- `not_a_server_error` allows 503 and 504 from those routes: a client's own deadline
  (`?timeout_ms=1`, v2's `timeout`) that cannot be met is refused at once (503) or
  times out (504) by design; a 500 still fails.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.schemas import ErrorResponse, V2ErrorResponse
from service.settings import DEMO_BUNDLES_DIR, Settings
from service.testing import running_server
from tests.helpers.logs import json_lines
from tests.helpers.otlp import running_collector

SERVER_MEMORY_BYTES = 8 * 1024**3
API_KEY = "contract-test-key-0123456789abcdef"
MAX_EXAMPLES = 20
PHASE_TIMEOUT_S = 100
IMAGE_ROUTES = ("/classify", "/segment", "/detect")
IMAGE_ROUTE_ERRORS = {"400", "404", "413", "415", "422", "500", "503", "504"}
V2_INFER_ROUTES = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
V2_INFER_ERRORS = IMAGE_ROUTE_ERRORS
V2_MODEL_ERRORS = {"404", "422", "503"}
ERROR_REF = "#/components/schemas/ErrorResponse"
V2_ERROR_REF = "#/components/schemas/V2ErrorResponse"
SCHEMATHESIS_CONFIG = """
[cache]
enabled = false

[dictionaries]
models = { values = ["shapes_classify", "shapes_segment", "shapes_detect"] }
versions = { values = ["1"] }

[parameters]
"path.model" = { dictionary = "models", probability = 0.5 }
"path.version" = { dictionary = "versions", probability = 0.5 }

[[operations]]
include-path-regex = "^/(classify|segment|detect)$|/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "413", "415", "5xx"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]
"""


@pytest.fixture(scope="module")
def document() -> dict:
    return create_app(Settings()).openapi()


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def schema_of(response: dict) -> dict:
    return response["content"]["application/json"]["schema"]


@pytest.mark.parametrize("path", IMAGE_ROUTES)
def test_image_routes_document_every_error_with_the_error_schema(document, path) -> None:
    responses = document["paths"][path]["post"]["responses"]
    assert IMAGE_ROUTE_ERRORS <= set(responses)
    for status in IMAGE_ROUTE_ERRORS:
        assert schema_of(responses[status]) == {"$ref": ERROR_REF}, status


@pytest.mark.parametrize("path", V2_INFER_ROUTES)
def test_v2_infer_documents_every_error_with_the_kserve_schema(document, path) -> None:
    responses = document["paths"][path]["post"]["responses"]
    assert V2_INFER_ERRORS <= set(responses)
    for status in V2_INFER_ERRORS:
        assert schema_of(responses[status]) == {"$ref": V2_ERROR_REF}, status
    assert {"application/json", "application/octet-stream"} <= set(responses["200"]["content"])


def test_v2_model_routes_document_404_422_and_503_with_the_kserve_schema(document) -> None:
    for path, _, operation in operations(document):
        if not path.startswith("/v2/models/") or path == "/v2/models/stats":
            continue  # every model's statistics: no model named, no parameter to refuse
        responses = operation["responses"]
        assert V2_MODEL_ERRORS <= set(responses), path
        for status in V2_MODEL_ERRORS:
            schema = schema_of(responses[status])
            refs = [s["$ref"] for s in schema.get("anyOf", [schema])]
            assert V2_ERROR_REF in refs, (path, status)


def test_no_route_documents_fastapis_validation_error_shape(document) -> None:
    """The app answers 422 with ErrorResponse (or the KServe shape), never FastAPI's
    HTTPValidationError, so the document must not promise it."""
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for _, _, operation in operations(document):
        if "422" in operation["responses"]:
            assert schema_of(operation["responses"]["422"])["$ref"] in (ERROR_REF, V2_ERROR_REF)


def test_no_answer_is_documented_as_json_of_no_shape(document) -> None:
    """A route whose answer FastAPI was not told gets `application/json` with an empty
    schema in the document: model control's 200 has no body at all (as Triton's)."""
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            json_body = response.get("content", {}).get("application/json")
            assert json_body is None or json_body["schema"] != {}, (method, path, status)
    for action in ("load", "unload"):
        done = document["paths"][f"/v2/repository/models/{{model}}/{action}"]["post"]
        assert "content" not in done["responses"]["200"]


def test_every_503_promises_retry_after(document) -> None:
    for path, _, operation in operations(document):
        if "503" in operation["responses"]:
            assert operation["responses"]["503"]["headers"]["Retry-After"]["required"], path


def test_an_image_upload_needs_at_least_one_non_empty_file(document) -> None:
    body = document["paths"]["/classify"]["post"]["requestBody"]
    multipart = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] and multipart["required"] == ["file"]
    assert multipart["properties"]["file"]["minItems"] == 1
    assert multipart["properties"]["file"]["items"]["minLength"] == 1
    assert body["content"]["image/png"]["schema"]["minLength"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "schema"), [("/classify", ErrorResponse), ("/v2/models/m/infer", V2ErrorResponse)]
)
async def test_bodies_over_the_upload_limit_answer_the_documented_error(path, schema) -> None:
    app = create_app(Settings(max_upload_mb=0.001))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(path, content=b"x" * 2048)
    assert response.status_code == 413
    schema.model_validate(response.json())


@pytest.mark.anyio
async def test_invalid_query_parameters_answer_the_documented_422() -> None:
    transport = httpx.ASGITransport(app=create_app(Settings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/classify?top_k=0", content=b"")
    assert response.status_code == 422
    ErrorResponse.model_validate(response.json())


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service` on the demo bundles (no --model-dir), its address space
    capped so a hostile input can't take the machine down with it."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(
        ["--engine-threads", "1"], log_path=log_path, memory_limit_bytes=SERVER_MEMORY_BYTES
    ) as server:
        yield server.url
    json_lines(log_path)  # after every phase of the fuzz: JSON lines only


@pytest.fixture(scope="module")
def controlled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo bundles as a model repository with every control on: explicit model
    control (load and unload), log and trace settings changeable, traces exported to a
    collector (so every trace level is taken), and an API key on every route; the routes
    that answer 403 on `demo_server` answer for real here."""
    folder = tmp_path_factory.mktemp("controlled")
    (folder / "keys").write_text(f"{API_KEY}\n")
    with running_collector() as collector:
        flags = [
            "--model-repository", str(DEMO_BUNDLES_DIR), "--model-control-mode", "explicit",
            "--load-model", "*", "--allow-log-settings", "--allow-trace-settings",
            "--trace-endpoint", collector.url, "--api-key-file", str(folder / "keys"),
            "--engine-threads", "1",
        ]  # fmt: skip
        with running_server(
            flags,
            log_path=folder / "server.log",
            memory_limit_bytes=SERVER_MEMORY_BYTES,
            inherit_settings=False,
        ) as server:
            yield server.url
    json_lines(folder / "server.log")  # after every phase of the fuzz: JSON lines only


def _schemathesis(url: str, folder: Path, phase: str, *extra: str) -> None:
    config = folder / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    command = [
        sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; "
        "sys.exit(schemathesis())",
        "--config-file", str(config), "run", f"{url}/openapi.json",
        "--checks", "all", "--phases", phase, "--max-examples", str(MAX_EXAMPLES),
        "--generation-deterministic", "--workers", "1", "--request-timeout", "30",
        "--no-color", *extra,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=PHASE_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    assert " passed" in result.stdout, result.stdout


@pytest.mark.parametrize("phase", ["coverage", "fuzzing", "stateful"])
def test_schemathesis_finds_no_failure(demo_server, tmp_path, phase) -> None:
    _schemathesis(demo_server, tmp_path, phase)


@pytest.mark.parametrize("phase", ["coverage", "fuzzing", "stateful"])
def test_schemathesis_finds_no_failure_with_every_control_on(
    controlled_server, tmp_path, phase
) -> None:
    """The key as a bearer token: schemathesis' authentication check sends requests
    without it, or with it changed, and expects 401."""
    bearer = f"Authorization: Bearer {API_KEY}"
    _schemathesis(controlled_server, tmp_path, phase, "--header", bearer)
