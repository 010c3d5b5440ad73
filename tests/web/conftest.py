"""A real browser on the try-it page: headless Chromium, installed by the test setup
when missing (as root, with apt-get), else the tests skip saying why; and the demo
server it talks to."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.serving import install_chromium, open_browser, running_service


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver, installed first when missing; the tests
    skip, saying why, where they cannot be had."""
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e .[dev]")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        reason = install_chromium()
        if reason:
            pytest.skip(f"no headless Chromium for the page tests: {reason}")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("chromium or chromedriver still missing after apt-get install")
    return browser, driver


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_server") / "server.log"


@pytest.fixture(scope="module")
def demo_server(demo_log: Path) -> Iterator[str]:
    """The packaged demo models (no --model-dir), as `make serve` runs them."""
    with running_service(demo_log) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str]):
    with open_browser(chromium) as driver:
        yield driver
