"""The HTTP/1.1 parser the server runs: uvicorn's httptools protocol with a bound on the
request head.

uvicorn's pure-Python h11 protocol refuses a request head over 16 KiB, but costs 0.6 ms
of CPU per request more than its httptools protocol, and httptools on uvloop served the
demo classifier 1.15x faster (bench/README.md, "Server efficiency"). That protocol
buffers a head of any size instead: llhttp hands a URL or a header over in pieces and
httptools joins a header's pieces until its line ends, so one endless URL or header
line from a hostile client grows the server's memory without limit.
`BoundedHttpToolsProtocol` feeds the parser no more than `MAX_HEAD_BYTES` of a
request's head: the first bytes past the bound answer 431 with a JSON body and close
the connection, before they are parsed.
The body is not counted (its bound is --max-upload-mb, enforced by the routes).

httptools also parses every request in what it is fed, where h11 parses one at a time:
a client that pipelines requests without reading the answers (tens of thousands of
tiny GETs in one write) would make uvicorn queue a request object for each, about 15
MiB of the server's memory per connection for 1 MiB sent. The protocol holds at most
`MAX_PIPELINED` requests waiting behind the one being answered; the next one is
answered 429 with a JSON body and the connection closed, before the rest is parsed.

Neither of uvicorn's protocols has a clock on a request's head: a connection that
opens and sends nothing, or sends a head a byte at a time, stays open for ever (its
keep-alive timeout runs only after an answer, and stops at the next byte). Both
protocols `protocol_class` gives close a connection whose next head is not complete
`client_timeout_s` after the connection opened or its last answer went out: with 408
and a JSON body if part of a head came, silently if nothing did.

Nor do they bound the connections open at once: each costs the server about 7 KiB
(measured: 5000 idle ones grew it by 34 MB) and a descriptor, and a client that opens
them from many addresses faster than the head clock closes them would grow the server
without limit. Past `--max-connections` open on its port (each port, the API's and
--metrics-port's, counts its own: `PortConnections`), a new connection is answered 503
with Retry-After and a JSON body and closed as it opens, before a byte of it is read: it
never becomes one of uvicorn's connections. Over TLS a connection counts from the moment
it is accepted, its handshake pending (service.tls_listener): past the bounds it is
closed before its handshake begins, and the handshake must end within --client-timeout-s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# h11's own bound (its max_incomplete_event_size), so both parsers refuse the same heads.
MAX_HEAD_BYTES = 16 * 1024
# Requests parsed and waiting behind the one being answered, on one connection.
MAX_PIPELINED = 16
# The header of a connection's last answer.
_CLOSE = (b"connection", b"close")
# Refused connections are logged at most once in this many seconds, with their count.
REFUSALS_LOGGED_EVERY_S = 10.0

log = logging.getLogger("hornet.service.http")


class _TooManyPipelined(Exception):
    """Raised from a parser callback to stop parsing (httptools cannot pause)."""


def _json_response(status_line: bytes, code: str, detail: str, headers: bytes = b"") -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    return b"".join(
        (
            status_line,
            headers,
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


class PortConnections:
    """One port's open HTTP connections (`open`; each port counts its own, so a flood of
    one leaves the other's places free), its --max-connections (`limit`, 0: none) and its
    --max-connections-per-client (`per_client`, 0: none; the connections open from each
    client address, `by_client`). Those refused are counted (`counted`, the metric) and
    logged at most once in REFUSALS_LOGGED_EVERY_S, with how many since the last line."""

    def __init__(
        self,
        limit: int,
        counted: Callable[[], None] | None = None,
        listener: str = "api",
        per_client: int = 0,
    ) -> None:
        self.limit = limit
        self.per_client = per_client
        self.counted = counted
        self.listener = listener
        self.open: set[object] = set()  # protocols, and Places a handshake holds
        self.by_client: dict[str, int] = {}
        self.unlogged = 0
        self.logged_at = float("-inf")

    def refusal(self, client: str) -> bytes | None:
        """The answer that refuses a connection opening from `client` (its address), or
        None where it may open."""
        if self.limit and len(self.open) >= self.limit:
            return _json_response(
                b"HTTP/1.1 503 Service Unavailable\r\n",
                "too_many_connections",
                f"this port of the server holds its {self.limit} open connections "
                "(--max-connections); try again, or reuse a connection",
                headers=b"retry-after: 1\r\n",
            )
        if self.per_client and self.by_client.get(client, 0) >= self.per_client:
            return _json_response(
                b"HTTP/1.1 429 Too Many Requests\r\n",
                "too_many_connections_from_client",
                f"this port of the server holds {self.per_client} open connections from "
                "your address, the most it takes from one (--max-connections-per-client); "
                "reuse them, or close one",
                headers=b"retry-after: 1\r\n",
            )
        return None

    def hold(self, client: str) -> Place | None:
        """A place for a connection opening from `client` before a protocol takes it
        (`Place.release` gives it back), or None, counted as refused, past the limits."""
        if self.refusal(client) is not None:
            self.refused(client)
            return None
        place = Place(self, client)
        self.opened(place, client)
        return place

    def opened(self, holder: object, client: str) -> None:
        self.open.add(holder)
        if self.per_client:
            self.by_client[client] = self.by_client.get(client, 0) + 1

    def closed(self, holder: object, client: str) -> None:
        self.open.discard(holder)
        if self.per_client:
            left = self.by_client.get(client, 1) - 1
            if left > 0:
                self.by_client[client] = left
            else:
                self.by_client.pop(client, None)

    def refused(self, client: str) -> None:
        if self.counted is not None:
            self.counted()
        self.unlogged += 1
        now = time.monotonic()
        if now - self.logged_at >= REFUSALS_LOGGED_EVERY_S:
            log.warning(
                f"connections refused on the {self.listener} port: --max-connections open, "
                "or --max-connections-per-client from one address",
                extra={
                    "refused": self.unlogged,
                    "max_connections": self.limit,
                    "max_connections_per_client": self.per_client,
                    "last_client": client,
                    "listener": self.listener,
                },
            )
            self.unlogged = 0
            self.logged_at = now


def client_address(peer: object) -> str:
    """The client's address in a connection's peer name (a socket address), or "" where it
    has none: the key of --max-connections-per-client."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class Place:
    """A connection's place among its port's open connections while no protocol holds
    it yet (a TLS handshake in progress): counted from `PortConnections.hold` until
    `release`, which may be called more than once."""

    def __init__(self, port: PortConnections, client: str) -> None:
        self.port = port
        self.client = client
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.port.closed(self, self.client)


class _ConnectionLimit:
    """For uvicorn's HTTP protocols: a connection opening while its port holds
    `port_connections.limit`, or its per-client bound from the connection's address, is
    answered (503, 429) and closed at once, and never joins uvicorn's connections (so none
    of the protocol's state is made for it)."""

    port_connections: PortConnections
    _refused = False
    _client = ""
    # Over TLS, the place its port kept for the connection during the handshake, given
    # back as the connection takes its own (service.tls_listener)
    handshake_place: Place | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        port = self.port_connections
        if self.handshake_place is not None:
            self.handshake_place.release()
            self.handshake_place = None
        self._client = client_address(transport.get_extra_info("peername"))
        refusal = port.refusal(self._client)
        if refusal is not None:
            self._refused = True
            transport.write(refusal)
            transport.close()
            port.refused(self._client)
            return
        port.opened(self, self._client)
        super().connection_made(transport)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)  # type: ignore[misc]

    def eof_received(self) -> None:
        if not self._refused:
            super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:
            self.port_connections.closed(self, self._client)
            super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        if not self._refused:
            super().pause_writing()  # type: ignore[misc]

    def resume_writing(self) -> None:
        if not self._refused:
            super().resume_writing()  # type: ignore[misc]


class _HeadClock:
    """For uvicorn's HTTP protocols: the next request's head must be complete within
    `client_timeout_s` of the connection's opening or its last answer. The clock stops
    when a head completes (uvicorn starts a new request-response cycle). And with
    `max_age_s`, a request whose head completes once the connection has been open that
    long is its last: its answer says `connection: close` and closes the connection
    (--max-connection-age-s)."""

    client_timeout_s = 10.0
    max_age_s = 0.0
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._opened_at = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_begun = True
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # a head completed
            self._stop_head_clock()
            if self.max_age_s and self.loop.time() - self._opened_at >= self.max_age_s:
                self._answer_is_last()

    def _answer_is_last(self) -> None:
        """The request whose head just completed gets the connection's last answer."""
        self.cycle.keep_alive = False  # the httptools cycle says `connection: close` then

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Unless the connection closes or a request already read has begun its answer.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)  # type: ignore[misc]

    def _start_head_clock(self) -> None:
        self._stop_head_clock()
        self._head_begun = False
        self._head_timer = self.loop.call_later(self.client_timeout_s, self._head_too_slow)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            self.transport.write(
                _json_response(
                    b"HTTP/1.1 408 Request Timeout\r\n",
                    "request_timeout",
                    f"the request line and headers did not arrive within "
                    f"{self.client_timeout_s:g} s (--client-timeout-s)",
                )
            )
        self.transport.close()


class BoundedH11Protocol(_ConnectionLimit, _HeadClock, H11Protocol):
    """uvicorn's h11 protocol (which bounds a head at 16 KiB itself) with the connection
    limit and the head clock."""

    def _answer_is_last(self) -> None:
        super()._answer_is_last()
        # uvicorn's h11 cycle closes the connection after the answer without saying so;
        # the header tells the client not to send another request on it
        self.cycle.default_headers = [*self.cycle.default_headers, _CLOSE]


class BoundedHttpToolsProtocol(_ConnectionLimit, _HeadClock, HttpToolsProtocol):
    """HttpToolsProtocol that refuses a request head over MAX_HEAD_BYTES with 431 and
    more than MAX_PIPELINED requests queued on a connection with 429, and answers a
    malformed request with a JSON 400 instead of uvicorn's plain text."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (uvicorn's own)
        super().__init__(*args, **kwargs)
        # Bytes fed to the parser since the current request's head began; None while a
        # body is being read (from the end of a head to the end of its message).
        self._head_bytes: int | None = 0
        self._too_many_pipelined = False

    def data_received(self, data: bytes) -> None:
        while self._head_bytes is not None and data:
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:
                self._refuse_head()
                return
            # A request's head and (part of) its body usually come in one piece: feed up
            # to the bound, and the rest once the parser has seen the head end.
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.parser is None or self.transport.is_closing():
                return
        if data:
            # A body, and whatever follows it in this read (at most the transport's read
            # size, 256 KiB: a next head begun here is bounded by that, then counted).
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            self._too_many_pipelined = True
            raise _TooManyPipelined  # uvicorn answers with send_400_response, below

    def on_message_complete(self) -> None:
        self._head_bytes = 0
        super().on_message_complete()

    def _refuse_head(self) -> None:
        self.logger.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
        self.transport.write(
            _json_response(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
                "request_head_too_large",
                f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
            )
        )
        self.transport.close()
        self._head_bytes = None

    def send_400_response(self, msg: str) -> None:
        if self._too_many_pipelined:
            self.logger.warning("over %d pipelined requests refused", MAX_PIPELINED)
            answer = _json_response(
                b"HTTP/1.1 429 Too Many Requests\r\n",
                "too_many_pipelined_requests",
                f"over {MAX_PIPELINED} requests sent ahead of their answers on one connection",
            )
        else:
            answer = _json_response(b"HTTP/1.1 400 Bad Request\r\n", "bad_http_request", msg)
        self.transport.write(answer)
        self.transport.close()


def protocol_class(
    parser: str,
    client_timeout_s: float,
    connections: PortConnections | None = None,
    max_age_s: float = 0.0,
) -> type:
    """The uvicorn protocol class for `parser` ("httptools" or "h11") with its head clock,
    for one port: its `connections` (by default, no limit) and their age (0: any)."""
    base = BoundedHttpToolsProtocol if parser == "httptools" else BoundedH11Protocol
    attributes = {
        "client_timeout_s": client_timeout_s,
        "port_connections": connections or PortConnections(0),
        "max_age_s": max_age_s,
    }
    return type(base.__name__, (base,), attributes)
