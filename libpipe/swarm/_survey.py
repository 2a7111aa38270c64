"""A swarm as one node sees it, for people: servers, RTTs, coverage, warnings.

``survey`` asks the first peer that answers for its ``swarm.view``, checks
every record against its owner's key (the peer relays records, it cannot
vouch for them), then times a ``swarm.ping`` to each server from here,
pinned to the peer id its record claims, so an address now answered by
someone else shows as unreachable rather than as that server. Coverage
counts ONLINE servers only: joining ones serve nothing yet and draining
ones take no new sessions. ``libpipe swarm`` prints a ``SwarmSnapshot``;
the monitor page polls one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import ConnectionBrokenError, LibpipeError, RecordError
from ..net import ConnectionPool, short_peer_id
from ._config import GossipConfig
from ._record import (
    MAX_BLOCKS,
    RecordState,
    ServerRecord,
    check_model_size,
    verified_records,
)

# Records are checked against the most patient preset's lifetime: the node
# that answered already dropped what its own (possibly shorter) TTL expired.
SURVEY_TTL = GossipConfig.wan().record_ttl
SURVEY_SKEW = GossipConfig.lan().max_clock_skew
# RTT is the best of a few pings after one that may pay for connecting.
RTT_PINGS = 3
# Servers of one model asked for its block count before falling back to spans.
INFO_TRIES = 3
# Below this many servers a block is "thin": one failure leaves it uncovered.
THIN_SERVERS = 2


@dataclass(frozen=True)
class ServerStatus:
    """One server's record and its round trip from here (None: no answer)."""

    record: ServerRecord
    rtt: float | None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "peer_id": r.peer_id,
            "short_id": short_peer_id(r.peer_id),
            "address": r.addresses[0],
            "model_id": r.model_id,
            "span": list(r.span),
            "state": r.state.value,
            "dtype": r.dtype,
            "version": r.version,
            "throughput_decode": r.throughput_decode,
            "throughput_forward": r.throughput_forward,
            "free_cache_bytes": r.free_cache_bytes,
            "active_sessions": r.active_sessions,
            "rtt_s": self.rtt,
        }


@dataclass(frozen=True)
class ModelCoverage:
    """Per block of one model: online servers and their summed decode steps/s.

    ``size_from`` says how ``num_blocks`` is known: ``info`` (a server's
    ``info`` reply), ``records`` (the count the records announce) or
    ``spans`` (neither: the highest span end seen, so blocks past it may
    exist and be uncovered, and nothing here can tell)."""

    model_id: str
    num_blocks: int
    servers: tuple[int, ...]
    throughput: tuple[float, ...]
    size_from: str = "info"

    def ranges(self, predicate: Callable[[int], bool]) -> list[tuple[int, int]]:
        """Maximal half-open block ranges whose server count satisfies ``predicate``."""
        return block_ranges(b for b, n in enumerate(self.servers) if predicate(n))

    def uncovered(self) -> set[int]:
        """Blocks no online server holds."""
        return {b for b, n in enumerate(self.servers) if n == 0}

    def warnings(self) -> list[str]:
        warnings = []
        if self.num_blocks == 0:
            warnings.append(
                f"{self.model_id}: coverage unknown: no server announces a block yet "
                "and none answered `info` with the model's size"
            )
        elif self.size_from == "spans":
            warnings.append(
                f"{self.model_id}: block count unknown (no server answered `info`, and the "
                f"records announce no single count): coverage is shown up to block "
                f"{self.num_blocks - 1} only; later blocks may exist with no server"
            )
        warnings += [
            f"{self.model_id}: blocks {format_blocks(r)} uncovered: no online server holds them"
            for r in self.ranges(lambda n: n == 0)
        ]
        warnings += [
            f"{self.model_id}: blocks {format_blocks(r)} thin: one online server, no failover"
            for r in self.ranges(lambda n: 0 < n < THIN_SERVERS)
        ]
        return warnings

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_blocks": self.num_blocks,
            "size_from": self.size_from,
            "servers": list(self.servers),
            "throughput_decode": list(self.throughput),
            "uncovered": [list(r) for r in self.ranges(lambda n: n == 0)],
            "thin": [list(r) for r in self.ranges(lambda n: 0 < n < THIN_SERVERS)],
        }


@dataclass(frozen=True)
class SwarmSnapshot:
    """What ``survey`` saw: from which peer, when (Unix time), and what."""

    source: str
    taken_at: float
    servers: tuple[ServerStatus, ...]
    models: tuple[ModelCoverage, ...]
    rejected: dict[str, int] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        """Everything an operator should act on, and everything this look
        could not determine; empty only when every model is fully known and
        every block has a second server."""
        records = [s.record for s in self.servers]
        warnings = [] if records else ["the view lists no server: nothing to check"]
        warnings += [w for m in self.models for w in m.warnings()]
        warnings += _mixed(
            "model", [r.model_id for r in records], "a client uses only its model's servers"
        )
        warnings += _mixed(
            "version", [r.version or "?" for r in records], "an upgrade is under way, or forgotten"
        )
        warnings += [
            f"server {short_peer_id(r.peer_id)} is still joining (loading blocks "
            f"{r.span[0]}:{r.span[1]}): not counted in coverage until online"
            for r in records
            if r.state is RecordState.JOINING
        ]
        warnings += [
            f"server {short_peer_id(s.record.peer_id)} at {s.record.addresses[0]} "
            "did not answer a ping from here"
            for s in self.servers
            if s.rtt is None
        ]
        if self.rejected:
            total = sum(self.rejected.values())
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items()))
            warnings.append(f"{total} record(s) failed verification and were dropped ({reasons})")
        return warnings

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "taken_at": self.taken_at,
            "servers": [s.to_json() for s in self.servers],
            "models": [m.to_json() for m in self.models],
            "rejected": dict(self.rejected),
            "warnings": self.warnings(),
        }


def coverage(
    records: Sequence[ServerRecord], num_blocks: dict[str, int] | None = None
) -> list[ModelCoverage]:
    """Coverage per model. A model's block count is taken from ``num_blocks``
    (servers' ``info``) when known, else from what its records announce when
    they agree, else the highest span end seen (``size_from`` says which)."""
    known = num_blocks or {}
    models = sorted({r.model_id for r in records})
    result = []
    for model_id in models:
        own = [r for r in records if r.model_id == model_id]
        announced = {r.num_blocks for r in own if r.num_blocks}
        if model_id in known:
            n, size_from = known[model_id], "info"
        elif len(announced) == 1:
            n, size_from = announced.pop(), "records"
        else:
            n, size_from = max(r.span[1] for r in own), "spans"
        servers = [0] * n
        throughput = [0.0] * n
        for r in own:
            if r.state is not RecordState.ONLINE:
                continue
            for b in range(r.span[0], min(r.span[1], n)):
                servers[b] += 1
                throughput[b] += r.throughput_decode
        result.append(ModelCoverage(model_id, n, tuple(servers), tuple(throughput), size_from))
    return result


def block_ranges(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal half-open ranges of ``blocks``: ``{0, 1, 2, 7}`` -> ``[(0, 3), (7, 8)]``."""
    found: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if found and found[-1][1] == b:
            found[-1] = (found[-1][0], b + 1)
        else:
            found.append((b, b + 1))
    return found


def format_blocks(r: tuple[int, int]) -> str:
    """A half-open block range as people count blocks: ``(4, 8)`` -> ``"4-7"``."""
    return f"{r[0]}" if r[1] - r[0] == 1 else f"{r[0]}-{r[1] - 1}"


def _mixed(what: str, values: Sequence[str], why: str) -> list[str]:
    counts = Counter(values)
    if len(counts) < 2:
        return []
    listed = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items()))
    return [f"servers announce {len(counts)} different {what}s: {listed}; {why}"]


async def fetch_view(
    pool: ConnectionPool,
    peers: Sequence[str],
    *,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
    rejected: Counter[str] | None = None,
) -> tuple[str, list[ServerRecord]]:
    """``(peer, records)``: the verified view of the first of ``peers`` that answers.

    Raises ``ConnectionBrokenError`` naming every peer when none answers."""
    failures: dict[str, str] = {}
    for peer in peers:
        try:
            with trio.fail_after(timeout):
                connection = await pool.get(peer)
                reply = await connection.call("swarm.view", {}, timeout=timeout)
            signed = verified_records(
                reply.meta.get("records"),
                now=clock(),
                ttl=SURVEY_TTL,
                max_skew=SURVEY_SKEW,
                rejected=rejected,
            )
        except (LibpipeError, trio.TooSlowError) as exc:
            failures[peer] = str(exc) or type(exc).__name__
            continue
        return peer, [s.record for s in signed]
    raise ConnectionBrokenError(
        "no peer answered with a swarm view", peers=list(peers), failures=failures
    )


async def survey(
    pool: ConnectionPool,
    peers: Sequence[str],
    *,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> SwarmSnapshot:
    """Ask the first of ``peers`` that answers for the view, then ping every server.

    Raises ``ConnectionBrokenError`` naming every peer when none answers."""
    rejected: Counter[str] = Counter()
    source, records = await fetch_view(pool, peers, timeout=timeout, clock=clock, rejected=rejected)
    rtts = await _ping_all(pool, records, timeout)
    num_blocks = await _model_sizes(pool, records, timeout)
    records = _fitting(records, num_blocks, rejected)
    return SwarmSnapshot(
        source=source,
        taken_at=clock(),
        servers=tuple(ServerStatus(r, rtts.get(r.peer_id)) for r in records),
        models=tuple(coverage(records, num_blocks)),
        rejected=dict(rejected),
    )


def _fitting(
    records: Sequence[ServerRecord], num_blocks: dict[str, int], rejected: Counter[str]
) -> list[ServerRecord]:
    """The records whose span fits their model as its servers' ``info`` sizes
    it; the rest are counted in ``rejected`` (a valid signature proves who
    claims a span, not that the span exists)."""
    fitting = []
    for record in records:
        try:
            check_model_size(record, record.model_id, num_blocks.get(record.model_id, 0))
        except RecordError as exc:
            rejected[exc.details["reason"]] += 1
            continue
        fitting.append(record)
    return fitting


async def _ping_all(
    pool: ConnectionPool, records: Sequence[ServerRecord], timeout: float
) -> dict[str, float]:
    rtts: dict[str, float] = {}

    async def one(record: ServerRecord) -> None:
        rtt = await _rtt(pool, record, timeout)
        if rtt is not None:
            rtts[record.peer_id] = rtt

    async with trio.open_nursery() as nursery:
        for record in records:
            nursery.start_soon(one, record)
    return rtts


async def _rtt(pool: ConnectionPool, record: ServerRecord, timeout: float) -> float | None:
    """Best of a few ``swarm.ping`` round trips; None when the server (as its
    record names it) does not answer."""
    samples = []
    with trio.move_on_after(timeout):
        try:
            connection = await pool.get(record.addresses[0], expected_peer_id=record.peer_id)
            for _ in range(RTT_PINGS + 1):
                start = time.perf_counter()
                reply = await connection.call("swarm.ping", {"target": record.peer_id})
                if reply.meta.get("ack") is not True:
                    return None
                samples.append(time.perf_counter() - start)
        except LibpipeError:
            return None
    # The first sample may include a lazy handshake; keep it only if it is all we have.
    return min(samples[1:]) if len(samples) > 1 else (samples[0] if samples else None)


async def _model_sizes(
    pool: ConnectionPool, records: Sequence[ServerRecord], timeout: float
) -> dict[str, int]:
    """Blocks per model from one online server's ``info`` (gossip-only nodes
    have no ``info``: their models are sized from the spans seen). Models are
    asked at once: one whose servers do not answer costs its own timeouts,
    not every other model's."""
    candidates: dict[str, list[ServerRecord]] = {}
    for record in records:
        if record.state is RecordState.ONLINE:
            candidates.setdefault(record.model_id, []).append(record)
    sizes: dict[str, int] = {}

    async def size_of(model_id: str, servers: list[ServerRecord]) -> None:
        for record in servers[:INFO_TRIES]:
            n = await _num_blocks(pool, record, timeout)
            if n is not None:
                sizes[model_id] = n
                return

    async with trio.open_nursery() as nursery:
        for model_id, servers in candidates.items():
            nursery.start_soon(size_of, model_id, servers)
    return sizes


async def _num_blocks(pool: ConnectionPool, record: ServerRecord, timeout: float) -> int | None:
    """The model size a server's ``info`` reports, if it answers with a plausible one."""
    with trio.move_on_after(timeout):
        try:
            connection = await pool.get(record.addresses[0], expected_peer_id=record.peer_id)
            reply = await connection.call("info", {}, timeout=timeout)
        except LibpipeError:
            return None
        n = reply.meta.get("num_blocks")
        if isinstance(n, int) and not isinstance(n, bool) and max(record.span) <= n <= MAX_BLOCKS:
            return n
    return None
