"""service.tls_listener in-process, with a real TLS client (asyncio's) and certificates
from a test authority: a connection holds a place among its port's connections from its
acceptance, the protocol takes the place over once the handshake ends, and a failure to
accept pauses accepting without losing the connections waiting in the backlog. (The
server's TLS ports, limits and memory are in test_tls.py, against a real process.)"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import pytest

from service.http_protocol import PortConnections
from service.tls_listener import ACCEPT_PAUSE_S, TlsListener, listening_sockets

trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra")
pytestmark = pytest.mark.anyio


class Echo(asyncio.Protocol):
    """Takes its connection's place over as an HTTP protocol does, and echoes; `connected`
    lists those whose handshake ended."""

    handshake_place = None

    def __init__(self, port: PortConnections, connected: list[Echo]) -> None:
        self.port = port
        self.connected = connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.handshake_place is not None:
            self.handshake_place.release()
        self.port.opened(self, "127.0.0.1")
        self.connected.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.port.closed(self, "127.0.0.1")


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    authority = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return server, client


async def _listening(port: PortConnections, server: ssl.SSLContext, connected: list[Echo]):
    return TlsListener(
        listening_sockets("127.0.0.1", 0, 16),
        lambda: Echo(port, connected),
        port,
        server,
        handshake_timeout_s=30,
    )


async def _echoed(address: tuple[str, int], client: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(*address, ssl=client)
    writer.write(b"hello")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readexactly(5), 10)
    writer.close()
    return answer


async def _closed_by_server(address: tuple[str, int]) -> bool:
    reader, writer = await asyncio.open_connection(*address)
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def _places_come_to(port: PortConnections, count: int, within_s: float = 5.0) -> bool:
    for _ in range(int(within_s / 0.05)):
        if len(port.open) == count:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_connection_holds_its_place_from_acceptance_to_its_protocol(contexts) -> None:
    server, client = contexts
    port, connected = PortConnections(3), []
    listener = await _listening(port, server, connected)
    address = listener.sockets[0].getsockname()
    silent = []
    try:
        silent = [await asyncio.open_connection(*address) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert len(port.open) == 3 and not connected  # three places, no protocol yet
        assert await _closed_by_server(address)  # the fourth: closed as it opens
        for _, writer in silent[:2]:
            writer.close()
        # their handshakes end with their connections, and give the places back
        assert await _places_come_to(port, 1)
        assert await _echoed(address, client) == b"hello"
        assert len(connected) == 1 and not connected[0].handshake_place.held
        listener.close()
        await listener.wait_closed()
        # closing cancelled the silent one's handshake: its place came back too
        assert await _places_come_to(port, 0)
    finally:
        listener.close()
        for _, writer in silent:
            writer.close()


async def test_a_failure_to_accept_pauses_accepting_and_loses_no_connection(contexts) -> None:
    server, client = contexts
    port, connected = PortConnections(0), []
    listener = await _listening(port, server, connected)
    listening = listener.sockets[0]
    address = listening.getsockname()

    class OutOfDescriptorsOnce:
        """The listening socket, whose first accept fails for want of descriptors."""

        failed = False

        def fileno(self) -> int:
            return listening.fileno()

        def accept(self) -> tuple[socket.socket, object]:
            if not self.failed:
                self.failed = True
                raise OSError(errno.EMFILE, "Too many open files")
            return listening.accept()

    try:
        listener._accept(OutOfDescriptorsOnce())  # as the listening socket would fail
        loop = asyncio.get_running_loop()
        begun = loop.time()
        # connected by the kernel meanwhile, it waits in the backlog, then is served
        assert await _echoed(address, client) == b"hello"
        assert loop.time() - begun >= ACCEPT_PAUSE_S * 0.8
    finally:
        listener.close()
        await listener.wait_closed()
