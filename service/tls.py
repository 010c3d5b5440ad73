"""HTTPS served by the server itself (`--tls-certfile`, `--tls-keyfile`), for hosts with
no proxy or ingress in front to terminate TLS: uvicorn's TLS, with the certificate and
key checked at start so that a wrong file stops the server with a sentence, not a
traceback once it binds; and read again when the files change (`ServedCertificate`), so
a renewed certificate is served without a restart."""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.watched import file_stamp

log = logging.getLogger("hornet.service.tls")


def check_certificate(certfile: Path, keyfile: Path | None) -> None:
    """ValueError, naming the files (never their contents), unless `certfile` holds a
    PEM certificate whose private key is in `keyfile` (or, when None, in `certfile`)."""
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            raise ValueError(f"TLS: {path} is no file")
    try:
        server_context(certfile, keyfile)
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


# How often at most the files are looked at again (two stat calls), as handshakes ask.
CERTIFICATE_CHECK_S = 1.0

_PEM_BLOCK = re.compile(rb"-----BEGIN ([^-]*)-----.*?-----END \1-----\s*", re.S)


def server_context(certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """A server context holding the pair, as uvicorn makes one from the same settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
    context.load_cert_chain(certfile, keyfile, password=_no_password)
    return context


def pem_pair(certfile: Path, keyfile: Path | None) -> tuple[bytes, bytes]:
    """(private key, certificate chain) in PEM, as gRPC's credentials take them: the key
    from `keyfile` or, when None, from `certfile`; the certificates from `certfile`."""
    blocks = _PEM_BLOCK.finditer((keyfile or certfile).read_bytes())
    key = b"".join(block[0] for block in blocks if b"PRIVATE KEY" in block[1])
    certificates = _PEM_BLOCK.finditer(certfile.read_bytes())
    chain = b"".join(block[0] for block in certificates if block[1] == b"CERTIFICATE")
    return key, chain


class ServedCertificate:
    """The certificate and key every TLS listener serves (HTTP, --metrics-port, gRPC),
    read again when their files change, so a renewed certificate is served without a
    restart: cert-manager's Secret, mounted in the pod, is swapped in place by the
    kubelet. The files are looked at (stat) at most every CERTIFICATE_CHECK_S, as new
    connections' handshakes ask; connections already open keep the certificate they
    began with. A changed pair that does not load (a key of another certificate, a file
    half written, an encrypted key) keeps the pair served last: counted
    (`counted("failure")`), logged once per reason, and tried again at the files' next
    change (a missing file, at each look). Thread-safe: gRPC asks from its own threads."""

    def __init__(
        self,
        certfile: Path,
        keyfile: Path | None,
        counted: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certfile, self.keyfile = certfile, keyfile
        self._counted, self._clock = counted, clock
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._key, self._chain = pem_pair(certfile, keyfile)
        self._context: ssl.SSLContext | None = None  # None: the listener's own, from start
        self._generation = 0
        self._checked_at = clock()
        self._failure: str | None = None
        self._failed_stamp: tuple[tuple[int, ...], ...] | None = None

    def serve_on(self, context: ssl.SSLContext) -> None:
        """Make a listener's context (uvicorn's, made at start from the same files) hand
        each new handshake to the pair read last. The handshake's callback is the hook
        OpenSSL gives for switching contexts (called with or without SNI)."""
        context.sni_callback = self._on_hello

    def grpc_pair(self) -> tuple[int, bytes, bytes]:
        """(generation, key, chain) after a check: the generation grows with each pair
        taken, so gRPC's fetcher answers None while it has the latest."""
        self.check()
        with self._lock:
            return self._generation, self._key, self._chain

    def check(self) -> None:
        """Read the files again if they changed since the last look (at most every
        CERTIFICATE_CHECK_S)."""
        with self._lock:
            now = self._clock()
            if now - self._checked_at < CERTIFICATE_CHECK_S:
                return
            self._checked_at = now
            stamp = None
            try:
                stamp = self._files_stamp()
                if stamp in (self._stamp, self._failed_stamp):
                    return
                context = server_context(self.certfile, self.keyfile)
                key, chain = pem_pair(self.certfile, self.keyfile)
                if self._files_stamp() != stamp:  # changed while read: at the next look
                    return
            except (ssl.SSLError, OSError, ValueError) as exc:
                self._failed_stamp = stamp  # None where a file is missing: at each look
                self._failed(exc)
                return
            self._stamp, self._context, self._key, self._chain = stamp, context, key, chain
            self._generation += 1
            self._failure = None
        log.info(
            "TLS certificate read again: new connections are served it",
            extra={"certfile": str(self.certfile)},
        )
        if self._counted is not None:
            self._counted("success")

    def _on_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        self.check()
        context = self._context
        if context is not None:
            connection.context = context

    def _failed(self, exc: Exception) -> None:
        if self._counted is not None:
            self._counted("failure")
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        if reason != self._failure:  # said once, not at every look
            self._failure = reason
            log.error(
                "TLS certificate changed and was not taken: the pair read last is served",
                extra={
                    "certfile": str(self.certfile),
                    "keyfile": str(self.keyfile or self.certfile),
                    "reason": reason,
                },
            )

    def _files_stamp(self) -> tuple[tuple[int, ...], ...]:
        paths = (self.certfile,) if self.keyfile is None else (self.certfile, self.keyfile)
        return tuple(map(file_stamp, paths))
