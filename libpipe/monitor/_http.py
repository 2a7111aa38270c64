"""Just enough HTTP/1.1 to serve one page and one JSON document on loopback.

Every request is a GET with no body, answered and closed (``Connection:
close``), so the parser only has to find the request line. The head is
read under a byte cap and a deadline, so a client that sends too much or
nothing at all costs a bounded amount and is dropped; anything malformed
gets a 400, any other method a 405, and unknown paths a 404.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..errors import ConfigError

logger = logging.getLogger("libpipe.monitor")

# A browser's GET with its usual headers is well under 2 KiB.
MAX_HEAD_BYTES = 8192
# A request that has not arrived whole by then is not coming.
READ_TIMEOUT = 10.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    def encode(self) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {REASONS[self.status]}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# path -> response, for GET requests.
Handler = Callable[[str], Awaitable[Response]]


def parse_request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of a request head; the query string is dropped."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "malformed request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request line is not ASCII") from None
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be a path")
    return method, target.partition("?")[0]


async def read_head(stream: trio.abc.Stream) -> bytes:
    """Bytes up to the blank line that ends the head."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest(431, "request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise BadRequest(400, "connection closed before the request ended")
        buffer += chunk
    return bytes(buffer)


async def open_http_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind ``host:port`` (port 0: any free one); a taken port is a ``ConfigError``."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve the monitor on {host}:{port}: {exc.strerror}") from None


def bound_address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    name = listeners[0].socket.getsockname()
    return name[0], name[1]


async def serve_http(handler: Handler, listeners: list[trio.SocketListener]) -> None:
    """Serve GET requests on ``listeners`` with ``handler`` until cancelled."""
    await trio.serve_listeners(functools.partial(_answer, handler), listeners)


async def _answer(handler: Handler, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.move_on_after(READ_TIMEOUT) as waited:
                head = await read_head(stream)
            if waited.cancelled_caught:
                return
            method, path = parse_request_line(head)
            if method != "GET":
                raise BadRequest(405, "only GET is served")
            response = await handler(path)
        except BadRequest as exc:
            response = Response(exc.status, f"{exc}\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        try:
            await stream.send_all(response.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("monitor client went away before its reply")
