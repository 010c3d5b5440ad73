"""The container's liveness check: `python -m service.healthcheck` exits 0 once GET
/healthz on this host's serving port answers 200, else 1. The port is HORNET_PORT's
(default 8000). Plain HTTP is tried first, then HTTPS (the server may have been given
--tls-certfile by a flag this check cannot see); over HTTPS the certificate is not
checked, since it names the service's public host, not the loopback asked here. The
standard library only: the images have no curl, and this runs every 30 seconds."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

_TIMEOUT_S = 2.0
_DIRECT = urllib.request.build_opener(
    urllib.request.ProxyHandler({}),
    urllib.request.HTTPSHandler(context=ssl._create_unverified_context()),  # noqa: S323
)


def alive(port: str) -> bool:
    for scheme in ("http", "https"):
        try:
            with _DIRECT.open(f"{scheme}://127.0.0.1:{port}/healthz", timeout=_TIMEOUT_S) as r:
                if r.status == 200:
                    return True
        except Exception:  # noqa: BLE001 - refused, reset, a TLS port spoken to in clear...
            continue
    return False


if __name__ == "__main__":
    sys.exit(0 if alive(os.environ.get("HORNET_PORT", "8000")) else 1)
