"""The gossip service: one node's membership table and the loops that keep it.

Theory of operation. A node holds one ``Member`` per peer id (itself
included) and changes it only through three handlers, one per kind of
news, which apply the merge rules of _state.py:

* ``on_alive``: a member's own signed record (verified before belief);
* ``on_suspect``: someone failed to reach a member at some incarnation;
* ``on_dead``: someone declared a member dead (or the member left).

A handler that learns something new queues it in the broadcast queue, from
where it rides on pings, acks and gossip rounds to the rest of the swarm.
News about ourselves is never believed: it is refuted by re-signing our
record at a higher incarnation, or, when it names an incarnation already
refuted, by sending the same record again (the refutation missed its
sender). A ping to a member we suspect carries the suspicion, so the
suspect hears of it at once (Lifeguard's buddy system), and confirmations
count only for the incarnation suspected. Every acknowledged ping is
timed (``rtts``), and each re-signing of our record publishes the nearest
members' round trips in it. The scheduler is four loops
(probe, gossip, push-pull, record refresh) calling the plain round
functions of _probe.py, _gossip.py and _pushpull.py, plus one task per
open suspicion whose cancel scope deadline *is* the suspicion's deadline.

Two clocks: trio's (monotonic, virtual in tests) for every timer, and a
wall clock (``clock``, Unix seconds) only to stamp and age records, since
records are compared across machines.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from ..errors import (
    ConfigError,
    ConnectionBrokenError,
    ConnectionClosedError,
    InvalidRequestError,
    LibpipeError,
    RecordError,
)
from ._broadcast import BroadcastQueue
from ._config import GossipConfig
from ._gossip import gossip_round
from ._probe import ProbeOrder, probe_round
from ._pushpull import local_state, merge_state, push_pull_round
from ._record import (
    RecordState,
    ServerRecord,
    SignedRecord,
    Signer,
    check_model_size,
    decode_signed,
    is_expired,
    sign_record,
    verify_signed,
)
from ._rtt import PeerRtts
from ._state import Member, MemberState, refutation_incarnation
from ._suspicion import Suspicion
from ._transport import Transport

# Fields of our record the embedding server may change; the rest are the
# node's own (identity, incarnation, stamp).
UPDATABLE_FIELDS = frozenset(
    {
        "addresses",
        "model_id",
        "span",
        "dtype",
        "version",
        "throughput_decode",
        "throughput_forward",
        "free_cache_bytes",
        "active_sessions",
        "state",
    }
)


@dataclass
class GossipStats:
    """Counters for operators and tests."""

    # Records dropped, by RecordError reason (wrong_key, bad_signature, ...).
    records_rejected: Counter[str] = field(default_factory=Counter)
    # Gossip messages dropped for their shape.
    messages_rejected: int = 0
    refutations: int = 0
    suspicions: int = 0
    deaths_declared: int = 0


class GossipNode:
    """SWIM membership with signed server records, over any ``Transport``.

    Embed it in a server: start ``run`` in a nursery (``await
    nursery.start(node.run, peers)`` returns once the node has joined),
    keep its record current with ``update_local_record``, and answer
    clients from ``view()``. ``leave()`` announces a graceful exit.
    """

    def __init__(
        self,
        identity: Signer,
        transport: Transport,
        *,
        model_id: str = "",
        span: tuple[int, int] = (0, 0),
        num_blocks: int = 0,
        dtype: str = "float16",
        version: str = "",
        addresses: Sequence[str] | None = None,
        state: RecordState = RecordState.JOINING,
        config: GossipConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        # Cached: deriving it hashes the key, and it is compared on every message.
        self.peer_id: str = identity.peer_id
        self.transport = transport
        self.config = config if config is not None else GossipConfig.lan()
        self.stats = GossipStats()
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.members: dict[str, Member] = {}
        self.probe_order = ProbeOrder(self._rng)
        # Smoothed round trips of our acknowledged pings, published in our record.
        self.rtts = PeerRtts()
        self.broadcasts = BroadcastQueue(lambda: self.config.retransmit_limit(self._live))
        self._live = 0
        self._suspicions: dict[str, tuple[Suspicion, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self._leaving = False
        # Signature of each member's current record -> its peer id. Most
        # gossip is news we already hold, and this recognises it without
        # decoding a single field.
        self._signatures: dict[bytes, str] = {}
        try:
            record = ServerRecord(
                peer_id=identity.peer_id,
                public_key=identity.public_key_bytes,
                addresses=(
                    _sequence(addresses, "addresses")
                    if addresses is not None
                    else (transport.address,)
                ),
                model_id=model_id,
                span=_sequence(span, "span"),  # type: ignore[arg-type]
                num_blocks=num_blocks,
                dtype=dtype,
                version=version,
                throughput_decode=0.0,
                throughput_forward=0.0,
                free_cache_bytes=0,
                active_sessions=0,
                state=state,
                incarnation=1,
                timestamp=self._clock(),
            )
        except RecordError as exc:
            raise ConfigError(f"invalid local record: {exc}", **exc.details) from None
        signed = sign_record(record, identity)
        # since=0: our own entry is never aged or reaped.
        self._add_member(Member(signed, 1, MemberState.ALIVE, 0.0))

    # --- public API ----------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.transport.address

    @property
    def local_record(self) -> SignedRecord:
        return self.members[self.peer_id].record

    def view(self) -> list[SignedRecord]:
        """Signed, unexpired records of the live servers (ourselves included).

        Suspects are included: most suspicions are lossy links and are
        refuted, and a client's failover covers the rest. Sorted by peer id."""
        return sorted(
            (
                m.record
                for m in self.members.values()
                if m.state.is_live and (m.peer_id == self.peer_id or not self.record_expired(m))
            ),
            key=lambda r: r.record.peer_id,
        )

    def update_local_record(self, **changes: Any) -> SignedRecord:
        """Change fields of our record, re-sign it and gossip it."""
        unknown = set(changes) - UPDATABLE_FIELDS
        if unknown:
            raise ConfigError("these record fields cannot be updated", fields=sorted(unknown))
        for name in ("addresses", "span"):
            if name in changes:
                changes[name] = _sequence(changes[name], name)
        return self._resign(self.members[self.peer_id].incarnation + 1, changes)

    async def run(
        self,
        bootstrap: Sequence[str] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve, join through any one of ``bootstrap``, and gossip until cancelled.

        Raises ``ConnectionBrokenError`` when bootstrap addresses were given
        and none of them answered a join."""
        if self._nursery is not None:
            raise ConfigError("this gossip node is already running")
        peers = [a for a in bootstrap if a != self.address]
        joined = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self.transport.serve, self._handle)
                if peers and not await self._join(peers):
                    joined = False
                    nursery.cancel_scope.cancel()
                else:
                    # Announce ourselves too: the bootstrap peer's gossip alone
                    # is one source, and news from one source can die out
                    # before it reaches everyone.
                    self._queue_alive(self.local_record)
                    nursery.start_soon(self._probe_loop)
                    nursery.start_soon(self._gossip_loop)
                    nursery.start_soon(self._push_pull_loop)
                    nursery.start_soon(self._refresh_loop)
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._nursery = None
        if not joined:
            # Raised outside the nursery so callers catch the error itself,
            # not an exception group.
            raise ConnectionBrokenError("no bootstrap peer answered the join", peers=peers)

    async def leave(self) -> None:
        """Announce that we leave, hand the news to a few members, and stop ``run``.

        The news goes out on acknowledged pings, so it is not lost with us."""
        nursery = self._require_running()
        self._leaving = True
        me = self.members[self.peer_id]
        self._set_state(me, MemberState.LEFT)
        self._queue_dead(self.peer_id, me.incarnation, self.peer_id)
        targets = self.probe_order.sample(self.config.gossip_nodes, self.is_probeable)
        async with trio.open_nursery() as pushes:
            for peer_id in targets:
                pushes.start_soon(
                    self.ping, self.members[peer_id].address, peer_id, self.config.request_timeout
                )
        nursery.cancel_scope.cancel()

    # --- the pieces the round functions use -------------------------------------------

    def is_probeable(self, peer_id: str) -> bool:
        member = self.members.get(peer_id)
        return member is not None and peer_id != self.peer_id and member.state.is_live

    def record_expired(self, member: Member) -> bool:
        return is_expired(member.record.record, now=self._clock(), ttl=self.config.record_ttl)

    async def call(
        self,
        address: str,
        method: str,
        body: dict[str, Any],
        *,
        timeout: float,
        first: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any] | None:
        """A request carrying piggybacked news (``first`` ahead of the queue's);
        None when it fails or times out."""
        budget = self.config.max_piggyback_bytes - sum(_size(m) for m in first)
        body = dict(body, gossip=[*first, *self.broadcasts.take(budget)])
        with trio.move_on_after(timeout):
            try:
                reply = await self.transport.request(address, method, body)
            except LibpipeError:
                return None
            if not isinstance(reply, dict):
                return None
            self._merge_gossip(reply.get("gossip"))
            return reply
        return None

    async def ping(self, address: str, peer_id: str, timeout: float) -> bool:
        # Lifeguard's buddy system: a ping to a member we suspect tells it so,
        # whatever the queue holds. The suspect refutes at once and its ack
        # carries the refutation back, instead of both waiting on gossip that
        # a lossy link may drop.
        member = self.members.get(peer_id)
        first: list[dict[str, Any]] = []
        if member is not None and member.state is MemberState.SUSPECT:
            first.append(_suspect_news(peer_id, member.incarnation, self.peer_id))
        began = trio.current_time()
        reply = await self.call(
            address, "swarm.ping", {"target": peer_id}, timeout=timeout, first=first
        )
        acked = reply is not None and reply.get("ack") is True
        # Only members' figures are kept: a ping_req may name anyone.
        if acked and peer_id != self.peer_id and peer_id in self.members:
            self.rtts.observe(peer_id, trio.current_time() - began)
        return acked

    def send_notify(self, address: str, method: str, body: dict[str, Any]) -> None:
        """Fire a notification from a background task (a slow peer never blocks a round)."""
        nursery = self._require_running()
        nursery.start_soon(self._notify, address, method, body)

    async def push_pull(self, address: str) -> bool:
        """Exchange full state with ``address``; True when it answered."""
        with trio.move_on_after(self.config.request_timeout):
            try:
                reply = await self.transport.request(
                    address, "swarm.push_pull", {"state": local_state(self)}
                )
                merge_state(self, reply.get("state") if isinstance(reply, dict) else None)
            except LibpipeError:
                return False
            return True
        return False

    # --- handlers of news ---------------------------------------------------------------

    def on_alive(self, wire: Any, *, announce_unknown: bool = True) -> str | None:
        """Take a signed record; returns its peer id when it is (now) a member."""
        if isinstance(wire, list) and len(wire) == 2 and isinstance(wire[1], bytes):
            known = self._signatures.get(wire[1])
            if known is not None and self.members[known].record.payload == wire[0]:
                return known
        try:
            signed = decode_signed(wire)
        except RecordError as exc:
            self._reject(exc)
            return None
        record = signed.record
        member = self.members.get(record.peer_id)
        if member is None and not announce_unknown:
            return None
        if member is not None and (
            record.incarnation < member.incarnation
            or record.incarnation <= member.record.record.incarnation
        ):
            # Old news: no need to spend a signature check on it.
            return record.peer_id
        try:
            verify_signed(
                signed,
                now=self._clock(),
                ttl=self.config.record_ttl,
                max_skew=self.config.max_clock_skew,
            )
            own = self.local_record.record
            check_model_size(record, own.model_id, own.num_blocks)
        except RecordError as exc:
            self._reject(exc)
            return None
        if record.peer_id == self.peer_id:
            # A record of ours from an earlier life, newer than the one we hold.
            self._refute(record.incarnation)
            return record.peer_id
        if member is None:
            member = Member(signed, record.incarnation, MemberState.ALIVE, trio.current_time())
            self._add_member(member)
        else:
            self._set_record(member, signed)
            if record.incarnation > member.incarnation:
                member.incarnation = record.incarnation
                self._clear_suspicion(record.peer_id)
                self._set_state(member, MemberState.ALIVE)
        self._queue_alive(signed)
        return record.peer_id

    def on_suspect(self, peer_id: str, incarnation: int, accuser: str) -> None:
        member = self.members.get(peer_id)
        if member is None:
            return
        if peer_id == self.peer_id:
            self._answer_accusation(incarnation)
            return
        if incarnation < member.incarnation:
            return
        if member.state is MemberState.SUSPECT and incarnation == member.incarnation:
            entry = self._suspicions.get(peer_id)
            if entry is not None and entry[0].confirm(accuser):
                entry[1].deadline = entry[0].deadline
                self._queue_suspect(peer_id, member.incarnation, accuser)
            return
        if member.state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return
        # A suspicion of a newer incarnation than the one we suspect means the
        # member refuted ours (we missed its news): ours is void, and only
        # accusers of the new incarnation count towards the new one. Counting
        # them against the old timer declared members behind lossy links dead
        # while they were refuting every suspicion they heard of.
        self._clear_suspicion(peer_id)
        member.incarnation = incarnation
        self._set_state(member, MemberState.SUSPECT)
        self.stats.suspicions += 1
        self._start_suspicion(peer_id, incarnation, accuser)
        self._queue_suspect(peer_id, incarnation, accuser)

    def on_dead(self, peer_id: str, incarnation: int, accuser: str) -> None:
        member = self.members.get(peer_id)
        if member is None:
            return
        if peer_id == self.peer_id:
            self._answer_accusation(incarnation)
            return
        if incarnation < member.incarnation or member.state in (
            MemberState.DEAD,
            MemberState.LEFT,
        ):
            return
        member.incarnation = incarnation
        self._clear_suspicion(peer_id)
        self.rtts.forget(peer_id)
        self._set_state(member, MemberState.LEFT if accuser == peer_id else MemberState.DEAD)
        self._queue_dead(peer_id, incarnation, accuser)

    # --- internals ----------------------------------------------------------------------

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise ConnectionClosedError("the gossip node is not running")
        return self._nursery

    def _add_member(self, member: Member) -> None:
        self.members[member.peer_id] = member
        self._signatures[member.record.signature] = member.peer_id
        if member.state.is_live:
            self._live += 1
        if member.peer_id != self.peer_id:
            self.probe_order.add(member.peer_id)

    def _set_record(self, member: Member, signed: SignedRecord) -> None:
        del self._signatures[member.record.signature]
        member.record = signed
        self._signatures[signed.signature] = member.peer_id

    def _set_state(self, member: Member, state: MemberState) -> None:
        self._live += int(state.is_live) - int(member.state.is_live)
        member.state = state
        member.since = trio.current_time()

    def _reject(self, exc: RecordError) -> None:
        self.stats.records_rejected[exc.details.get("reason", "unknown")] += 1

    def _resign(self, incarnation: int, changes: dict[str, Any]) -> SignedRecord:
        """Sign our record anew with ``changes`` and the round trips measured
        so far (they change too often to be news on their own: they ride on
        every re-signing, the periodic refresh included)."""
        me = self.members[self.peer_id]
        try:
            record = dataclasses.replace(
                me.record.record,
                incarnation=incarnation,
                timestamp=self._clock(),
                peer_rtt_us=self.rtts.published(),
                **changes,
            )
        except RecordError as exc:
            raise ConfigError(f"invalid local record: {exc}", **exc.details) from None
        signed = sign_record(record, self.identity)
        self._set_record(me, signed)
        me.incarnation = incarnation
        self._queue_alive(signed)
        return signed

    def _answer_accusation(self, accused: int) -> None:
        """Answer news that we are suspect or dead (unless we are leaving).

        An accusation of an incarnation we already refuted means our
        refutation missed its sender: it is sent a bounded number of times,
        over links that may drop every one of them. So the same record goes
        out again, with a fresh transmit count, rather than staying silent
        while the accusation spreads and its timers run out."""
        if self._leaving:
            return
        if accused < self.members[self.peer_id].incarnation:
            self._queue_alive(self.local_record)
        else:
            self._refute(accused)

    def _refute(self, accused: int) -> None:
        self.stats.refutations += 1
        own = self.members[self.peer_id].incarnation
        self._resign(refutation_incarnation(own, accused), {})

    def _start_suspicion(self, peer_id: str, incarnation: int, accuser: str) -> None:
        n = self._live
        suspicion = Suspicion(
            accuser,
            k=self.config.suspicion_confirmations(n),
            min_timeout=self.config.suspicion_timeout(n),
            max_timeout=self.config.suspicion_max_timeout(n),
            started=trio.current_time(),
        )
        scope = trio.CancelScope(deadline=suspicion.deadline)
        self._suspicions[peer_id] = (suspicion, scope)
        self._require_running().start_soon(
            self._suspicion_timer, peer_id, incarnation, suspicion, scope
        )

    async def _suspicion_timer(
        self, peer_id: str, incarnation: int, suspicion: Suspicion, scope: trio.CancelScope
    ) -> None:
        with scope:
            await trio.sleep_forever()
        entry = self._suspicions.get(peer_id)
        if entry is None or entry[0] is not suspicion:
            return  # cleared by a refutation or a death verdict
        del self._suspicions[peer_id]
        member = self.members.get(peer_id)
        if member is not None and member.state is MemberState.SUSPECT:
            self.stats.deaths_declared += 1
            self.on_dead(peer_id, incarnation, self.peer_id)

    def _clear_suspicion(self, peer_id: str) -> None:
        entry = self._suspicions.pop(peer_id, None)
        if entry is not None:
            entry[1].cancel()

    def _queue(self, key: str, message: dict[str, Any]) -> None:
        self.broadcasts.queue(key, message, _size(message))

    def _queue_alive(self, signed: SignedRecord) -> None:
        self._queue(signed.record.peer_id, {"t": "alive", "record": signed.to_wire()})

    def _queue_suspect(self, peer_id: str, incarnation: int, accuser: str) -> None:
        self._queue(peer_id, _suspect_news(peer_id, incarnation, accuser))

    def _queue_dead(self, peer_id: str, incarnation: int, accuser: str) -> None:
        self._queue(peer_id, {"t": "dead", "peer": peer_id, "inc": incarnation, "from": accuser})

    def _merge_gossip(self, news: Any) -> None:
        if news is None:
            return
        if not isinstance(news, list):
            self.stats.messages_rejected += 1
            return
        for message in news:
            if not isinstance(message, dict):
                self.stats.messages_rejected += 1
                continue
            kind = message.get("t")
            if kind == "alive":
                self.on_alive(message.get("record"))
                continue
            peer, inc, accuser = message.get("peer"), message.get("inc"), message.get("from")
            if not (isinstance(peer, str) and isinstance(inc, int) and isinstance(accuser, str)):
                self.stats.messages_rejected += 1
            elif kind == "suspect":
                self.on_suspect(peer, inc, accuser)
            elif kind == "dead":
                self.on_dead(peer, inc, accuser)
            else:
                self.stats.messages_rejected += 1

    async def _handle(self, method: str, body: dict[str, Any]) -> dict[str, Any] | None:
        if not isinstance(body, dict):
            raise InvalidRequestError("gossip message body must be a map")
        self._merge_gossip(body.get("gossip"))
        if method == "swarm.gossip":
            return None
        if method == "swarm.ping":
            reply: dict[str, Any] = {"ack": body.get("target") == self.peer_id}
        elif method == "swarm.ping_req":
            target, address = body.get("target"), body.get("address")
            if not (isinstance(target, str) and isinstance(address, str)):
                raise InvalidRequestError("ping_req needs a target peer id and address")
            reply = {"ack": await self.ping(address, target, self.config.probe_timeout)}
        elif method == "swarm.push_pull":
            reply = {"state": local_state(self)}
            merge_state(self, body.get("state"))
            return reply
        elif method == "swarm.view":
            return {"records": [signed.to_wire() for signed in self.view()]}
        else:
            raise InvalidRequestError(f"unknown gossip method {method!r}")
        reply["gossip"] = self.broadcasts.take(self.config.max_piggyback_bytes)
        return reply

    async def _notify(self, address: str, method: str, body: dict[str, Any]) -> None:
        with trio.move_on_after(self.config.request_timeout):
            try:
                await self.transport.notify(address, method, body)
            except LibpipeError:
                return

    async def _join(self, peers: Sequence[str]) -> bool:
        answered = 0

        async def one(address: str) -> None:
            nonlocal answered
            answered += await self.push_pull(address)

        async with trio.open_nursery() as nursery:
            for address in peers:
                nursery.start_soon(one, address)
        return answered > 0

    def _reap(self) -> None:
        """Forget members that have been dead or gone for ``dead_reclaim_time``."""
        if len(self.members) == self._live:
            return  # nobody is dead: skip the scan (it runs every probe round)
        horizon = trio.current_time() - self.config.dead_reclaim_time
        gone = [
            m.peer_id
            for m in self.members.values()
            if not m.state.is_live and m.peer_id != self.peer_id and m.since < horizon
        ]
        for peer_id in gone:
            del self._signatures[self.members.pop(peer_id).record.signature]
            self.probe_order.remove(peer_id)

    async def _probe_loop(self) -> None:
        interval = self.config.probe_interval
        # A random phase, so that a swarm started at once does not probe in lockstep.
        await trio.sleep(self._rng.uniform(0, interval))
        while True:
            start = trio.current_time()
            await probe_round(self)
            self._reap()
            await trio.sleep_until(start + interval)

    async def _gossip_loop(self) -> None:
        interval = self.config.gossip_interval
        await trio.sleep(self._rng.uniform(0, interval))
        while True:
            gossip_round(self)
            await trio.sleep(interval)

    async def _push_pull_loop(self) -> None:
        await trio.sleep(self._rng.uniform(0, self.config.push_pull_period(self._live)))
        while True:
            await push_pull_round(self)
            await trio.sleep(self.config.push_pull_period(self._live))

    async def _refresh_loop(self) -> None:
        # Periods are uniform over [interval/2, interval] (mean 0.75 x), so a
        # swarm started at once drifts apart, and every refresh lands well
        # inside the TTL (record_ttl_mult > 1). The first wait is uniform over
        # one mean period, so the swarm refreshes at its steady rate from the
        # start instead of in a burst.
        interval = self.config.record_refresh_interval
        await trio.sleep(interval * self._rng.uniform(0.0, 0.75))
        while True:
            self._resign(self.members[self.peer_id].incarnation + 1, {})
            await trio.sleep(interval * self._rng.uniform(0.5, 1.0))


def _suspect_news(peer_id: str, incarnation: int, accuser: str) -> dict[str, Any]:
    return {"t": "suspect", "peer": peer_id, "inc": incarnation, "from": accuser}


def _size(message: dict[str, Any]) -> int:
    return len(msgpack.packb(message, use_bin_type=True))


def _sequence(value: Any, name: str) -> tuple[Any, ...]:
    """A list or tuple field as a tuple; a string would silently split into characters."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"record field {name!r} must be a list or tuple", field=name)
    return tuple(value)
