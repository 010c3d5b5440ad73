"""The container's liveness check: `python -m service.healthcheck` exits 0 once GET
/healthz on this host's serving port answers 200, else 1. The port is
HORNET_METRICS_PORT's where that is set (the port the API's clients cannot fill), else
HORNET_PORT's (default 8000). Plain HTTP is tried first, then HTTPS (the server may have been given
--tls-certfile by a flag this check cannot see); over HTTPS the certificate is not
checked, since it names the service's public host, not the loopback asked here. The
standard library only (service.testing's probe): the images have no curl, and this
runs every 30 seconds."""

from __future__ import annotations

import os
import ssl
import sys

from service.testing import answers_200, direct_opener

_TIMEOUT_S = 2.0


def alive(port: str) -> bool:
    opener = direct_opener(ssl._create_unverified_context())  # noqa: S323
    return any(
        answers_200(opener, f"{scheme}://127.0.0.1:{port}/healthz", _TIMEOUT_S)
        for scheme in ("http", "https")
    )


def probed_port(environ: dict[str, str]) -> str:
    metrics_port = environ.get("HORNET_METRICS_PORT", "").strip()
    if metrics_port and metrics_port != "0":
        return metrics_port
    return environ.get("HORNET_PORT", "8000")


if __name__ == "__main__":
    sys.exit(0 if alive(probed_port(dict(os.environ))) else 1)
