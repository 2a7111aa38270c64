from __future__ import annotations

import ast
import ctypes
import ctypes.util
import pathlib
import ssl

import pytest
import trio
import trio.testing

import libpipe.net
from libpipe.errors import ConnectionClosedError
from libpipe.net._tls import Security, accept, accept_socket, dial, open_listener
from libpipe.net._transport import SocketStream

NET = pathlib.Path(libpipe.net.__file__).parent


async def _pair(security: Security, nursery: trio.Nursery) -> tuple[SocketStream, SocketStream]:
    listener = await open_listener("127.0.0.1", 0, security)
    port = listener.getsockname()[1]
    box: list[SocketStream] = []

    async def admit() -> None:
        with listener:
            sock, address = await accept_socket(listener)
            box.append((await accept(sock, security, address)).stream)

    nursery.start_soon(admit)
    client = (await dial("127.0.0.1", port, security)).stream
    while not box:
        await trio.sleep(0.001)
    return client, box[0]


async def _receive_exactly(stream: SocketStream, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view.nbytes:
        n = await stream.receive_into(view)
        assert n, "early EOF"
        view = view[n:]
    return bytes(buffer)


@pytest.mark.parametrize("tls", [False, True])
async def test_many_and_large_buffers_arrive_in_order(tls: bool, server_security: Security) -> None:
    security = server_security if tls else Security.insecure()
    # More buffers than one sendmsg takes, and one larger than a socket buffer.
    buffers = [bytes([i % 251]) * (i % 7 + 1) for i in range(3000)]
    buffers.append(bytes(range(256)) * 40000)
    expected = b"".join(buffers)
    async with trio.open_nursery() as nursery:
        client, server = await _pair(security, nursery)
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await _receive_exactly(server, len(expected)))

        nursery.start_soon(reader)
        await client.send_buffers(buffers)
    assert received == [expected]
    await client.send_eof()
    assert await server.receive_some(10) == b""
    client.close()
    server.close()


async def test_closed_stream_raises_closed_error() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await _pair(Security.insecure(), nursery)
        waiting: list[BaseException] = []

        async def blocked_reader() -> None:
            try:
                await server.receive_some(10)
            except ConnectionClosedError as exc:
                waiting.append(exc)

        nursery.start_soon(blocked_reader)
        await trio.sleep(0.05)
        server.close()
    assert len(waiting) == 1
    with pytest.raises(ConnectionClosedError):
        await server.send_all(b"x")
    client.close()


async def test_concurrent_receivers_are_refused() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await _pair(Security.insecure(), nursery)
        nursery.start_soon(server.receive_some, 10)
        await trio.sleep(0.01)
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some(10)
        await client.send_all(b"x")
    client.close()
    server.close()


def test_net_imports_only_wire_from_libpipe() -> None:
    allowed = {"wire", "errors"}
    for path in NET.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert (node.module or "").split(".")[0] in allowed, (path.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("libpipe"), (path.name, node.module)


def test_public_names_are_reexports() -> None:
    public = [n for n in dir(libpipe.net) if not n.startswith("_")]
    for name in ("Identity", "peer_id_from_public_key", "SwarmCA", "NodeCredentials", "Security"):
        assert name in public
    for name in public:
        obj = getattr(libpipe.net, name)
        if hasattr(obj, "__module__"):
            assert obj.__module__.startswith("libpipe.net._"), name


@pytest.mark.parametrize("tls", [False, True])
async def test_one_buffer_larger_than_the_socket_buffer(
    tls: bool, server_security: Security
) -> None:
    security = server_security if tls else Security.insecure()
    payload = bytes(range(256)) * 32768  # 8 MiB: written in parts, waiting between
    async with trio.open_nursery() as nursery:
        client, server = await _pair(security, nursery)
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await _receive_exactly(server, len(payload)))

        nursery.start_soon(reader)
        rest = client.send_now([payload])
        assert rest  # the kernel took only part of it at once
        await client.send_rest(rest)
    assert received == [payload]
    client.close()
    server.close()


class _WantsRead:
    """Stands in for ``SSLSocket.send``: WANT_READ (OpenSSL must take in a
    record first) until ``release``, then the real send. Counts the tries,
    so a writer that spins on the writable socket shows."""

    def __init__(self, stream: SocketStream) -> None:
        self.real = stream.socket.send
        self.tries = 0
        self.released = False

    def __call__(self, data: memoryview) -> int:
        self.tries += 1
        if not self.released:
            raise ssl.SSLWantReadError("the peer's record first")
        return self.real(data)


@pytest.mark.parametrize("reader_first", [True, False])
async def test_a_tls_write_that_wants_a_read_waits_for_one(
    reader_first: bool, server_security: Security, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WANT_READ from SSL_write: the writer waits for the reader's next read
    (or, with no reader, for the socket to be readable), it does not retry
    on the writable socket in a loop; the reader keeps its data."""
    async with trio.open_nursery() as nursery:
        client, server = await _pair(server_security, nursery)
        # Takes in the session tickets TLS 1.3 servers send after the
        # handshake: the client's socket then has nothing to read.
        await server.send_all(b"hello")
        assert await _receive_exactly(client, 5) == b"hello"
        send = _WantsRead(client)
        monkeypatch.setattr(client.socket, "send", send)
        got: list[bytes] = []

        async def read() -> None:
            got.append(await client.receive_some(100))

        async def write() -> None:
            await client.send_all(b"w" * 100)

        with trio.fail_after(10):
            if reader_first:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(write)
            # A spinning writer never blocks: this would time out.
            await trio.testing.wait_all_tasks_blocked()
            assert send.tries == 1
            if not reader_first:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
            send.released = True
            await server.send_all(b"record")
            assert await _receive_exactly(server, 100) == b"w" * 100
    assert send.tries == 2
    assert got == [b"record"]
    client.close()
    server.close()


def _request_key_update(stream: SocketStream) -> None:
    """Make OpenSSL send a TLS 1.3 KeyUpdate asking the peer to update its
    keys too (Python's ssl has no call for it: libssl's SSL_key_update on
    the SSL* that CPython's _ssl object holds right after its socket
    weakref). Skips where that layout or libssl cannot be confirmed."""
    try:
        libssl = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
    except OSError:
        pytest.skip("libssl not loadable")
    libssl.SSL_get_fd.argtypes = [ctypes.c_void_p]
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    sslobj = stream.socket._sslobj  # type: ignore[attr-defined]
    word = ctypes.sizeof(ctypes.c_void_p)
    # PySSLSocket: PyObject_HEAD (refcount, type), Socket weakref, SSL *ssl
    ptr = ctypes.c_void_p.from_address(id(sslobj) + 3 * word).value
    if not ptr or libssl.SSL_get_fd(ptr) != stream.socket.fileno():
        pytest.skip("cannot find the SSL* of this Python's ssl socket")
    assert libssl.SSL_key_update(ptr, 1) == 1  # SSL_KEY_UPDATE_REQUESTED


async def test_a_key_update_during_a_blocked_send(server_security: Security) -> None:
    """The peer asks for a key update while our large send waits for the
    kernel (the peer reads nothing). The read that takes the KeyUpdate in
    does not write (OpenSSL answers it at the next SSL_write, once the
    pending one is done: see ``receive_into``), so it never waits on
    writability beside the writer; the data both ways arrives intact, and
    so does traffic after the update."""
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: far over the socket buffers
    async with trio.open_nursery() as nursery:
        client, server = await _pair(server_security, nursery)
        await server.send_all(b"hello")  # takes in the session tickets
        assert await _receive_exactly(client, 5) == b"hello"
        got: list[bytes] = []
        sent = trio.Event()

        async def write() -> None:
            await client.send_all(payload)
            sent.set()

        async def read() -> None:
            got.append(await _receive_exactly(client, 6))

        with trio.fail_after(20):
            nursery.start_soon(write)
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # the writer waits for writability
            _request_key_update(server)
            await server.send_all(b"update")  # carries the KeyUpdate
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"update"]  # read beside the waiting writer
            assert await _receive_exactly(server, len(payload)) == payload
            await sent.wait()
            await client.send_all(b"after")  # under the client's new keys
            assert await _receive_exactly(server, 5) == b"after"
            await server.send_all(b"again")
            assert await _receive_exactly(client, 5) == b"again"
    client.close()
    server.close()
