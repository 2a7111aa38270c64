"""The monitor without a browser: events from diffs, the HTTP front, polling, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import trio

from libpipe.cli.main import main
from libpipe.errors import ConfigError
from libpipe.monitor import Monitor, diff
from libpipe.monitor._http import MAX_HEAD_BYTES, BadRequest, parse_request_line
from libpipe.net import ConnectionPool, Identity, Security
from libpipe.swarm import RecordState, ServerStatus, SwarmSnapshot, coverage

from .conftest import MODEL, make_record


def status(identity: Identity, span, *, state=RecordState.ONLINE, rtt=0.001) -> ServerStatus:
    return ServerStatus(make_record(span, identity, state=state), rtt)


def snapshot(*servers: ServerStatus, at: float = 100.0) -> SwarmSnapshot:
    records = [s.record for s in servers]
    return SwarmSnapshot("127.0.0.1:9", at, servers, tuple(coverage(records, {MODEL: 8})))


def kinds(events) -> list[str]:
    return sorted(e.kind for e in events)


def test_first_look_lists_joins_and_uncovered_blocks():
    a, b = Identity.generate(), Identity.generate()
    events = diff(None, snapshot(status(a, (0, 4)), status(b, (0, 2))))
    assert kinds(events) == ["join", "join", "uncovered"]
    assert any("blocks 4-7 have no server" in e.message for e in events)


def test_moves_deaths_departures_and_coverage_are_reported():
    a, b, c, d = (Identity.generate() for _ in range(4))
    before = snapshot(
        status(a, (0, 4)),
        status(b, (4, 8)),
        status(c, (4, 8), state=RecordState.DRAINING),
        status(d, (0, 8)),
    )
    after = snapshot(status(a, (2, 6)), status(d, (0, 8), rtt=None), at=101.0)
    events = diff(before, after)
    assert kinds(events) == ["dead", "left", "move", "unreachable"]
    by_kind = {e.kind: e for e in events}
    assert by_kind["dead"].peer_id == b.peer_id and "4:8" in by_kind["dead"].message
    assert by_kind["left"].peer_id == c.peer_id
    assert "from blocks 0:4 to 2:6" in by_kind["move"].message
    assert all(e.at == 101.0 for e in events)
    # d alone still covers everything; a server going back online and a gap closing:
    later = snapshot(status(a, (2, 6), state=RecordState.JOINING), status(d, (0, 8)), at=102.0)
    assert kinds(diff(after, later)) == ["reachable", "state"]
    gap = snapshot(status(a, (0, 4)), at=103.0)
    healed = snapshot(status(a, (0, 4)), status(b, (4, 8)), at=104.0)
    assert kinds(diff(gap, healed)) == ["covered", "join"]
    assert kinds(diff(healed, healed)) == []


def test_last_server_of_a_model_dying_uncovers_all_its_blocks():
    a = Identity.generate()
    events = diff(snapshot(status(a, (0, 8))), snapshot(at=101.0))
    assert kinds(events) == ["dead", "uncovered"]
    assert any("blocks 0-7 have no server" in e.message for e in events)


def test_request_lines_are_parsed_strictly():
    assert parse_request_line(b"GET /api/swarm?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == (
        "GET",
        "/api/swarm",
    )
    for bad in (b"GET /\r\n\r\n", b"GET http://x/ HTTP/1.1\r\n\r\n", b"\xff / HTTP/1.1\r\n\r\n"):
        with pytest.raises(BadRequest) as caught:
            parse_request_line(bad)
        assert caught.value.status == 400


async def http(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        await stream.send_eof()
        reply = bytearray()
        while chunk := await stream.receive_some(65536):
            reply += chunk
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_http_front_serves_page_and_json_and_refuses_the_rest(nursery):
    async with ConnectionPool(Security.insecure()) as pool:
        monitor = Monitor(pool, ["127.0.0.1:1"], interval=60.0, timeout=0.5)
        host, port = await nursery.start(monitor.serve, 0)
        code, body = await http(host, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert code == 200 and b"<title>libpipe swarm monitor</title>" in body
        code, body = await http(host, port, b"GET /api/swarm HTTP/1.1\r\n\r\n")
        state = json.loads(body)
        assert code == 200 and state["snapshot"] is None and state["interval"] == 60.0
        assert (await http(host, port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await http(host, port, b"POST / HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await http(host, port, b"garbage\r\n\r\n"))[0] == 400
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10)
        assert (await http(host, port, huge))[0] == 431
        # A client that hangs up mid-request costs nothing and breaks nothing.
        assert (await http(host, port, b"GET / HTT"))[0] == 400
        assert (await http(host, port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_silent_client_is_dropped_after_the_read_timeout(nursery, autojump_clock):
    async with ConnectionPool(Security.insecure()) as pool:
        monitor = Monitor(pool, ["127.0.0.1:1"], interval=600.0, timeout=0.5)
        host, port = await nursery.start(monitor.serve, 0)
        stream = await trio.open_tcp_stream(host, port)
        with trio.fail_after(60):
            assert await stream.receive_some(100) == b""
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_poll_records_errors_and_recovers(live_swarm):
    node = await live_swarm.add((0, 12))
    async with ConnectionPool(Security.insecure()) as pool:
        monitor = Monitor(pool, ["127.0.0.1:1"], interval=1.0, timeout=1.0)
        await monitor.poll()
        assert monitor.error is not None and "no peer answered" in monitor.error
        assert monitor.state()["snapshot"] is None
        monitor.peers.append(node.address)
        await monitor.poll()
        state = monitor.state()
        assert state["error"] is None and state["polls"] == 1
        assert [s["peer_id"] for s in state["snapshot"]["servers"]] == [node.node.peer_id]
        assert [e["kind"] for e in state["events"]] == ["join"]


async def test_monitor_keeps_going_when_its_first_peer_dies(live_swarm):
    first = await live_swarm.add((0, 6))
    second = await live_swarm.add((6, 12))
    await live_swarm.converge()
    async with ConnectionPool(Security.insecure()) as pool:
        # A generous timeout: the dead peer refuses at once, and the live one
        # must not miss it on a loaded machine.
        monitor = Monitor(pool, [first.address], interval=1.0, timeout=10.0)
        await monitor.poll()
        first.kill()
        await monitor.poll()
        assert monitor.error is None
        assert monitor.snapshot is not None and monitor.snapshot.source == second.address


def test_monitor_refuses_bad_settings():
    pool = ConnectionPool(Security.insecure())
    with pytest.raises(ConfigError):
        Monitor(pool, [])
    with pytest.raises(ConfigError):
        Monitor(pool, ["127.0.0.1:1"], interval=0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--peers", "127.0.0.1:5", "--insecure", "--port", "70000"],
        ["--peers", "127.0.0.1:5", "--insecure", "--interval", "0"],
        ["--peers", "bad", "--insecure"],
    ],
)
async def test_monitor_cli_bad_options_are_config_errors(argv, capsys):
    assert await trio.to_thread.run_sync(main, ["monitor", *argv]) == 2
    assert "ConfigError" in capsys.readouterr().err


async def test_monitor_cli_port_in_use_is_a_config_error(capsys):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with listener:
        argv = ["monitor", "--peers", "127.0.0.1:5", "--insecure", "--port", str(port)]
        assert await trio.to_thread.run_sync(main, argv) == 2
    assert "cannot serve the monitor on 127.0.0.1" in capsys.readouterr().err


def test_snapshot_json_is_complete():
    a = Identity.generate()
    snap = snapshot(status(a, (0, 8), rtt=None))
    doc = snap.to_json()
    assert doc["servers"][0]["rtt_s"] is None
    assert doc["models"][0]["servers"] == [1] * 8
    assert any("did not answer a ping" in w for w in doc["warnings"])
    assert dataclasses.replace(snap, rejected={"expired": 2}).warnings()[-1].startswith("2 record")


@pytest.mark.slow
async def test_monitor_command_serves_the_swarm(live_swarm):
    node = await live_swarm.add((0, 12))
    argv = [sys.executable, "-m", "libpipe.cli.main", "monitor", "--peers", node.address]
    process = await trio.lowlevel.open_process(
        [*argv, "--insecure", "--port", "0", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(30):
            line = b""
            while b"\n" not in line:
                line += await process.stdout.receive_some(1024)
            url = line.decode().split()[2]
            assert url.startswith("http://127.0.0.1:")
            host, port = url.removeprefix("http://").rstrip("/").split(":")
            while True:
                _, body = await http(host, int(port), b"GET /api/swarm HTTP/1.1\r\n\r\n")
                snap = json.loads(body)["snapshot"]
                if snap is not None:
                    break
                await trio.sleep(0.1)
        assert [s["peer_id"] for s in snap["servers"]] == [node.node.peer_id]
    finally:
        process.terminate()
        await process.wait()
