"""GET / serves the try-it page from the package: same-origin resources only, under a
strict Content-Security-Policy, reachable without a key when API keys are set."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import PAGE_PATHS, is_protected
from service.cli import page_url
from service.routers import page
from service.settings import DEMO_BUNDLES_DIR, Settings
from service.testing import stop

KEY = "hornet-page-route-key-3e9a51"


@pytest.fixture(scope="module")
def client() -> TestClient:
    """The app with an API key; no lifespan, so no model loads (the page needs none)."""
    return TestClient(create_app(Settings(api_keys=[KEY])))


def test_page_and_its_files_are_served_with_their_types(client) -> None:
    for path, media_type in (
        ("/", "text/html"),
        ("/static/page.js", "text/javascript"),
        ("/static/page.css", "text/css"),
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type), path
        assert response.headers["x-content-type-options"] == "nosniff"


def test_head_answers_as_get_without_a_body(client) -> None:
    """Link checkers and load balancers probe with HEAD (it answered 405 before)."""
    for path in PAGE_PATHS:
        head, get = client.head(path), client.get(path)
        assert head.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert int(head.headers["content-length"]) == len(get.content)


def test_page_is_under_a_strict_content_security_policy(client) -> None:
    policy = client.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "img-src 'self' data: blob:" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_page_loads_nothing_from_elsewhere(client) -> None:
    html = client.get("/").text
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references and all(r.startswith(("/", "data:")) for r in references), references
    assert "<style" not in html and "style=" not in html and "<script>" not in html
    for path in PAGE_PATHS:
        assert not re.search(r"https?://", client.get(path).text), path


def test_page_needs_no_key_when_api_keys_are_set(client) -> None:
    for path in PAGE_PATHS:
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/models").status_code == 401


def test_every_page_route_is_an_open_path() -> None:
    routes = {route.path for route in page.router.routes}
    assert routes == PAGE_PATHS
    assert not any(is_protected(path, protect_probes=True) for path in routes)


def test_page_is_left_out_of_the_openapi_document(client) -> None:
    assert not set(client.get("/openapi.json").json()["paths"]) & PAGE_PATHS


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/"),
        ("0.0.0.0", "http://127.0.0.1:8000/"),
        ("::", "http://[::1]:8000/"),
        ("::1", "http://[::1]:8000/"),
        ("example.internal", "http://example.internal:8000/"),
    ],
)
def test_startup_log_names_the_page_at_an_address_a_browser_can_open(host, url) -> None:
    assert page_url(uvicorn.Config("service.app:create_app", host=host, port=8000)) == url


def test_with_port_0_the_startup_log_names_the_port_bound(tmp_path) -> None:
    """`--port 0` binds any free port; the page's address in the log is that port's."""
    log_path = tmp_path / "server.log"
    bundle = str(DEMO_BUNDLES_DIR / "shapes_classify")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--model-dir", bundle, "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        urls: list[str] = []
        while not urls and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            lines = [json.loads(x) for x in log_path.read_text().splitlines() if x[:1] == "{"]
            urls = [line["url"] for line in lines if "url" in line]
        assert urls, log_path.read_text()[-2000:]
        assert not urls[0].endswith(":0/")
        answer = httpx.get(urls[0], timeout=10)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
    finally:
        stop(process)
