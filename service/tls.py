"""HTTPS served by the server itself (`--tls-certfile`, `--tls-keyfile`), for hosts with
no proxy or ingress in front to terminate TLS: uvicorn's TLS, with the certificate and
key checked at start so that a wrong file stops the server with a sentence, not a
traceback once it binds."""

from __future__ import annotations

import ssl
from pathlib import Path


def check_certificate(certfile: Path, keyfile: Path | None) -> None:
    """ValueError, naming the files (never their contents), unless `certfile` holds a
    PEM certificate whose private key is in `keyfile` (or, when None, in `certfile`)."""
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            raise ValueError(f"TLS: {path} is no file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if keyfile is None:
            raise ValueError(
                f"TLS: {certfile} does not hold a PEM certificate and its private key "
                f"({reason}): give the key in --tls-keyfile"
            ) from None
        raise ValueError(
            f"TLS: the certificate in {certfile} and the key in {keyfile} do not load "
            f"together ({reason}): give PEM files, the key unencrypted and the "
            "certificate's own"
        ) from None


def _no_password() -> str:
    raise ValueError("the key is encrypted; give it unencrypted (e.g. from a Secret)")
