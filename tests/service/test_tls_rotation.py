"""A renewed TLS certificate is served without a restart: a real server (HTTPS, the
metrics port and gRPC over TLS) reads --tls-certfile/--tls-keyfile again when they
change, laid out as the kubelet mounts a Secret (files behind a `..data` link swapped in
one step). Each port's certificate is read from a real handshake. Before, the pair read
at start was served until the process restarted, so a pod outlived its certificate.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.testing import RunningServer, free_port, running_server
from service.tls import CERTIFICATE_CHECK_S, ServedCertificate
from tests.helpers.waiting import wait_until

trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra")

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"
# Each look is a new handshake: a few a second, for up to 15 s.
EACH_HANDSHAKE = {"timeout_s": 15.0, "every_s": 0.2}


class Pki:
    def __init__(self, folder: Path) -> None:
        authority = trustme.CA()
        self.ca = folder / "ca.pem"
        authority.cert_pem.write_to_path(self.ca)
        self.pairs = {}
        for name in ("a", "b"):
            issued = authority.issue_cert("127.0.0.1", "localhost")
            self.pairs[name] = (issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes())

    def which(self, der: bytes) -> str:
        """The name of the pair whose certificate `der` is."""
        for name, (cert, _) in self.pairs.items():
            if ssl.PEM_cert_to_DER_cert(cert.decode()) == der:
                return name
        raise AssertionError("a certificate of neither pair")


class Secret:
    """A directory as the kubelet mounts a Secret: tls.crt and tls.key are links into
    `..data`, itself a link to the current version's directory, replaced in one step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.versions = 0
        for name in ("tls.crt", "tls.key"):
            (folder / name).symlink_to(f"..data/{name}")

    def publish(self, cert: bytes, key: bytes) -> None:
        self.versions += 1
        version = self.folder / f"..version_{self.versions}"
        version.mkdir()
        (version / "tls.crt").write_bytes(cert)
        (version / "tls.key").write_bytes(key)
        staged = self.folder / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.folder / "..data")


def served_by(port: int, pki: Pki, alpn: str | None = None) -> str:
    """Which pair a new TLS connection to `port` is shown (its handshake only)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if alpn:
        context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return pki.which(tls.getpeercert(binary_form=True))


def _reloads(url: str, pki: Pki) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", verify=ssl.create_default_context(cafile=str(pki.ca))).text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hornet_tls_certificate_reloads_total"
    }


class Served:
    def __init__(self, running: RunningServer, metrics_port: int, grpc_port: int) -> None:
        self.running = running
        self.https_port = int(running.url.rsplit(":", 1)[1])
        self.metrics_port = metrics_port
        self.grpc_port = grpc_port

    def all_served_by(self, pki: Pki) -> set[str]:
        return {
            served_by(self.https_port, pki),
            served_by(self.metrics_port, pki),
            served_by(self.grpc_port, pki, alpn="h2"),
        }


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def secret(tmp_path: Path, pki: Pki) -> Secret:
    mounted = Secret(tmp_path / "secret")
    mounted.publish(*pki.pairs["a"])
    return mounted


@pytest.fixture
def served(pki: Pki, secret: Secret, tmp_path: Path) -> Iterator[Served]:
    metrics_port, grpc_port = free_port(), free_port()
    flags = ["--model-dir", str(CLASSIFIER), "--metrics-port", str(metrics_port)]
    flags += ["--grpc-port", str(grpc_port)]
    flags += ["--tls-certfile", str(secret.folder / "tls.crt")]
    flags += ["--tls-keyfile", str(secret.folder / "tls.key")]
    with running_server(
        flags, log_path=tmp_path / "server.log", inherit_settings=False, tls_ca_file=pki.ca
    ) as running:
        yield Served(running, metrics_port, grpc_port)


def test_a_renewed_certificate_is_served_on_every_port_without_a_restart(
    served: Served, pki: Pki, secret: Secret
) -> None:
    assert served.all_served_by(pki) == {"a"}
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(verify=trusting, timeout=30) as client:
        assert client.get(f"{served.running.url}/readyz").status_code == 200
        # A Secret updated with a key of another certificate: not taken, the pair read
        # last still served, counted and said once.
        secret.publish(pki.pairs["b"][0], pki.pairs["a"][1])
        wait_until(
            lambda: (
                served_by(served.https_port, pki) == "a"
                and _reloads(served.running.url, pki).get("failure") == 1
            ),
            **EACH_HANDSHAKE,
        )
        assert served.all_served_by(pki) == {"a"}
        # The right key: every port's new connections are served the new certificate.
        secret.publish(*pki.pairs["b"])
        wait_until(lambda: served_by(served.https_port, pki) == "b", **EACH_HANDSHAKE)
        wait_until(lambda: served.all_served_by(pki) == {"b"}, **EACH_HANDSHAKE)
        assert client.get(f"{served.running.url}/readyz").status_code == 200
    assert _reloads(served.running.url, pki) == {"success": 1, "failure": 1}
    log = [json.loads(line) for line in served.running.log_path.read_text().splitlines()]
    refused = [line for line in log if line["message"].startswith("TLS certificate changed")]
    taken = [line for line in log if line["message"].startswith("TLS certificate read again")]
    assert len(refused) == 1 and refused[0]["reason"] == "KEY_VALUES_MISMATCH"
    assert len(taken) == 1
    assert "PRIVATE KEY" not in served.running.log_path.read_text()


def test_a_connection_keeps_the_certificate_it_began_with(
    served: Served, pki: Pki, secret: Secret
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with (
        socket.create_connection(("127.0.0.1", served.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as before,
    ):
        secret.publish(*pki.pairs["b"])
        wait_until(lambda: served_by(served.https_port, pki) == "b", **EACH_HANDSHAKE)
        assert pki.which(before.getpeercert(binary_form=True)) == "a"
        before.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := before.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_files_are_looked_at_no_oftener_than_the_check_period(pki: Pki, secret: Secret) -> None:
    clock, outcomes = _Clock(), []
    certificate = ServedCertificate(
        secret.folder / "tls.crt", secret.folder / "tls.key", outcomes.append, clock
    )
    generation, _, chain = certificate.grpc_pair()
    assert chain == pki.pairs["a"][0]
    secret.publish(*pki.pairs["b"])
    clock.now = CERTIFICATE_CHECK_S * 0.9
    assert certificate.grpc_pair()[0] == generation  # not looked at yet
    clock.now = CERTIFICATE_CHECK_S * 1.9
    changed, key, chain = certificate.grpc_pair()
    assert (changed, key, chain) == (generation + 1, pki.pairs["b"][1], pki.pairs["b"][0])
    assert outcomes == ["success"]


def test_a_missing_file_keeps_the_pair_and_is_taken_once_back(pki: Pki, secret: Secret) -> None:
    clock, outcomes = _Clock(), []
    certificate = ServedCertificate(
        secret.folder / "tls.crt", secret.folder / "tls.key", outcomes.append, clock
    )
    (secret.folder / "..data").unlink()
    for step in (1, 2):
        clock.now = step * CERTIFICATE_CHECK_S
        assert certificate.grpc_pair()[0] == 0
    assert outcomes == ["failure", "failure"]  # at each look while it is missing
    secret.publish(*pki.pairs["b"])
    clock.now = 3 * CERTIFICATE_CHECK_S
    assert certificate.grpc_pair()[1:] == (pki.pairs["b"][1], pki.pairs["b"][0])
    # a bad pair is counted once, not at each look
    secret.publish(pki.pairs["a"][0], pki.pairs["b"][1])
    for step in (4, 5, 6):
        clock.now = step * CERTIFICATE_CHECK_S
        assert certificate.grpc_pair()[0] == 1
    assert outcomes == ["failure", "failure", "success", "failure"]
