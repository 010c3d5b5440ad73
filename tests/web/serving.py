"""What the page tests run: a real `python -m service` process and headless Chromium
(Debian's `chromium` and `chromium-driver`) driven by Selenium."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from service.testing import running_server

REPO = Path(__file__).resolve().parents[2]
DEMO_BUNDLES = REPO / "service" / "demo_bundles"
_SERVER_MEMORY_BYTES = 8 << 30
_APT_PACKAGES = ("chromium", "chromium-driver")


def install_chromium() -> str | None:
    """Installs Debian's chromium and its driver; None when done, else why not."""
    if os.geteuid() != 0:
        return "not root, so cannot apt-get install " + " ".join(_APT_PACKAGES)
    if shutil.which("apt-get") is None:
        return "no apt-get to install " + " ".join(_APT_PACKAGES)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", *_APT_PACKAGES],
    ):
        # Another apt-get (the machine's own, at boot) may hold apt's locks for a while:
        # wait for it rather than skip.
        deadline = time.monotonic() + 900
        while True:
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                return f"{' '.join(command)} took over 900 s"
            if done.returncode == 0:
                break
            if "Could not get lock" not in done.stderr or time.monotonic() > deadline:
                return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
            time.sleep(5)
    return None


@contextlib.contextmanager
def open_browser(chromium: tuple[str, str], width: int = 1200, height: int = 900):
    """Headless Chromium at `width` x `height` CSS pixels (device scale 1)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def running_service(log_path: Path, *flags: str) -> Iterator[str]:
    """`python -m service` with `flags` on a free loopback port (one engine thread, its
    address space capped), ready; yields its base URL; stops it at the end."""
    with running_server(
        flags,
        log_path=log_path,
        env={"HORNET_ENGINE_THREADS": "1"},
        inherit_settings=False,
        memory_limit_bytes=_SERVER_MEMORY_BYTES,
    ) as server:
        yield server.url
