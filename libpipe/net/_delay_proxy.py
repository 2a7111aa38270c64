"""A TCP relay that adds latency, for tests and benchmarks on loopback.

Theory of operation: every accepted connection is paired with one to the
target, and each direction is a pump of two tasks. The reader stamps each
chunk as it arrives and queues it with a release time of ``arrival +
delay`` (plus, under a bandwidth cap, the time the chunk spends on the
"wire" behind the chunks before it); the writer sleeps until a chunk's
release time and sends it. So a chunk's delay runs while later chunks are
already being read: the delay is a propagation delay, not a per-chunk
stall, and a round trip grows by the two one-way delays. Release times
never decrease, so order is kept even when the delay changes mid-flight.

The queue of each direction is bounded in bytes (``buffer_bytes``): a
reader that gets ahead waits, which is TCP's back-pressure reaching the
sender, not memory growing without bound. As on a real path, throughput is
then at most ``buffer_bytes / delay``.

EOF is relayed as a half-close once the data before it has been released;
a reset on one side resets the other. ``kill()`` resets every live
connection (a link that died), ``blackhole`` silently drops what arrives (a
link that hangs; keepalives must find out).

Linux ``tc netem`` would do this in the kernel, but it needs privileges
these machines do not give.
"""

from __future__ import annotations

import math
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import trio

from ..errors import ConfigError, ConnectionClosedError
from ._endpoint import single_errors

# One read; a larger one would make a bandwidth-capped link burstier.
CHUNK_BYTES = 64 * 1024
# Enough in flight for ~1 GB/s at 15 ms one-way, like a tuned TCP window.
DEFAULT_BUFFER_BYTES = 16 * 1024 * 1024
# SO_LINGER on, zero seconds: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class _Chunk:
    release: float
    data: bytes  # b"" is the EOF marker


class _Direction:
    """One way of one connection: a queue of chunks waiting to be released."""

    def __init__(self, proxy: DelayProxy, forward: bool) -> None:
        self.proxy = proxy
        self.forward = forward
        self.queue: deque[_Chunk] = deque()
        self.queued_bytes = 0
        self.link_free_at = -math.inf
        self.last_release = -math.inf
        self.has_chunk = trio.Event()
        self.has_room = trio.Event()

    def push(self, data: bytes) -> None:
        now = trio.current_time()
        delay = self.proxy.delay if self.forward else self.proxy.reverse_delay
        leaves = now
        bandwidth = self.proxy.bandwidth
        if bandwidth is not None and data:
            # The chunk waits for the chunks ahead of it to finish serialising.
            start = max(now, self.link_free_at)
            self.link_free_at = leaves = start + len(data) / bandwidth
        release = max(leaves + delay, self.last_release)
        self.last_release = release
        self.queue.append(_Chunk(release, data))
        self.queued_bytes += len(data)
        self.has_chunk.set()

    async def pop(self) -> _Chunk:
        while not self.queue:
            self.has_chunk = trio.Event()
            await self.has_chunk.wait()
        chunk = self.queue[0]
        await trio.sleep_until(chunk.release)
        self.queue.popleft()
        self.queued_bytes -= len(chunk.data)
        self.has_room.set()
        return chunk

    async def wait_for_room(self, limit: int) -> None:
        while self.queued_bytes >= limit:
            self.has_room = trio.Event()
            await self.has_room.wait()


class _Link:
    """One relayed connection: the accepted client and the dialed target."""

    def __init__(self, proxy: DelayProxy, client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.target: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.reset = False

    async def run(self) -> None:
        with self.scope:
            try:
                host, port = self.proxy.target
                try:
                    self.target = await trio.open_tcp_stream(host, port)
                except OSError:
                    # Nothing to relay to: the client sees a reset, as it
                    # would from a host that refuses the connection.
                    self.reset = True
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, self.client, self.target, True)
                    nursery.start_soon(self._pump, self.target, self.client, False)
            finally:
                self._close()

    def kill(self) -> None:
        self.reset = True
        self.scope.cancel()

    def _close(self) -> None:
        for stream in (self.client, self.target):
            if stream is None:
                continue
            if self.reset:
                try:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
            stream.socket.close()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, forward: bool
    ) -> None:
        direction = _Direction(self.proxy, forward)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, source, direction)
                await self._write(sink, direction)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # A reset (or a write into a closed peer) on one side: reset the
            # other, as a router dropping the path would.
            self.kill()

    async def _read(self, source: trio.SocketStream, direction: _Direction) -> None:
        while True:
            await direction.wait_for_room(self.proxy.buffer_bytes)
            data = await source.receive_some(CHUNK_BYTES)
            direction.push(data)
            if not data:
                return

    async def _write(self, sink: trio.SocketStream, direction: _Direction) -> None:
        while True:
            chunk = await direction.pop()
            if not chunk.data:
                if self.proxy.blackhole:
                    # The FIN is lost too: the link hangs until killed.
                    await trio.sleep_forever()
                await sink.send_eof()
                return
            if self.proxy.blackhole:
                self.proxy.bytes_dropped += len(chunk.data)
                continue
            await sink.send_all(chunk.data)
            if direction.forward:
                self.proxy.bytes_to_target += len(chunk.data)
            else:
                self.proxy.bytes_to_client += len(chunk.data)


class DelayProxy:
    """A testing and benchmarking tool, not part of libpipe's networking
    API: nothing in libpipe runs it, and its interface may change with the
    tests that use it.

    Listens on ``host:0`` and relays each connection to ``target``,
    holding every chunk for a one-way ``delay`` (seconds) on its way to the
    target and ``reverse_delay`` (default: ``delay``) on its way back, so a
    round trip grows by their sum. ``bandwidth`` (bytes/s, each direction)
    caps throughput.

    ``async with DelayProxy(("127.0.0.1", port), delay=0.015) as proxy:``
    then dial ``proxy.address``. The delays, bandwidth and ``blackhole`` may
    be changed while it runs; ``kill()`` resets the live connections."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        delay: float = 0.0,
        reverse_delay: float | None = None,
        bandwidth: float | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        host: str = "127.0.0.1",
    ) -> None:
        if isinstance(target, str):
            target_host, sep, target_port = target.rpartition(":")
            if not sep or not target_port.isdigit():
                raise ConfigError(f"proxy target {target!r} is not host:port")
            target = (target_host.strip("[]"), int(target_port))
        self.target = target
        self.delay = delay
        self.reverse_delay = delay if reverse_delay is None else reverse_delay
        self.bandwidth = bandwidth
        self.buffer_bytes = buffer_bytes
        self._validate()
        self.host = host
        self.port = 0
        self.blackhole = False
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.bytes_dropped = 0
        self.connections_accepted = 0
        self._links: set[_Link] = set()
        self._running: AbstractAsyncContextManager[None] | None = None

    def _validate(self) -> None:
        for name in ("delay", "reverse_delay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if self.bandwidth is not None and not (0 < self.bandwidth < math.inf):
            raise ConfigError(f"bandwidth must be positive bytes/s, not {self.bandwidth!r}")
        if self.buffer_bytes < CHUNK_BYTES:
            raise ConfigError(f"buffer_bytes must be at least {CHUNK_BYTES}")

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the target."""
        if not self.port:
            raise ConnectionClosedError("the proxy is not running (use `async with`)")
        return f"{self.host}:{self.port}"

    @property
    def live_connections(self) -> int:
        return len(self._links)

    def set_delay(self, delay: float, reverse_delay: float | None = None) -> None:
        """New one-way delays for chunks that arrive from now on."""
        old = self.delay, self.reverse_delay
        self.delay = delay
        self.reverse_delay = delay if reverse_delay is None else reverse_delay
        try:
            self._validate()
        except ConfigError:
            self.delay, self.reverse_delay = old
            raise

    def kill(self) -> None:
        """Reset every live connection at both ends (a dead link); new
        connections are still relayed."""
        for link in list(self._links):
            link.kill()

    async def __aenter__(self) -> DelayProxy:
        if self._running is not None:
            raise ConfigError("a DelayProxy runs once")
        self._running = self._run()
        await self._running.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._running is not None
        return await self._running.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        listener = (await trio.open_tcp_listeners(0, host=self.host))[0]
        self.port = listener.socket.getsockname()[1]
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                    yield
                    nursery.cancel_scope.cancel()
        finally:
            await listener.aclose()
            self.port = 0

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            client = await listener.accept()
            self.connections_accepted += 1
            link = _Link(self, client)
            self._links.add(link)
            nursery.start_soon(self._run_link, link)

    async def _run_link(self, link: _Link) -> None:
        try:
            await link.run()
        finally:
            self._links.discard(link)
