"""Transport speed on loopback: libpipe against the raw sockets under it.

In one run, on 127.0.0.1:

* raw TCP: blocking sockets, ``sendall``/``recv_into``, echo server in a thread;
* raw TLS: blocking ``ssl.SSLSocket`` (TLS 1.3, Ed25519 swarm certificates):
  the OpenSSL limit of this machine;
* raw trio TCP: ``trio.SocketStream`` ping-pong between two tasks of one
  loop, as the libpipe RPC rows run (``raw_trio_tls``: over
  ``trio.SSLStream``, trio's own TLS);
* libpipe stream: ``net.SocketStream`` (the non-blocking socket libpipe
  drives from trio), plain and TLS, bytes only;
* libpipe RPC: full frames through the wire codec and the connection
  (``Connection.call`` / a stream), plaintext and TLS; ``_inline`` rows: the
  server answers on its reader task (``Router.unary_inline``), no hand-off;
* libpipe session: round trips on one open bidirectional stream, the shape
  of a client's decode steps; ``_cold`` rows (and their raw trio
  counterpart) leave the process idle for ``COLD_GAP_S`` before each round,
  as a decode step finds it after a token's compute: caches and branch
  predictors are cold, and the same code costs about twice as much.

Measures (a) ping-pong of a small message (median and p99 microseconds),
(b) a decode-step RPC: a (1, 1, 4096) fp16 tensor each way (median us),
(c) one-way throughput of 16 MiB messages (MB/s), and the small call again
while four streams push 16 MiB messages on its connection (head-of-line
blocking; ``rpc_during_bulk_vs_idle``; the ``_whole`` row turns continued
messages off, each message one frame: ``rpc_during_bulk_sliced_vs_whole``).
Ratios are libpipe over raw (or over idle), measured in the same run;
``session_step_cold_vs_raw`` compares the cold rows.
Targets: ``tls_stream_vs_raw_tls`` >= 0.70 (libpipe TLS streaming over raw
blocking TLS); ``rpc_rtt_vs_raw`` <= 2.0 (libpipe's small-RPC round trip
over raw trio ping-pong). ``tls_rpc_rtt_vs_raw`` holds the TLS call to the
same plaintext baseline, encryption included; ``tls_rpc_rtt_vs_raw_trio_tls``
to trio's own TLS.

    .venv/bin/python bench/transport.py [--rounds 2000 --messages 24 --json --quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import queue
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Callable

import trio

from libpipe.net import Security, SwarmCA
from libpipe.net._tls import accept, accept_socket, dial, open_listener

SMALL = 64
STEP_BYTES = 4096 * 2  # a (1, 1, 4096) fp16 hidden state
BIG = 16 * 1024 * 1024
HEADER = 64  # about a frame header with its tensor metadata
# Idle time before each round of the cold rows: about one decode step's
# compute on a small GPU (the regime of bench/e2e.py). A blocking sleep, as
# the loop's thread is parked while the model runs.
COLD_GAP_S = 0.016


def _stats(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
    }


def _merge(runs: list[dict[str, float]]) -> dict[str, float]:
    """One row from several runs of the same case: the mean of their
    medians, the worst of their p99s."""
    return {
        "median_us": statistics.fmean(r["median_us"] for r in runs),
        "p99_us": max(r["p99_us"] for r in runs),
    }


# --- raw blocking sockets -----------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


def _blocking_pair(tls: Security | None) -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return client, server
    box: list[ssl.SSLSocket] = []
    thread = threading.Thread(
        target=lambda: box.append(tls.server_context.wrap_socket(server, server_side=True))
    )
    thread.start()
    client = tls.client_context.wrap_socket(client)
    thread.join()
    return client, box[0]


def raw_pingpong(tls: Security | None, size: int, rounds: int) -> dict[str, float]:
    client, server = _blocking_pair(tls)

    def echo() -> None:
        buf = memoryview(bytearray(size))
        for _ in range(rounds):
            _recv_exact(server, buf)
            server.sendall(buf)

    thread = threading.Thread(target=echo)
    thread.start()
    message, back = b"x" * size, memoryview(bytearray(size))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        client.sendall(message)
        _recv_exact(client, back)
        samples.append(time.perf_counter() - t0)
    thread.join()
    client.close()
    server.close()
    return _stats(samples)


def raw_throughput(tls: Security | None, messages: int) -> float:
    client, server = _blocking_pair(tls)
    payload = bytes(BIG)

    def sink() -> None:
        buf = memoryview(bytearray(BIG))
        for _ in range(messages):
            _recv_exact(server, buf)
        server.sendall(b"k")

    thread = threading.Thread(target=sink)
    thread.start()
    t0 = time.perf_counter()
    for _ in range(messages):
        client.sendall(payload)
    _recv_exact(client, memoryview(bytearray(1)))
    elapsed = time.perf_counter() - t0
    thread.join()
    client.close()
    server.close()
    return messages * BIG / elapsed / 1e6


# --- raw trio -------------------------------------------------------------------


async def _trio_receive_exact(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = await stream.receive_some(size - got)
        if not chunk:
            raise ConnectionError("peer closed")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def trio_pingpong(
    size: int, rounds: int, tls: Security | None = None, gap: float = 0.0
) -> dict[str, float]:
    """Ping-pong between two trio tasks of one loop, as libpipe's RPC rows
    run; with ``tls``, over ``trio.SSLStream`` (trio's own TLS); ``gap``:
    seconds idle before each round (cold rows)."""

    async def echo(stream: trio.abc.Stream) -> None:
        if tls is not None:
            stream = trio.SSLStream(stream, tls.server_context, server_side=True)
        for _ in range(rounds):
            await stream.send_all(await _trio_receive_exact(stream, size))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if tls is not None:
            stream = trio.SSLStream(stream, tls.client_context)
        message, samples = b"x" * size, []
        for _ in range(rounds):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            await stream.send_all(message)
            await _trio_receive_exact(stream, size)
            samples.append(time.perf_counter() - t0)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return _stats(samples)


# --- libpipe's socket stream (bytes only) ------------------------------------------


async def _stream_pair(security: Security, nursery: trio.Nursery):
    listener = await open_listener("127.0.0.1", 0, security)
    port = listener.getsockname()[1]
    server_box: list = []

    async def admit() -> None:
        sock, address = await accept_socket(listener)
        server_box.append(await accept(sock, security, address))

    nursery.start_soon(admit)
    client = await dial("127.0.0.1", port, security)
    while not server_box:
        await trio.sleep(0.001)
    listener.close()
    return client.stream, server_box[0].stream


async def _receive_exact_into(stream, view: memoryview) -> None:
    while view.nbytes:
        n = await stream.receive_into(view)
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


async def stream_pingpong(security: Security, size: int, rounds: int) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        client, server = await _stream_pair(security, nursery)

        async def echo() -> None:
            buf = memoryview(bytearray(size))
            for _ in range(rounds):
                await _receive_exact_into(server, buf)
                await server.send_all(buf)

        nursery.start_soon(echo)
        message, back, samples = b"x" * size, memoryview(bytearray(size)), []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await client.send_all(message)
            await _receive_exact_into(client, back)
            samples.append(time.perf_counter() - t0)
    client.close()
    server.close()
    return _stats(samples)


async def stream_throughput(security: Security, messages: int) -> float:
    async with trio.open_nursery() as nursery:
        client, server = await _stream_pair(security, nursery)

        async def sink() -> None:
            buf = memoryview(bytearray(BIG + HEADER))
            for _ in range(messages):
                await _receive_exact_into(server, buf)
            await server.send_all(b"k")

        # The receiver runs its own trio loop in a thread, as the raw rows
        # run theirs: encryption and decryption then overlap on two cores,
        # as they do between two machines.
        nursery.start_soon(trio.to_thread.run_sync, trio.run, sink)
        header, payload = bytes(HEADER), bytes(BIG)
        t0 = time.perf_counter()
        for _ in range(messages):
            # A frame as the connection writes it: header, then the payload.
            await client.send_buffers([header, payload])
        await _receive_exact_into(client, memoryview(bytearray(1)))
        elapsed = time.perf_counter() - t0
    client.close()
    server.close()
    return messages * BIG / elapsed / 1e6


# --- libpipe RPC (codec + connection) ------------------------------------------------


async def rpc_pingpong(
    security: Security,
    tensor_bytes: int,
    rounds: int,
    compression: bool = False,
    inline: bool = False,
) -> dict[str, float]:
    """Unary calls one after another; ``inline``: the server answers with a
    plain function on its reader task (``Router.unary_inline``)."""
    import torch

    from libpipe.net import ConnectionConfig, connect, serve

    config = ConnectionConfig(compression=compression)
    from libpipe.net import Message, Router

    router = Router()

    async def echo(ctx, request: Message) -> Message:
        return request

    if inline:
        router.unary_inline("echo", lambda ctx, request: request)
    else:
        router.unary("echo", echo)
    tensors = (torch.randn((1, 1, tensor_bytes // 2)).half(),) if tensor_bytes else ()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(
                serve, router, host="127.0.0.1", port=0, security=security, config=config
            )
        )
        async with connect(host, port, security=security, config=config) as conn:
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await conn.call("echo", {"step": 1}, tensors)
                samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    return _stats(samples)


async def session_pingpong(
    security: Security,
    tensor_bytes: int,
    rounds: int,
    compression: bool = False,
    gap: float = 0.0,
) -> dict[str, float]:
    """Round trips on one bidirectional stream: an inference session's shape
    (send a step, receive its result), as a client drives decode steps;
    ``gap``: seconds idle before each round (cold rows)."""
    import torch

    from libpipe.net import ConnectionConfig, Router, connect, serve

    config = ConnectionConfig(compression=compression)
    router = Router()

    async def echo(ctx, stream) -> None:
        async for message in stream:
            await stream.send(message.meta, message.tensors)

    router.stream("echo", echo)
    tensors = (torch.randn((1, 1, tensor_bytes // 2)).half(),) if tensor_bytes else ()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(
                serve, router, host="127.0.0.1", port=0, security=security, config=config
            )
        )
        async with connect(host, port, security=security, config=config) as conn:
            async with conn.open_stream("echo") as stream:
                samples = []
                for position in range(rounds):
                    if gap:
                        time.sleep(gap)
                    t0 = time.perf_counter()
                    await stream.send({"position": position, "step": 1}, tensors)
                    await stream.receive()
                    samples.append(time.perf_counter() - t0)
                await stream.close_send()
        nursery.cancel_scope.cancel()
    return _stats(samples)


async def rpc_during_bulk(
    security: Security, streams: int, frames: int, rounds: int, continuation: bool = True
) -> dict[str, float]:
    """Small-RPC round trips on a connection that ``streams`` streams are
    filling with 16 MiB messages at the same time (head-of-line blocking);
    without ``continuation`` each message goes as one frame."""
    import torch

    from libpipe.net import ConnectionConfig, Message, Router, connect, serve

    config = ConnectionConfig(compression=False, continuation=continuation)
    router = Router()

    async def echo(ctx, request: Message) -> Message:
        return request

    async def sink(ctx, stream) -> None:
        async for _ in stream:
            pass

    router.unary("echo", echo)
    router.stream("sink", sink)
    tensor = torch.randn(BIG // 2).half()
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(
                serve, router, host="127.0.0.1", port=0, security=security, config=config
            )
        )
        async with connect(host, port, security=security, config=config) as conn:
            done = 0

            async def fill() -> None:
                nonlocal done
                async with conn.open_stream("sink") as stream:
                    for _ in range(frames):
                        await stream.send({}, (tensor,))
                    await stream.close_send()
                done += 1

            async with trio.open_nursery() as bulk:
                for _ in range(streams):
                    bulk.start_soon(fill)
                await trio.sleep(0.01)
                while done < streams and len(samples) < rounds:
                    t0 = time.perf_counter()
                    await conn.call("echo", {"step": 1})
                    samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    stats = _stats(samples)
    stats["max_us"] = max(samples) * 1e6
    stats["samples"] = len(samples)
    return stats


async def rpc_throughput(security: Security, messages: int, compression: bool = False) -> float:
    import torch

    from libpipe.net import ConnectionConfig, connect, serve

    config = ConnectionConfig(compression=compression)
    from libpipe.net import Router

    router = Router()

    async def sink(ctx, stream) -> None:
        count = 0
        async for _ in stream:
            count += 1
        await stream.send({"count": count})

    router.stream("sink", sink)
    tensor = torch.randn(BIG // 2).half()
    # The server runs its own trio loop in a thread, as the raw rows' sink
    # does: encryption and decryption then overlap on two cores, as they do
    # between two machines (one loop for both ends would halve the figure).
    started: queue.Queue = queue.Queue()

    async def server_side() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                functools.partial(
                    serve, router, host="127.0.0.1", port=0, security=security, config=config
                )
            )
            started.put((address, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(server_side,))
    thread.start()
    (host, port), token, scope = await trio.to_thread.run_sync(started.get)
    try:
        async with connect(host, port, security=security, config=config) as conn:
            async with conn.open_stream("sink") as stream:
                t0 = time.perf_counter()
                for _ in range(messages):
                    await stream.send({}, (tensor,))
                await stream.close_send()
                reply = await stream.receive()
                elapsed = time.perf_counter() - t0
                assert reply.meta["count"] == messages
    finally:
        await trio.to_thread.run_sync(
            functools.partial(trio.from_thread.run_sync, scope.cancel, trio_token=token)
        )
        await trio.to_thread.run_sync(thread.join)
    return messages * BIG / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="ping-pong round trips per case")
    parser.add_argument(
        "--messages", type=int, default=24, help="16 MiB messages per throughput case"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (300 rounds, 2 messages)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages = 300, 2

    ca = SwarmCA.create()
    tls = Security.tls(ca.issue("bench"))
    plain = Security.insecure()
    rounds, messages = args.rounds, args.messages
    run: Callable = trio.run
    results: dict[str, dict] = {"small": {}, "step": {}, "throughput_mb_s": {}}

    for size, key in ((SMALL, "small"), (STEP_BYTES, "step")):
        results[key]["raw_tcp"] = raw_pingpong(None, size, rounds)
        results[key]["raw_tls"] = raw_pingpong(tls, size, rounds)
        results[key]["raw_trio"] = run(trio_pingpong, size, rounds)
        results[key]["raw_trio_tls"] = run(trio_pingpong, size, rounds, tls)
        results[key]["libpipe_stream_plain"] = run(stream_pingpong, plain, size, rounds)
        results[key]["libpipe_stream_tls"] = run(stream_pingpong, tls, size, rounds)
    results["throughput_mb_s"]["raw_tcp"] = raw_throughput(None, messages)
    results["throughput_mb_s"]["raw_tls"] = raw_throughput(tls, messages)
    results["throughput_mb_s"]["libpipe_stream_plain"] = run(stream_throughput, plain, messages)
    results["throughput_mb_s"]["libpipe_stream_tls"] = run(stream_throughput, tls, messages)

    # The transport comparison runs without zstd (the raw baselines do not
    # compress); one row shows what zstd costs on a link this fast.
    results["small"]["libpipe_rpc_plain"] = run(rpc_pingpong, plain, 0, rounds)
    results["small"]["libpipe_rpc_tls"] = run(rpc_pingpong, tls, 0, rounds)
    results["small"]["libpipe_rpc_plain_inline"] = run(rpc_pingpong, plain, 0, rounds, False, True)
    results["small"]["libpipe_rpc_tls_inline"] = run(rpc_pingpong, tls, 0, rounds, False, True)
    results["step"]["libpipe_rpc_plain"] = run(rpc_pingpong, plain, STEP_BYTES, rounds)
    results["step"]["libpipe_rpc_tls"] = run(rpc_pingpong, tls, STEP_BYTES, rounds)
    results["step"]["libpipe_session_plain"] = run(session_pingpong, plain, STEP_BYTES, rounds)
    results["step"]["libpipe_session_tls"] = run(session_pingpong, tls, STEP_BYTES, rounds)
    # Cold: each round after COLD_GAP_S idle, raw and libpipe alternated so
    # that both see the same machine.
    cold_rounds = max(30, rounds // 10)
    raw_cold: list[dict[str, float]] = []
    session_cold: list[dict[str, float]] = []
    for _ in range(2):
        raw_cold.append(run(trio_pingpong, STEP_BYTES, cold_rounds // 2, None, COLD_GAP_S))
        session_cold.append(
            run(session_pingpong, plain, STEP_BYTES, cold_rounds // 2, False, COLD_GAP_S)
        )
    results["step"]["raw_trio_cold"] = _merge(raw_cold)
    results["step"]["libpipe_session_plain_cold"] = _merge(session_cold)
    # Head-of-line blocking: the same small call while 4 streams push 16 MiB
    # frames on its connection, against the idle figure above.
    results["small"]["libpipe_rpc_plain_during_bulk"] = run(
        rpc_during_bulk, plain, 4, max(2, messages // 2), rounds
    )
    results["small"]["libpipe_rpc_plain_during_bulk_whole"] = run(
        rpc_during_bulk, plain, 4, max(2, messages // 2), rounds, False
    )
    tp = results["throughput_mb_s"]
    tp["libpipe_rpc_plain"] = run(rpc_throughput, plain, messages)
    tp["libpipe_rpc_tls"] = run(rpc_throughput, tls, messages)
    tp["libpipe_rpc_tls_zstd"] = run(rpc_throughput, tls, messages, True)

    small, step = results["small"], results["step"]
    ratios = {
        "tls_stream_vs_raw_tls": tp["libpipe_rpc_tls"] / tp["raw_tls"],
        "plain_stream_vs_raw_tcp": tp["libpipe_rpc_plain"] / tp["raw_tcp"],
        "rpc_rtt_vs_raw": small["libpipe_rpc_plain"]["median_us"] / small["raw_trio"]["median_us"],
        "tls_rpc_rtt_vs_raw": small["libpipe_rpc_tls"]["median_us"]
        / small["raw_trio"]["median_us"],
        "tls_rpc_rtt_vs_raw_trio_tls": small["libpipe_rpc_tls"]["median_us"]
        / small["raw_trio_tls"]["median_us"],
        "inline_rpc_rtt_vs_raw": small["libpipe_rpc_plain_inline"]["median_us"]
        / small["raw_trio"]["median_us"],
        "inline_tls_rpc_rtt_vs_raw": small["libpipe_rpc_tls_inline"]["median_us"]
        / small["raw_trio"]["median_us"],
        "tls_rpc_rtt_vs_raw_tls": small["libpipe_rpc_tls"]["median_us"]
        / small["raw_tls"]["median_us"],
        "step_rtt_vs_raw": step["libpipe_rpc_plain"]["median_us"] / step["raw_trio"]["median_us"],
        "session_step_vs_raw": step["libpipe_session_plain"]["median_us"]
        / step["raw_trio"]["median_us"],
        "session_step_cold_vs_raw": step["libpipe_session_plain_cold"]["median_us"]
        / step["raw_trio_cold"]["median_us"],
        "rpc_during_bulk_vs_idle": small["libpipe_rpc_plain_during_bulk"]["median_us"]
        / small["libpipe_rpc_plain"]["median_us"],
        "rpc_during_bulk_sliced_vs_whole": small["libpipe_rpc_plain_during_bulk"]["median_us"]
        / small["libpipe_rpc_plain_during_bulk_whole"]["median_us"],
    }
    if args.json:
        print(json.dumps({"results": results, **ratios}, indent=1))
        return 0
    for key, title in (
        ("small", f"(a) ping-pong, {SMALL} B"),
        ("step", "(b) decode step, (1,1,4096) fp16 each way"),
    ):
        print(f"\n{title}\n{'case':<32}{'median us':>12}{'p99 us':>12}")
        for name, row in results[key].items():
            print(f"{name:<32}{row['median_us']:>12.1f}{row['p99_us']:>12.1f}")
    print(f"\n(c) one-way throughput, 16 MiB messages x {messages}\n{'case':<32}{'MB/s':>12}")
    for name, value in tp.items():
        print(f"{name:<32}{value:>12.0f}")
    print("\nratios (libpipe / raw)")
    for name, value in ratios.items():
        print(f"{name:<32}{value:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
