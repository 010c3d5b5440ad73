"""Calls from web pages of other origins (`--cors-origin`), against real server processes:
preflights answered before the key check, answers (errors included) readable by the
allowed origin's scripts, other origins and methods refused with a JSON body, and no
CORS headers at all when no origin is allowed. A real browser's side of it:
tests/web/test_cross_origin.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.cors import ALLOWED_HEADERS, EXPOSED_HEADERS, PREFLIGHT_MAX_AGE_S
from service.settings import Settings
from service.testing import running_server
from tests.helpers.images import encode

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"
APP = "https://app.example.com"
KEY = "cors-test-key-0123456789abcdef"


def preflight(url: str, origin: str, method: str = "POST", headers: str = "") -> httpx.Response:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        sent["Access-Control-Request-Headers"] = headers
    return httpx.options(url, headers=sent, timeout=30)


def listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


@pytest.fixture(scope="module")
def image() -> bytes:
    pixels = np.zeros((96, 96, 3), np.uint8)
    pixels[20:70, 20:70] = (200, 60, 40)  # a square
    return encode(pixels, "PNG")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("cors") / "server.log"
    flags = ["--model-dir", str(CLASSIFIER), "--cors-origin", APP, "--api-key", KEY]
    with running_server(flags, log_path=log, inherit_settings=False) as running:
        yield running.url


def test_a_preflight_from_the_allowed_origin_is_answered_without_a_key(server) -> None:
    answer = preflight(f"{server}/classify", APP, headers="authorization, content-type")
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == APP
    assert listed(answer.headers["access-control-allow-methods"]) == {"get", "post"}
    assert {h.lower() for h in ALLOWED_HEADERS} <= listed(
        answer.headers["access-control-allow-headers"]
    )
    assert answer.headers["access-control-max-age"] == str(PREFLIGHT_MAX_AGE_S)
    # Every header the API reads may be sent, v2's binary header length included.
    v2_headers = "x-api-key, content-type, inference-header-content-length"
    v2 = preflight(f"{server}/v2/models/shapes_classify/infer", APP, headers=v2_headers)
    assert v2.status_code == 200


@pytest.mark.parametrize(
    ("origin", "method", "headers", "refused"),
    [
        ("https://evil.example.com", "POST", "", "origin"),
        ("https://app.example.com:8443", "POST", "", "origin"),  # another port
        ("http://app.example.com", "POST", "", "origin"),  # another scheme
        (APP, "DELETE", "", "method"),
        (APP, "POST", "x-forwarded-for", "headers"),
    ],
)
def test_preflights_of_other_origins_methods_and_headers_are_refused_with_json(
    server, origin, method, headers, refused
) -> None:
    answer = preflight(f"{server}/classify", origin, method, headers)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["error"] == "cors_refused"
    assert f"its {refused} is not allowed" in body["detail"] and origin in body["detail"]
    if refused == "origin":
        assert "access-control-allow-origin" not in answer.headers


def test_answers_and_errors_are_readable_by_the_allowed_origin(server, image) -> None:
    files = {"file": ("square.png", image, "image/png")}
    plain = httpx.post(f"{server}/classify", files=files, headers={"X-API-Key": KEY}, timeout=30)
    headers = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{server}/classify", files=files, headers=headers, timeout=30)
    assert answer.status_code == plain.status_code == 200
    assert answer.json() == plain.json()  # the Origin header changes nothing else
    assert "access-control-allow-origin" not in plain.headers
    assert answer.headers["access-control-allow-origin"] == APP
    assert {h.lower() for h in EXPOSED_HEADERS} == listed(
        answer.headers["access-control-expose-headers"]
    )
    assert "origin" in listed(answer.headers["vary"])
    # A page must see why it was refused: the 401 carries the CORS headers too.
    refused = httpx.post(f"{server}/classify", files=files, headers={"Origin": APP}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert refused.headers["access-control-allow-origin"] == APP
    # Another origin's request is answered (CORS is the browser's to enforce), without
    # the header that would let its page read the answer.
    other = httpx.post(
        f"{server}/classify",
        files=files,
        headers={"Origin": "https://evil.example.com", "X-API-Key": KEY},
        timeout=30,
    )
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


def test_without_allowed_origins_there_are_no_cors_headers(tmp_path, image) -> None:
    flags = ["--model-dir", str(CLASSIFIER)]
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        answer = preflight(f"{s.url}/classify", APP, headers="content-type")
        assert answer.status_code == 405
        assert answer.json()["error"] == "method_not_allowed"
        assert not any(h.startswith("access-control-") for h in answer.headers)
        files = {"file": ("square.png", image, "image/png")}
        posted = httpx.post(f"{s.url}/classify", files=files, headers={"Origin": APP})
        assert posted.status_code == 200
        assert not any(h.startswith("access-control-") for h in posted.headers)


def test_any_origin_and_the_warning_when_no_key_is_required(tmp_path) -> None:
    flags = ["--model-dir", str(CLASSIFIER), "--cors-origin", "*"]
    log = tmp_path / "server.log"
    with running_server(flags, log_path=log, inherit_settings=False) as s:
        answer = preflight(f"{s.url}/v1/models", "https://anywhere.example", "GET")
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "*"
        listed_models = httpx.get(f"{s.url}/v1/models", headers={"Origin": "http://x.example"})
        assert listed_models.headers["access-control-allow-origin"] == "*"
    assert log.read_text().count("--cors-origin * without API keys") == 1
    keyed = tmp_path / "keyed.log"
    with running_server([*flags, "--api-key", KEY], log_path=keyed, inherit_settings=False):
        pass
    assert "--cors-origin *" not in keyed.read_text()


def test_origins_from_flags_and_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HORNET_CORS_ORIGINS", " https://App.Example.com, ,http://127.0.0.1:8080 ")
    assert Settings().cors_origins == ["https://app.example.com", "http://127.0.0.1:8080"]
    monkeypatch.delenv("HORNET_CORS_ORIGINS")
    given = Settings(cors_origins=["http://[::1]:3000", "*"]).cors_origins
    assert given == ["http://[::1]:3000", "*"]


@pytest.mark.parametrize(
    "origin",
    ["https://app.example.com/", "https://app.example.com/page", "app.example.com", "ftp://x.y"],
)
def test_what_is_no_origin_is_refused_at_start(origin) -> None:
    with pytest.raises(ValidationError, match="is no origin: give scheme://host"):
        Settings(cors_origins=[origin])
