"""What the client knows about the swarm: servers, their RTTs, their bans.

Theory of operation. The user gives a few peer addresses. ``refresh``
asks each for ``info`` (the server at that very address) and for
``swarm.view`` (every server its gossip knows, as records signed by their
owners, each checked with ``verified_records``). A peer without gossip
answers ``swarm.view`` with an error and is still learned from ``info``.
Where a server appears both ways, the address the user gave wins: it may
be the only path to it (a proxy, a tunnel). Only servers of our model,
speaking our protocol, in a dtype we accept and ``online`` are routable.

A server's record also says what its SWIM probes measured to its nearest
peers (``peer_rtt_us``); a client that forwards steps server to server
prices the hop between two servers with it (``_routing.py``), and sends
each push to the address the next server announces (``push_address``),
where its peers measured it, rather than to the address this client
reaches it at (a proxy, a tunnel of its own).

RTTs come from ``ping`` calls, smoothed by an EMA; a server never measured
counts as ``DEFAULT_RTT``, pessimistic on purpose so that a measured server
wins ties. A server that fails is banned for a time that doubles with each
failure in a row (``BAN_BASE`` .. ``BAN_MAX``).

A ban running out does not make the server routable: it is then on
probation until it answers a probe (``ping``, or ``info`` from a refresh).
A server that hangs (stopped process, wedged GPU: the connection stays
open, nothing answers) costs a whole ``step_timeout`` each time a route
picks it, so picking it again on the word of a clock alone would pay that
again at every ban's end; a probe costs a ping's timeout, paid in a refresh
rather than in a step. The probes are those of every refresh: the periodic
one (``Client``'s ``refresh_interval``) and the one ``SwarmContext.plan``
runs when no route exists, so a server on probation comes back within a
refresh interval where others cover its blocks, and at once (one ping)
where nothing else does. Silence bans it again, for twice as long. An
answer to a probe only ends the probation: its failures in a row keep
counting (a server whose event loop answers pings while its GPU is wedged
would otherwise be forgiven at every probe, and cost a step timeout at
every ban of a second), until it serves work (``answered``: a step, a session, a bulk
call), which forgives them.

State changes are plain methods (``observe_rtt``, ``ban``, ``merge_*``) so
tests drive them without sockets; ``refresh`` and ``probe`` do the I/O.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from ..errors import ConnectionBrokenError, LibpipeError
from ..net import Connection, ConnectionPool
from ..swarm import RecordState, ServerRecord, peer_rtt, verified_records
from ..wire import PROTOCOL_VERSION

logger = logging.getLogger("libpipe.client")

# A server never pinged costs this much per hop in routing. Above a typical
# continental WAN RTT (30-80 ms), so any measured server is preferred.
DEFAULT_RTT = 0.1
# Weight of a new RTT sample: about the last five samples matter.
RTT_EMA_ALPHA = 0.3
# Bans: 1 s after the first failure, doubling, at most a minute.
BAN_BASE = 1.0
BAN_MAX = 60.0
# The dtypes a server computes in that our blocks implement.
KNOWN_DTYPES = ("float32", "bfloat16", "float16")
_ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ServerEntry:
    """One server as the client sees it (from ``info`` or a gossip record)."""

    peer_id: str
    address: str
    span: tuple[int, int]
    dtype: str
    state: str
    throughput_decode: float  # single-token steps/s over the whole span; 0: unknown
    throughput_forward: float  # tokens/s of bulk forward over the whole span; 0: unknown
    free_cache_bytes: int
    cache_bytes_per_token: int  # over the whole span, one sequence
    max_length: int | None = None  # None: not announced (gossip records)
    pinned: bool = False  # dial with expected_peer_id (learned from a signed record)
    # From its signed record, when we hold one: the addresses it announces
    # to its peers, and its round trips to them ((peer id prefix, microseconds) pairs).
    announced: tuple[str, ...] = ()
    peer_rtt_us: tuple[tuple[str, int], ...] = ()

    @property
    def blocks(self) -> int:
        return self.span[1] - self.span[0]

    @property
    def push_address(self) -> str:
        """Where a previous hop should push this server's input: the address
        its gossip peers reach it at when it has peers (its record lists
        round trips to them, and servers with a view push only to addresses
        in records), else the one we reach it at."""
        if self.peer_rtt_us and self.announced and self.address not in self.announced:
            return self.announced[0]
        return self.address

    def rtt_to(self, peer_id: str) -> float | None:
        """Seconds this server's probes measured to ``peer_id``, if it said."""
        return peer_rtt(self.peer_rtt_us, peer_id)


@dataclass
class _Ban:
    failures: int
    until: float
    reason: str
    # Whether a probe answered since ``until`` (the probation is over).
    probed: bool = False


class SwarmView:
    """The client's view of one model's servers (see the module docstring)."""

    def __init__(
        self,
        *,
        model_id: str,
        num_blocks: int,
        kv_values_per_token_block: int,
        dtypes: Collection[str] = KNOWN_DTYPES,
        record_ttl: float = 360.0,
        max_clock_skew: float = 60.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.dtypes = frozenset(dtypes)
        # 2 x kv heads x head dim: cache elements one token costs in one block.
        self._kv_values = kv_values_per_token_block
        self._record_ttl = record_ttl
        self._max_skew = max_clock_skew
        self._clock = clock
        self.servers: dict[str, ServerEntry] = {}
        self.rtt: dict[str, float] = {}
        self._bans: dict[str, _Ban] = {}
        # When each server was last described to us (info or a record).
        self._seen: dict[str, float] = {}
        # Why servers were left out at the last refresh (shown by NoRouteError).
        self.skipped: Counter[str] = Counter()

    # --- pure state changes ------------------------------------------------------

    def merge_info(self, address: str, meta: dict[str, Any]) -> ServerEntry | None:
        """Learn the server at ``address`` from its ``info`` reply; None if it
        is not usable by us (another model, protocol or dtype)."""
        try:
            entry = ServerEntry(
                peer_id=_str(meta, "peer_id"),
                address=address,
                span=_span(meta.get("span")),
                dtype=_str(meta, "dtype"),
                state=_str(meta, "state"),
                throughput_decode=_number(meta, "throughput_decode"),
                throughput_forward=_number(meta, "throughput_forward"),
                free_cache_bytes=_int(meta, "cache_bytes_free"),
                cache_bytes_per_token=_int(meta, "cache_bytes_per_token"),
                max_length=_int(meta, "max_length"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            self.skipped["malformed info"] += 1
            logger.warning("server at %s sent a malformed info reply: %s", address, exc)
            return None
        if meta.get("protocol") != PROTOCOL_VERSION:
            self.skipped["protocol"] += 1
            return None
        if meta.get("model_id") != self.model_id or meta.get("num_blocks") != self.num_blocks:
            self.skipped["model"] += 1
            return None
        known = self.servers.get(entry.peer_id)
        if known is not None:
            # What only its record says stays until the next record replaces it.
            entry = replace(entry, announced=known.announced, peer_rtt_us=known.peer_rtt_us)
        return self._admit(entry)

    def merge_records(self, wires: Any, *, wall_clock: float | None = None) -> int:
        """Learn servers from a ``swarm.view`` reply's ``records``; returns how
        many were admitted. Servers already learned from ``info`` keep the
        address we reached them at."""
        now = time.time() if wall_clock is None else wall_clock
        rejected: Counter[str] = Counter()
        signed = verified_records(
            wires, now=now, ttl=self._record_ttl, max_skew=self._max_skew, rejected=rejected
        )
        for reason, count in rejected.items():
            self.skipped[f"record {reason}"] += count
        admitted = 0
        for record in (s.record for s in signed):
            entry = self._from_record(record)
            if entry is None:
                continue
            known = self.servers.get(record.peer_id)
            if known is not None and not known.pinned:
                # Keep the user's address and the richer info fields.
                entry = replace(
                    entry,
                    address=known.address,
                    pinned=False,
                    max_length=known.max_length,
                    cache_bytes_per_token=known.cache_bytes_per_token,
                )
            admitted += self._admit(entry) is not None
        return admitted

    def _from_record(self, record: ServerRecord) -> ServerEntry | None:
        if record.model_id != self.model_id:
            self.skipped["model"] += 1
            return None
        if record.dtype not in _ELEMENT_SIZE:
            self.skipped["dtype"] += 1
            return None
        start, end = record.span
        return ServerEntry(
            peer_id=record.peer_id,
            address=record.addresses[0],
            span=(start, end),
            dtype=record.dtype,
            state=record.state.value,
            throughput_decode=float(record.throughput_decode),
            throughput_forward=float(record.throughput_forward),
            free_cache_bytes=record.free_cache_bytes,
            cache_bytes_per_token=(end - start) * self._kv_values * _ELEMENT_SIZE[record.dtype],
            pinned=True,
            announced=record.addresses,
            peer_rtt_us=record.peer_rtt_us,
        )

    def _admit(self, entry: ServerEntry) -> ServerEntry | None:
        start, end = entry.span
        if not 0 <= start <= end <= self.num_blocks:
            self.skipped["span"] += 1
            return None
        if entry.dtype not in self.dtypes:
            self.skipped["dtype"] += 1
            return None
        self.servers[entry.peer_id] = entry
        self._seen[entry.peer_id] = self._clock()
        return entry

    def forget_stale(self) -> list[str]:
        """Drop servers nobody has described for a record's lifetime (they
        left the swarm or their peers forgot them); returns their ids."""
        horizon = self._clock() - self._record_ttl
        stale = [p for p, seen in self._seen.items() if seen < horizon]
        for peer_id in stale:
            for table in (self.servers, self.rtt, self._bans, self._seen):
                table.pop(peer_id, None)
        return stale

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        old = self.rtt.get(peer_id)
        self.rtt[peer_id] = seconds if old is None else old + RTT_EMA_ALPHA * (seconds - old)

    def rtt_of(self, peer_id: str) -> float:
        return self.rtt.get(peer_id, DEFAULT_RTT)

    def ban(self, peer_id: str, reason: str) -> float:
        """Ban ``peer_id`` after a failure; returns the ban's length in seconds."""
        previous = self._bans.get(peer_id)
        failures = 1 if previous is None else previous.failures + 1
        length = min(BAN_BASE * 2 ** (failures - 1), BAN_MAX)
        self._bans[peer_id] = _Ban(failures, self._clock() + length, reason)
        logger.info("banned %s for %.1f s: %s", peer_id[:12], length, reason)
        return length

    def answered(self, peer_id: str) -> None:
        """The server served work: whatever it failed before is forgiven."""
        self._bans.pop(peer_id, None)

    def probed(self, peer_id: str) -> None:
        """The server answered a probe: routable again once its ban is over,
        its failures in a row still counted (see the module docstring)."""
        ban = self._bans.get(peer_id)
        if ban is not None and ban.until <= self._clock():
            ban.probed = True

    def is_banned(self, peer_id: str) -> bool:
        """Whether ``peer_id``'s ban is still running (no probe asks it)."""
        ban = self._bans.get(peer_id)
        return ban is not None and ban.until > self._clock()

    def on_probation(self, peer_id: str) -> bool:
        """Whether ``peer_id``'s ban is over but no probe has answered since."""
        ban = self._bans.get(peer_id)
        return ban is not None and ban.until <= self._clock() and not ban.probed

    def ban_reason(self, peer_id: str) -> str | None:
        ban = self._bans.get(peer_id)
        return None if ban is None else ban.reason

    def note_cache_full(self, peer_id: str, free: int) -> None:
        """A server refused a session for lack of cache: believe it until it
        tells us otherwise (next refresh)."""
        entry = self.servers.get(peer_id)
        if entry is not None:
            self.servers[peer_id] = replace(entry, free_cache_bytes=max(0, free))

    def routable(self, *, max_length: int | None = None) -> list[ServerEntry]:
        """Servers a route may use now (neither banned nor on probation),
        ordered by peer id."""
        return [
            e
            for _, e in sorted(self.servers.items())
            if e.state == RecordState.ONLINE.value
            and e.blocks > 0
            and not self.is_banned(e.peer_id)
            and not self.on_probation(e.peer_id)
            and (max_length is None or e.max_length is None or max_length <= e.max_length)
        ]

    # --- I/O -----------------------------------------------------------------------

    async def connect(self, pool: ConnectionPool, entry: ServerEntry) -> Connection:
        return await pool.get(entry.address, entry.peer_id if entry.pinned else None)

    async def refresh(self, pool: ConnectionPool, peers: Sequence[str], timeout: float) -> None:
        """Ask every given peer for ``info`` and ``swarm.view``, then probe
        every server learned. Unreachable peers are logged and skipped."""
        self.skipped.clear()
        async with trio.open_nursery() as nursery:
            for address in peers:
                nursery.start_soon(self._ask_peer, pool, address, timeout)
        self.forget_stale()
        await self.probe_all(pool, timeout)

    async def _ask_peer(self, pool: ConnectionPool, address: str, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                connection = await pool.get(address)
                info = await connection.call("info", timeout=timeout)
        except (LibpipeError, OSError, trio.TooSlowError) as exc:
            self.skipped["unreachable"] += 1
            logger.info("peer %s did not answer info: %s", address, exc)
            return
        entry = self.merge_info(address, info.meta)
        if entry is not None:
            self.probed(entry.peer_id)
        try:
            view = await connection.call("swarm.view", timeout=timeout)
        except LibpipeError as exc:
            # No gossip there (or not yet): info alone has to do.
            logger.debug("peer %s serves no swarm.view: %s", address, exc)
            return
        try:
            self.merge_records(view.meta.get("records"))
        except LibpipeError as exc:
            logger.warning("peer %s sent an unusable swarm.view: %s", address, exc)

    async def probe_all(self, pool: ConnectionPool, timeout: float) -> None:
        """Ping every known online server whose ban (if any) is over, those
        on probation included (their way back). A joining server (gossiped
        while it loads its blocks) serves no RPC yet: pinging it would only
        ban it; it is pinged once online."""
        async with trio.open_nursery() as nursery:
            for entry in list(self.servers.values()):
                if entry.state == RecordState.ONLINE.value and not self.is_banned(entry.peer_id):
                    nursery.start_soon(self.probe, pool, entry, timeout)

    async def probe(self, pool: ConnectionPool, entry: ServerEntry, timeout: float) -> bool:
        """One ``ping``: an answer updates the RTT and ends a probation;
        silence bans the server (again)."""
        try:
            with trio.fail_after(timeout):
                connection = await self.connect(pool, entry)
                began = trio.current_time()
                await connection.call("ping")
                self.observe_rtt(entry.peer_id, trio.current_time() - began)
        except (LibpipeError, OSError, trio.TooSlowError) as exc:
            self.ban(entry.peer_id, f"ping failed: {exc or type(exc).__name__}")
            return False
        self.probed(entry.peer_id)
        return True

    def describe(self, peer_ids: Iterable[str]) -> str:
        return ", ".join(
            f"{p[:12]}@{self.servers[p].address}" for p in peer_ids if p in self.servers
        )


def _str(meta: dict[str, Any], key: str) -> str:
    value = meta[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _int(meta: dict[str, Any], key: str) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0")
    return value


def _number(meta: dict[str, Any], key: str) -> float:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number")
    return max(0.0, float(value))


def _span(value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in value)
    ):
        raise ValueError("span must be [start, end]")
    return int(value[0]), int(value[1])


def broken(exc: BaseException) -> LibpipeError:
    """Any failure of a hop as a ``LibpipeError`` (for messages and bans)."""
    if isinstance(exc, LibpipeError):
        return exc
    return ConnectionBrokenError(f"{type(exc).__name__}: {exc}")
