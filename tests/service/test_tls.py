"""HTTPS served by the server itself (`--tls-certfile`, `--tls-keyfile`): a real server
process with a certificate from a test authority (trustme) answers HTTPS clients that
trust it, a plain-HTTP client on its port gets no answer and leaves it serving, and a
certificate or key that does not load stops `hornet serve` at start with a sentence
naming the files."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.settings import Settings
from service.testing import running_server
from tests.helpers.images import encode

trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra")

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test authority, a certificate for 127.0.0.1 it signed, and its key: apart, and
    together in one file; a key of another certificate; the key encrypted."""
    from cryptography.hazmat.primitives import serialization

    folder = tmp_path_factory.mktemp("pki")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    files = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key", "both", "other")}
    authority.cert_pem.write_to_path(files["ca"])
    issued.cert_chain_pems[0].write_to_path(files["cert"])
    issued.private_key_pem.write_to_path(files["key"])
    issued.private_key_and_cert_chain_pem.write_to_path(files["both"])
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(files["other"])
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    files["encrypted"] = folder / "encrypted.pem"
    files["encrypted"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return files


@pytest.fixture(scope="module")
def https_server(pki, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tls") / "server.log"
    flags = ["--model-dir", str(CLASSIFIER), "--tls-certfile", str(pki["cert"])]
    flags += ["--tls-keyfile", str(pki["key"])]
    with running_server(flags, log_path=log, inherit_settings=False, tls_ca_file=pki["ca"]) as s:
        yield s.url, log


def square_png() -> bytes:
    pixels = np.zeros((96, 96, 3), np.uint8)
    pixels[20:70, 20:70] = (200, 60, 40)
    return encode(pixels, "PNG")


def test_https_clients_that_trust_the_authority_are_answered(https_server, pki) -> None:
    url, log = https_server
    assert url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    with httpx.Client(verify=trusting, timeout=30) as client:
        answer = client.post(
            f"{url}/classify", files={"file": ("s.png", square_png(), "image/png")}
        )
        assert answer.status_code == 200
        assert answer.json()["results"][0]["top_k"][0]["label"] == "square"
        assert client.get(f"{url}/readyz").json()["status"] == "ready"
    # A client that does not trust the authority refuses the certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/readyz", timeout=30)
    # The startup line links the page by https.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    links = [entry["url"] for entry in lines if entry["message"].startswith("try the models")]
    assert len(links) == 1 and links[0].startswith("https://127.0.0.1:")


def test_plain_http_on_the_https_port_gets_no_answer_and_the_server_keeps_serving(
    https_server, pki
) -> None:
    url, _ = https_server
    plain = url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/readyz", timeout=10)
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    assert httpx.get(f"{url}/readyz", verify=trusting, timeout=30).status_code == 200


def test_the_certificate_and_key_may_be_one_file(pki) -> None:
    assert Settings(tls_certfile=pki["both"]).tls_keyfile is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tls_certfile": "cert"}, "does not hold a PEM certificate and its private key"),
        ({"tls_certfile": "cert", "tls_keyfile": "other"}, "do not load together"),
        ({"tls_certfile": "cert", "tls_keyfile": "encrypted"}, "the key is encrypted"),
        ({"tls_certfile": "key", "tls_keyfile": "key"}, "do not load together"),
        ({"tls_keyfile": "key"}, "a TLS key without a certificate"),
        ({"tls_certfile": "missing"}, "is no file"),
    ],
)
def test_a_pair_that_does_not_load_is_refused_naming_the_files(pki, given, message) -> None:
    folder = pki["ca"].parent
    paths = {field: pki.get(name, folder / f"{name}.pem") for field, name in given.items()}
    with pytest.raises(ValidationError, match=message) as raised:
        Settings(**paths)
    assert "PRIVATE KEY" not in str(raised.value)  # the files' contents are never shown


def test_hornet_serve_stops_at_start_on_a_key_of_another_certificate(pki) -> None:
    command = [sys.executable, "-m", "service", "--model-dir", str(CLASSIFIER)]
    command += ["--tls-certfile", str(pki["cert"]), "--tls-keyfile", str(pki["other"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid settings" in done.stderr and str(pki["other"]) in done.stderr


def test_the_images_health_check_finds_an_https_server(https_server) -> None:
    # The Dockerfiles' HEALTHCHECK (tests/deploy checks it is this command).
    url, _ = https_server
    env = {"HORNET_PORT": url.rsplit(":", 1)[1], "PATH": ""}
    command = [sys.executable, "-m", "service.healthcheck"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_tls_handshake_must_end_within_the_client_timeout(pki, tmp_path) -> None:
    """A connection that opens and begins no handshake, or sends a ClientHello cut short,
    is closed after --client-timeout-s (asyncio's default was 60 s, during which it was
    not yet a connection --max-connections counts, and held about 60 KiB)."""
    flags = ["--model-dir", str(CLASSIFIER), "--tls-certfile", str(pki["cert"])]
    flags += ["--tls-keyfile", str(pki["key"]), "--client-timeout-s", "1"]
    with running_server(
        flags, log_path=tmp_path / "server.log", inherit_settings=False, tls_ca_file=pki["ca"]
    ) as server:
        host, port = server.url.removeprefix("https://").rsplit(":", 1)
        for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            with socket.create_connection((host, int(port)), timeout=20) as raw:
                raw.sendall(first_bytes)
                begun = time.monotonic()
                with contextlib.suppress(ConnectionResetError):
                    while raw.recv(65536):
                        pass
                assert time.monotonic() - begun < 5, first_bytes
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        assert httpx.get(f"{server.url}/readyz", verify=trusting).status_code == 200
