"""`libpipe swarm` and the survey under it, against real gossip nodes on loopback."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import trio

from libpipe.cli.main import main
from libpipe.cli.swarm import render
from libpipe.errors import ConnectionBrokenError, RecordError
from libpipe.net import ConnectionPool, Identity, Message, Router, Security, serve
from libpipe.swarm import (
    MAX_BLOCKS,
    RecordState,
    ServerRecord,
    ServerStatus,
    SwarmSnapshot,
    coverage,
    sign_record,
    survey,
)

from .conftest import MODEL, LiveSwarm, make_record


async def four_servers(live_swarm: LiveSwarm):
    nodes = [
        await live_swarm.add((0, 4)),
        await live_swarm.add((4, 8)),
        await live_swarm.add((0, 4), throughput=30.0),
        await live_swarm.add((8, 12), state=RecordState.JOINING),
    ]
    await live_swarm.converge()
    return nodes


async def run_cli(*argv: str) -> int:
    """The real entry point, in a thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(main, list(argv))


@pytest.mark.slow
async def test_survey_reports_servers_rtts_and_coverage(live_swarm):
    nodes = await four_servers(live_swarm)
    async with ConnectionPool(Security.insecure()) as pool:
        snapshot = await survey(pool, [nodes[1].address])
    assert snapshot.source == nodes[1].address
    assert {s.record.peer_id for s in snapshot.servers} == {n.node.peer_id for n in nodes}
    assert all(s.rtt is not None and 0 < s.rtt < 1.0 for s in snapshot.servers)
    (model,) = snapshot.models
    # Joining servers serve nothing yet: blocks 8-11 count as uncovered.
    assert model.num_blocks == 12
    assert model.servers == (2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
    assert model.throughput[:5] == (50.0, 50.0, 50.0, 50.0, 20.0)
    warnings = snapshot.warnings()
    assert any("blocks 8-11 uncovered" in w for w in warnings)
    assert any("blocks 4-7 thin" in w for w in warnings)
    assert any(f"{nodes[3].node.peer_id[:8]} is still joining" in w for w in warnings)
    assert len(warnings) == 3


@pytest.mark.slow
async def test_cli_prints_the_table_and_json(live_swarm, capsys):
    nodes = await four_servers(live_swarm)
    assert await run_cli("swarm", "--peers", nodes[0].address, "--insecure") == 0
    text = capsys.readouterr().out
    for n in nodes:
        assert n.node.peer_id[:8] in text and n.address in text
    assert "coverage of test/llama-12 (12 blocks" in text
    assert "joining" in text and " ms" in text
    assert "! test/llama-12: blocks 8-11 uncovered" in text

    assert await run_cli("swarm", "--peers", nodes[0].address, "--insecure", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["servers"]) == 4
    assert report["models"][0]["servers"] == [2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0]
    assert report["models"][0]["uncovered"] == [[8, 12]]
    assert all(s["rtt_s"] > 0 for s in report["servers"])


@pytest.mark.slow
async def test_first_peer_down_the_next_one_answers(live_swarm):
    nodes = await four_servers(live_swarm)
    async with ConnectionPool(Security.insecure()) as pool:
        snapshot = await survey(pool, ["127.0.0.1:1", nodes[2].address], timeout=2.0)
    assert snapshot.source == nodes[2].address


async def test_no_peer_answering_is_a_typed_error(capsys):
    async with ConnectionPool(Security.insecure()) as pool:
        with pytest.raises(ConnectionBrokenError) as caught:
            await survey(pool, ["127.0.0.1:1", "127.0.0.1:2"], timeout=2.0)
    assert set(caught.value.details["failures"]) == {"127.0.0.1:1", "127.0.0.1:2"}
    assert await run_cli("swarm", "--peers", "127.0.0.1:1", "--insecure") == 2
    assert "ConnectionBrokenError: no peer answered" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--peers", "nonsense", "--insecure"],
        ["--peers", ",", "--insecure"],
        ["--peers", "127.0.0.1:5", "--insecure", "--timeout", "0"],
        ["--peers", "127.0.0.1:5"],
        ["--peers", "127.0.0.1:5", "--insecure", "--identity", "somewhere"],
    ],
)
async def test_bad_options_are_config_errors(argv, capsys):
    assert await run_cli("swarm", *argv) == 2
    assert "ConfigError" in capsys.readouterr().err


@pytest.mark.slow
async def test_dead_server_still_in_view_shows_as_unreachable(live_swarm):
    nodes = await four_servers(live_swarm)
    nodes[1].kill()
    async with ConnectionPool(Security.insecure()) as pool:
        snapshot = await survey(pool, [nodes[0].address], timeout=1.0)
    # The others have not declared it dead yet; the ping from here tells.
    by_id = {s.record.peer_id: s for s in snapshot.servers}
    assert by_id[nodes[1].node.peer_id].rtt is None
    assert any("did not answer a ping" in w for w in snapshot.warnings())


async def test_forged_records_from_a_relay_are_dropped_and_counted(nursery, live_swarm):
    (honest,) = [await live_swarm.add((0, 12))]
    async with ConnectionPool(Security.insecure()) as pool:
        good = (await (await pool.get(honest.address)).call("swarm.view", {})).meta["records"]
    payload, signature = good[0]
    forged = [payload.replace(b"test/llama-12", b"test/llama-99"), signature]

    async def view(context, message):
        return Message({"records": [*good, forged, "junk"]})

    router = Router()
    router.unary("swarm.view", view)
    security = Security.insecure()
    host, port = await nursery.start(
        lambda task_status: serve(
            router, host="127.0.0.1", port=0, security=security, task_status=task_status
        )
    )
    async with ConnectionPool(Security.insecure()) as pool:
        snapshot = await survey(pool, [f"{host}:{port}"])
    assert [s.record.peer_id for s in snapshot.servers] == [honest.node.peer_id]
    assert snapshot.rejected == {"bad_signature": 1, "malformed": 1}
    assert any(
        "2 record(s) failed verification and were dropped (bad_signature: 1, malformed: 1)" in w
        for w in snapshot.warnings()
    )


async def test_tls_swarm_needs_an_identity_of_its_ca(nursery, swarm_ca, tmp_path, capsys):
    swarm = LiveSwarm(nursery, lambda i: Security.tls(swarm_ca.issue(f"server-{i}")))
    node = await swarm.add((0, 12))
    swarm_ca.issue("operator").save(tmp_path / "operator")
    argv = ["swarm", "--peers", node.address, "--identity", str(tmp_path / "operator")]
    assert await run_cli(*argv) == 0
    assert node.node.peer_id[:8] in capsys.readouterr().out
    # Plaintext against a TLS swarm is refused, with a typed error.
    assert await run_cli("swarm", "--peers", node.address, "--insecure", "--timeout", "2") == 2
    assert "ConnectionBrokenError" in capsys.readouterr().err


def test_coverage_uses_the_known_model_size():
    record = make_record((2, 5))
    (model,) = coverage([record], {MODEL: 8})
    assert model.servers == (0, 0, 1, 1, 1, 0, 0, 0) and model.size_from == "info"
    assert model.ranges(lambda n: n == 0) == [(0, 2), (5, 8)]
    (announced,) = coverage([dataclasses.replace(record, num_blocks=6)])
    assert (announced.num_blocks, announced.size_from) == (6, "records")
    (guessed,) = coverage([record])
    assert (guessed.num_blocks, guessed.size_from) == (5, "spans")
    # A span end no model has (a forged or broken record) is refused outright:
    # coverage is kept per block.
    with pytest.raises(RecordError):
        dataclasses.replace(record, span=(0, 10**12))
    (largest,) = coverage([dataclasses.replace(record, span=(0, MAX_BLOCKS))])
    assert largest.num_blocks == MAX_BLOCKS


async def test_peers_with_a_malformed_or_no_view_are_skipped(nursery, live_swarm):
    honest = await live_swarm.add((0, 12))

    async def malformed(context, message):
        return Message({"records": "not a list"})

    async def silent(context, message):
        await trio.sleep_forever()

    addresses = []
    for handler in (malformed, silent):
        router = Router()
        router.unary("swarm.view", handler)
        host, port = await nursery.start(
            lambda task_status, router=router: serve(
                router, host="127.0.0.1", port=0, security=Security.insecure(),
                task_status=task_status,
            )
        )  # fmt: skip
        addresses.append(f"{host}:{port}")
    async with ConnectionPool(Security.insecure()) as pool:
        with trio.fail_after(30):
            snapshot = await survey(pool, [*addresses, honest.address], timeout=1.0)
        assert snapshot.source == honest.address
        with pytest.raises(ConnectionBrokenError) as caught:
            await survey(pool, addresses, timeout=1.0)
    failures = caught.value.details["failures"]
    assert "list of signed records" in failures[addresses[0]]
    assert set(failures) == set(addresses)


async def test_forged_span_past_the_models_last_block_is_dropped_and_counted(live_swarm):
    # The relay is a gossip-only node that knows no model size, so it keeps
    # the record; the survey learns the size from `info` and drops it.
    honest = await live_swarm.add((0, 12), num_blocks=0, info_blocks=12)
    forger = Identity.generate()
    forged = make_record(
        (0, 40),
        peer_id=forger.peer_id,
        public_key=forger.public_key_bytes,
        timestamp=time.time(),
    )
    assert honest.node.on_alive(sign_record(forged, forger).to_wire()) == forger.peer_id
    async with ConnectionPool(Security.insecure()) as pool:
        snapshot = await survey(pool, [honest.address], timeout=2.0)
    assert [s.record.peer_id for s in snapshot.servers] == [honest.node.peer_id]
    assert snapshot.rejected == {"num_blocks": 1}
    (model,) = snapshot.models
    assert (model.num_blocks, model.size_from) == (12, "info")


def snapshot_of(*records: ServerRecord, rtt: float | None = 0.001, **sizes) -> SwarmSnapshot:
    return SwarmSnapshot(
        source="127.0.0.1:1",
        taken_at=1.0,
        servers=tuple(ServerStatus(r, rtt) for r in records),
        models=tuple(coverage(records, sizes.get("num_blocks"))),
    )


def test_a_fully_known_swarm_with_failover_has_no_warnings():
    snapshot = snapshot_of(make_record((0, 8)), make_record((0, 8)), num_blocks={MODEL: 8})
    assert snapshot.warnings() == []
    assert "no warnings: every block has a second online server" in render(snapshot)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # Servers announce nothing yet: nothing to count coverage of.
        ([(0, 0), (0, 0)], "coverage unknown: no server announces a block yet"),
        # No `info`, no announced count: blocks past 8 cannot be judged.
        ([(0, 8), (0, 8)], "block count unknown"),
        ([(0, 8), (4, 8)], "blocks 0-3 thin"),
    ],
)
def test_what_could_not_be_determined_is_a_warning(records, expected):
    snapshot = snapshot_of(*(make_record(span) for span in records))
    assert any(expected in w for w in snapshot.warnings()), snapshot.warnings()
    text = render(snapshot)
    assert "no warnings" not in text and expected in text


def test_mixed_models_versions_and_joining_servers_are_warned_of():
    snapshot = snapshot_of(
        make_record((0, 12), num_blocks=12, version="0.1.0"),
        make_record((0, 12), num_blocks=12, version="0.2.0"),
        make_record((0, 12), num_blocks=12, version="0.2.0", model_id="other/model"),
        make_record((0, 12), num_blocks=12, version="0.2.0", state=RecordState.JOINING),
    )
    warnings = snapshot.warnings()
    assert f"servers announce 2 different models: other/model (1), {MODEL} (3)" in "\n".join(
        warnings
    )
    assert any("2 different versions: 0.1.0 (1), 0.2.0 (3)" in w for w in warnings)
    assert sum("is still joining" in w for w in warnings) == 1
    assert any("other/model: blocks 0-11 thin" in w for w in warnings)


def test_unreachable_servers_and_an_empty_view_are_warned_of():
    unreachable = snapshot_of(make_record((0, 8)), make_record((0, 8)), rtt=None)
    assert sum("did not answer a ping" in w for w in unreachable.warnings()) == 2
    assert snapshot_of().warnings() == ["the view lists no server: nothing to check"]
    all_dropped = dataclasses.replace(snapshot_of(), rejected={"expired": 2})
    assert all_dropped.warnings() == [
        "the view lists no server: nothing to check",
        "2 record(s) failed verification and were dropped (expired: 2)",
    ]
