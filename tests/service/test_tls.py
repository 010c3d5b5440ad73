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
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.settings import Settings
from service.testing import free_port, running_server
from tests.helpers.images import encode
from tests.helpers.logs import json_lines
from tests.helpers.memory import descriptors_for, memory_of

trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra")

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"
MIB = 1 << 20


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
    assert "invalid setting: TLS: " in done.stderr and str(pki["other"]) in done.stderr


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


def _closed_at_once(connection: socket.socket, within_s: float = 3.0) -> bool:
    """Whether the server closes `connection` (which sent nothing) within `within_s`,
    having sent nothing on it."""
    connection.settimeout(within_s)
    try:
        return connection.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _api_connections(metrics_url: str, ca: Path) -> dict[str, float]:
    """The API port's open connections and the connections it refused, as /metrics on
    --metrics-port says them."""
    trusting = ssl.create_default_context(cafile=str(ca))
    text = httpx.get(f"{metrics_url}/metrics", verify=trusting, timeout=30).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("listener") == "api"
        and sample.name in ("hornet_http_connections", "hornet_connections_refused_total")
    }


@contextlib.contextmanager
def _tls_server(pki, tmp_path: Path, *flags: str) -> Iterator[tuple[str, str, int]]:
    """A TLS server with `flags`: its API URL, its --metrics-port URL (whose
    connections are counted apart from the API's) and its process id."""
    metrics_port = free_port()
    command = ["--model-dir", str(CLASSIFIER), "--tls-certfile", str(pki["cert"])]
    command += ["--tls-keyfile", str(pki["key"]), "--metrics-port", str(metrics_port)]
    with running_server(
        [*command, *flags],
        log_path=tmp_path / "server.log",
        inherit_settings=False,
        tls_ca_file=pki["ca"],
        memory_limit_bytes=6 << 30,
    ) as server:
        yield server.url, f"https://127.0.0.1:{metrics_port}", server.process.pid


def _served_soon(url: str, ca: Path, within_s: float = 10.0) -> bool:
    """Whether a real TLS client is answered 200 by `url` within `within_s`."""
    trusting = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/readyz", verify=trusting, timeout=10).status_code == 200
        time.sleep(0.1)
    return False


def _no_connections_open(metrics_url: str, ca: Path, within_s: float = 10.0) -> bool:
    """Whether the API port holds no connection within `within_s` (the server closes
    the start-up check's as it sees it closed)."""
    deadline = time.monotonic() + within_s
    while _api_connections(metrics_url, ca)["hornet_http_connections"] != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_handshakes_in_progress_count_against_max_connections(pki, tmp_path) -> None:
    """A TLS connection takes a place among --max-connections as it is accepted, before
    its handshake: past the limit, connections that begin no handshake make the server
    close the next one at once, a real client's too; places come back as the held
    connections close or their handshakes time out, and the next client is served."""
    flags = ("--max-connections", "16", "--client-timeout-s", "3")
    with _tls_server(pki, tmp_path, *flags) as (url, metrics_url, _):
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        assert _no_connections_open(metrics_url, pki["ca"])
        held = [_connect(url) for _ in range(16)]
        try:
            extra = _connect(url)
            assert _closed_at_once(extra)
            extra.close()
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/readyz", verify=trusting, timeout=10)
            counted = _api_connections(metrics_url, pki["ca"])
            assert counted["hornet_http_connections"] == 16
            assert counted["hornet_connections_refused_total"] == 2
            # half closed by their client, the others left to the handshake's time limit
            for connection in held[:8]:
                connection.close()
            for connection in held[8:]:
                assert _closed_at_once(connection, within_s=10)
        finally:
            for connection in held:
                connection.close()
        assert _served_soon(url, pki["ca"])
        assert _no_connections_open(metrics_url, pki["ca"]), "places not given back"


def test_handshakes_from_one_address_count_against_its_limit(pki, tmp_path) -> None:
    flags = ("--max-connections-per-client", "2", "--client-timeout-s", "30")
    with _tls_server(pki, tmp_path, *flags) as (url, metrics_url, _):
        assert _no_connections_open(metrics_url, pki["ca"])
        held = [_connect(url) for _ in range(2)]
        try:
            extra = _connect(url)
            assert _closed_at_once(extra)
            extra.close()
            counted = _api_connections(metrics_url, pki["ca"])
            assert counted["hornet_connections_refused_total"] == 1
        finally:
            for connection in held:
                connection.close()
        assert _served_soon(url, pki["ca"])  # once the server has seen them close


def test_handshakes_past_the_limit_cost_the_server_no_memory(pki, tmp_path) -> None:
    """2000 connections opened and held without a handshake against --max-connections
    16: the server grows by well under what 2000 pending handshakes cost it before they
    were counted (1000 grew it by 56 MiB)."""
    count = descriptors_for(2000)
    held: list[socket.socket] = []
    flags = ("--max-connections", "16", "--client-timeout-s", "60")
    try:
        with _tls_server(pki, tmp_path, *flags) as (url, metrics_url, pid):
            trusting = ssl.create_default_context(cafile=str(pki["ca"]))
            httpx.get(f"{url}/readyz", verify=trusting, timeout=10)  # its objects made
            assert _no_connections_open(metrics_url, pki["ca"])
            before = memory_of(pid)
            for _ in range(count):
                held.append(_connect(url))
            assert _closed_at_once(held[-1])
            after = memory_of(pid)
            counted = _api_connections(metrics_url, pki["ca"])
        assert counted["hornet_connections_refused_total"] == count - 16
        assert counted["hornet_http_connections"] == 16
        assert after["VmRSS"] - before["VmRSS"] < 4 * MIB, (count, before, after)
    finally:
        for connection in held:
            connection.close()


def test_a_tls_port_in_use_stops_the_server_naming_it(pki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "service", "--model-dir", str(CLASSIFIER)]
        command += ["--port", str(port), "--tls-certfile", str(pki["cert"])]
        command += ["--tls-keyfile", str(pki["key"])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"hornet serve: --port {port}: " in done.stderr
    assert "address already in use" in done.stderr
    assert "try the models in a browser" not in done.stderr


def test_failed_handshakes_on_the_grpc_port_write_nothing_but_json_lines(pki, tmp_path) -> None:
    """gRPC core logs a failed TLS handshake in plain text on its threads' standard error
    at its default level: three connections sending anything but a handshake used to add
    three such lines beside the JSON log. Now its errors only (GRPC_VERBOSITY)."""
    grpc_port = free_port()
    log = tmp_path / "server.log"
    command = ["--model-dir", str(CLASSIFIER), "--tls-certfile", str(pki["cert"])]
    command += ["--tls-keyfile", str(pki["key"]), "--grpc-port", str(grpc_port)]
    with running_server(
        command, log_path=log, inherit_settings=False, tls_ca_file=pki["ca"]
    ) as server:
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\0"):
            with socket.create_connection(("127.0.0.1", grpc_port), timeout=10) as connection:
                connection.sendall(garbage)
                with contextlib.suppress(OSError):
                    connection.recv(1024)  # the server closes it
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        assert httpx.get(f"{server.url}/readyz", verify=trusting, timeout=30).status_code == 200
    assert json_lines(log)  # and no plain-text line of gRPC core's among them
