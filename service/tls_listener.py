"""A TLS port that counts a connection from the moment it is accepted.

asyncio's and uvloop's TLS listeners (`create_server(ssl=...)`) hand a connection to its
protocol only once its handshake is done; until then the server holds about 57 KiB for
it (1000 connections that began no handshake grew it by 56 MiB) and nothing counts it,
so --max-connections and --max-connections-per-client did not bound handshakes in
progress: a client opening connections and sending nothing held as many as it could open
within --client-timeout-s. `TlsListener` accepts the connections itself: each takes a
place among its port's open connections (`PortConnections.hold`) before its handshake
begins, and past the limits is closed at once, before a byte of it is read and with no
answer (its client speaks TLS), counted as refused. Otherwise the loop makes the TLS
connection (`connect_accepted_socket`, within `handshake_timeout_s`) with the HTTP
protocol, which takes over the place as the handshake ends; a handshake that fails,
times out or is cut short gives the place back, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from service.http_protocol import Place, PortConnections, client_address

log = logging.getLogger("hornet.service.tls")

# Connections accepted per wake-up at most (asyncio's own accept loop takes its backlog).
ACCEPTS_PER_WAKEUP = 64
# Past a descriptor or memory shortage (any failure to accept), accepting resumes after
# this (as asyncio's own listeners do).
ACCEPT_PAUSE_S = 1.0


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking TCP sockets for `host` and `port`, one per address
    `host` resolves to, as `loop.create_server` binds them (SO_REUSEADDR; an IPv6 socket
    IPv6 only). OSError, naming the address, where one cannot be had."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:  # worded as asyncio's create_server words it
                reason = (exc.strerror or str(exc)).lower()
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {reason}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class TlsListener:
    """A TLS listener over `sockets` (`listening_sockets`): the server's part of
    `asyncio.Server` that uvicorn's shutdown uses (`close`, `wait_closed`, `sockets`).
    `make_protocol` makes the HTTP protocol of a connection whose handshake has begun."""

    def __init__(
        self,
        sockets: list[socket.socket],
        make_protocol: Callable[[], asyncio.Protocol],
        port: PortConnections,
        context: ssl.SSLContext,
        handshake_timeout_s: float,
    ) -> None:
        self.sockets = sockets
        self._make_protocol = make_protocol
        self._port = port
        self._context = context
        self._timeout_s = handshake_timeout_s
        self._handshakes: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                connection, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # gone before it was accepted
                continue
            except OSError as exc:
                # out of descriptors or memory (or worse): the backlog waits a while
                log.error("cannot accept connections", extra={"error": str(exc)})
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(ACCEPT_PAUSE_S, self._resume, listening)
                return
            client = client_address(peer)
            place = self._port.hold(client)
            if place is None:
                connection.close()
                continue
            connection.setblocking(False)
            task = self._loop.create_task(self._handshake(connection, place))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def _handshake(self, connection: socket.socket, place: Place) -> None:
        def protocol() -> asyncio.Protocol:
            made = self._make_protocol()
            made.handshake_place = place  # type: ignore[attr-defined]
            return made

        try:
            await self._loop.connect_accepted_socket(
                protocol, connection, ssl=self._context, ssl_handshake_timeout=self._timeout_s
            )
        except BaseException as exc:  # whatever ended it (a shutdown too), the connection is done
            # A client that hung up, spoke no TLS or took too long: nothing to say to it.
            # The loop has closed its transport; once it holds the socket (uvloop counts
            # itself among the socket's users) this only marks the socket closed.
            connection.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("TLS handshake did not end", extra={"error": repr(exc)})
        finally:
            place.release()  # a no-op once the protocol has taken it

    def close(self) -> None:
        """Stop accepting; handshakes in progress end (their connections are closed)."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for handshake in list(self._handshakes):
            handshake.cancel()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
