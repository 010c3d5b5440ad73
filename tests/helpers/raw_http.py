"""HTTP/1.1 by hand over a socket, for tests that send what no client library would:
heads cut short, bodies that stall, requests pipelined in one write."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def connect(url: str, timeout_s: float = 30.0, source: str | None = None) -> socket.socket:
    """A fresh connection to the server at `url`, from the local address `source` where
    given (127.0.0.2, ...: another client on the loopback); reads give up after
    `timeout_s`."""
    address = urlsplit(url)
    return socket.create_connection(
        (address.hostname, address.port),
        timeout=timeout_s,
        source_address=None if source is None else (source, 0),
    )


def get(path: str, host: str = "x") -> bytes:
    """A GET request's bytes, for `send`."""
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()


def send(connection: socket.socket, data: bytes) -> bool:
    """Send `data`; False if the server closed the connection before taking it all."""
    try:
        connection.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := connection.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one answer; 0 if there is none."""
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def read_one_answer(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next answer on a kept-alive connection, read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(1 << 16)
    status, headers, body = parse_answer(data)
    while len(body) < int(headers["content-length"]):
        body += connection.recv(1 << 16)
    return status, headers, body
