"""Signed server records: what a server says about itself, and nobody can forge.

A record is encoded canonically (a msgpack map with sorted keys, floats as
float64, sequences as arrays), so the same record is always the same bytes,
and those bytes are signed with the server's Ed25519 identity key under a
domain tag (so a signature made for anything else never verifies as a
record). A receiver checks, in order: the shape of the payload, that the
claimed peer id is the one derived from the enclosed public key, the
signature, and the age. Any failure raises ``RecordError`` with a
``reason`` that the node counts; the record is then dropped.

Only the owner signs its record, so gossip relays it verbatim: a relay can
drop news but cannot alter it, and every receiver can check it again.

Optional fields (``OPTIONAL_FIELDS``) are left out of the encoding while
empty, so a record without them is byte for byte what an older version
signs, and receivers accept records with or without them.

Forward compatibility: a key this version does not know (an optional field
a newer version added) is ignored when decoding, not refused, so an older
node keeps a newer server's record. The signature still covers the exact
bytes received, unknown keys included, and a relay forwards those bytes
(``SignedRecord.payload``), never a re-encoding, so the newer receivers
downstream still see, and can verify, the field. The payload's byte cap
(``MAX_RECORD_BYTES``, checked before decoding) bounds what unknown keys
can cost. Every known key keeps all of its checks.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ..errors import RecordError
from ..net import peer_id_from_public_key, verify_signature

# Signatures cover DOMAIN + payload: a record signature is useless elsewhere.
DOMAIN = b"libpipe/server-record/v1\x00"
# A record is a few hundred bytes; the cap is checked before decoding so a
# hostile blob costs nothing.
MAX_RECORD_BYTES = 4096
MAX_ADDRESSES = 8
MAX_STRING = 256
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
# No span may end past this block, whatever the record says of its model:
# real models have a few hundred blocks, and a receiver keeps state per
# block (coverage, placement), so a claimed end of 10**12 must never be
# believed. Past it the record is malformed.
MAX_BLOCKS = 4096
# Round trips to other servers (``peer_rtt_us``): at most this many, each
# keyed by the first PEER_RTT_PREFIX characters of the peer id (40 bits of
# its hash: two of one server's nearest peers share a prefix about once in
# 10**10 pairs, and then one figure is lost), in whole microseconds up to
# MAX_PEER_RTT_US (a minute: past it, a link is no link). Records are most
# of a quiet swarm's gossip, so each entry is kept to about 12 bytes (an
# int, not a float64): 16 of them add about 200 bytes to a 340-byte record.
MAX_PEER_RTTS = 16
PEER_RTT_PREFIX = 8
MAX_PEER_RTT_US = 60_000_000
# Fields a record may leave out (encoded only when non-empty).
OPTIONAL_FIELDS = frozenset({"peer_rtt_us"})


class RecordState(enum.Enum):
    """Lifecycle of a block server, as it announces it."""

    JOINING = "joining"  # loading blocks; takes no sessions yet
    ONLINE = "online"
    DRAINING = "draining"  # finishing sessions; takes no new ones


class Signer(Protocol):
    """What signing needs from a node identity (``libpipe.net.Identity``)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def public_key_bytes(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class ServerRecord:
    """One server's self-description.

    ``span`` is the half-open block range [start, end). Throughputs are
    measured by the server itself over its whole span: ``throughput_decode``
    in single-token steps per second, ``throughput_forward`` in tokens per
    second of bulk forward. ``timestamp`` is wall-clock seconds (Unix time)
    of signing; ``incarnation`` rises with every re-signing.

    ``peer_rtt_us`` is what the server measured to its nearest peers
    (the median of its last SWIM pings to each, ``_rtt.py``): ``(peer id prefix,
    microseconds)`` pairs sorted by prefix. A client routing decode steps
    server to server prices the hop between two servers with it.
    """

    peer_id: str
    public_key: bytes
    addresses: tuple[str, ...]
    model_id: str
    span: tuple[int, int]
    dtype: str
    version: str
    throughput_decode: float
    throughput_forward: float
    free_cache_bytes: int
    active_sessions: int
    state: RecordState
    incarnation: int
    timestamp: float
    num_blocks: int = 0
    peer_rtt_us: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check(isinstance(self.peer_id, str) and 0 < len(self.peer_id) <= MAX_STRING, "peer_id")
        _check(
            isinstance(self.public_key, bytes) and len(self.public_key) == PUBLIC_KEY_BYTES,
            "public_key",
        )
        _check(
            isinstance(self.addresses, tuple)
            and 0 < len(self.addresses) <= MAX_ADDRESSES
            and all(isinstance(a, str) and 0 < len(a) <= MAX_STRING for a in self.addresses),
            "addresses",
        )
        for name in ("model_id", "dtype", "version"):
            value = getattr(self, name)
            _check(isinstance(value, str) and len(value) <= MAX_STRING, name)
        _check(
            isinstance(self.span, tuple)
            and len(self.span) == 2
            and all(_is_int(b) for b in self.span)
            and 0 <= self.span[0] <= self.span[1],
            "span",
        )
        _check(_is_int(self.num_blocks) and 0 <= self.num_blocks <= MAX_BLOCKS, "num_blocks")
        _check(self.span[1] <= (self.num_blocks or MAX_BLOCKS), "span")
        for name in ("throughput_decode", "throughput_forward", "timestamp"):
            value = getattr(self, name)
            _check(_is_number(value) and math.isfinite(value) and value >= 0, name)
        for name in ("free_cache_bytes", "active_sessions", "incarnation"):
            value = getattr(self, name)
            _check(_is_int(value) and 0 <= value < 2**63, name)
        _check(isinstance(self.state, RecordState), "state")
        _check(_valid_peer_rtts(self.peer_rtt_us), "peer_rtt_us")

    def rtt_to(self, peer_id: str) -> float | None:
        """Seconds this server measured to ``peer_id``; None if it did not say."""
        return peer_rtt(self.peer_rtt_us, peer_id)

    def to_map(self) -> dict[str, Any]:
        """The canonical map: keys sorted, only msgpack-native values."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["addresses"] = list(self.addresses)
        raw["span"] = list(self.span)
        raw["state"] = self.state.value
        raw["throughput_decode"] = float(self.throughput_decode)
        raw["throughput_forward"] = float(self.throughput_forward)
        raw["timestamp"] = float(self.timestamp)
        raw["peer_rtt_us"] = dict(self.peer_rtt_us)
        for name in OPTIONAL_FIELDS:
            if not raw[name]:
                del raw[name]
        return dict(sorted(raw.items()))

    @classmethod
    def from_map(cls, raw: Any) -> ServerRecord:
        """Rebuild from a decoded map, refusing missing (but optional) or
        mistyped fields and ignoring keys this version does not know (see
        the module docstring)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not names - OPTIONAL_FIELDS <= raw.keys():
            raise RecordError("server record has the wrong fields", reason="malformed")
        raw = {name: value for name, value in raw.items() if name in names}
        try:
            state = RecordState(raw["state"])
        except ValueError:
            raise RecordError("server record has an unknown state", reason="malformed") from None
        values = dict(raw)
        values["state"] = state
        values["addresses"] = _as_tuple(raw["addresses"], "addresses")
        values["span"] = _as_tuple(raw["span"], "span")
        if "peer_rtt_us" in raw:
            rtts = raw["peer_rtt_us"]
            if (
                not isinstance(rtts, dict)
                or len(rtts) > MAX_PEER_RTTS
                or not all(isinstance(prefix, str) for prefix in rtts)
            ):
                raise RecordError(
                    "server record field 'peer_rtt_us' is invalid",
                    reason="malformed",
                    field="peer_rtt_us",
                )
            values["peer_rtt_us"] = tuple(sorted(rtts.items()))
        return cls(**values)

    def encode(self) -> bytes:
        """Canonical bytes: equal records always encode identically."""
        return msgpack.packb(self.to_map(), use_bin_type=True)


@dataclass(frozen=True)
class SignedRecord:
    """A record with the exact bytes its owner signed (relayed verbatim)."""

    payload: bytes
    signature: bytes
    record: ServerRecord

    def to_wire(self) -> list[bytes]:
        return [self.payload, self.signature]


def sign_record(record: ServerRecord, signer: Signer) -> SignedRecord:
    """Sign ``record`` with the identity it names (refusing any other)."""
    if record.peer_id != signer.peer_id or record.public_key != signer.public_key_bytes:
        raise RecordError("a record may only be signed by the identity it names", reason="signer")
    payload = record.encode()
    return SignedRecord(payload, signer.sign(DOMAIN + payload), record)


def decode_signed(wire: Any) -> SignedRecord:
    """Parse a record off the wire WITHOUT checking the signature.

    Callers use the unverified fields only to decide whether the record is
    news at all (its peer id and incarnation); news goes through
    ``verify_signed`` before anything believes it."""
    if not (
        isinstance(wire, (list, tuple))
        and len(wire) == 2
        and isinstance(wire[0], bytes)
        and isinstance(wire[1], bytes)
    ):
        raise RecordError("a signed record is [payload, signature]", reason="malformed")
    payload, signature = wire
    if len(payload) > MAX_RECORD_BYTES:
        raise RecordError(
            "server record is too large",
            reason="malformed",
            size=len(payload),
            limit=MAX_RECORD_BYTES,
        )
    if len(signature) != SIGNATURE_BYTES:
        raise RecordError("record signature has the wrong length", reason="malformed")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise RecordError("server record is not valid msgpack", reason="malformed") from None
    return SignedRecord(payload, signature, ServerRecord.from_map(raw))


def verify_signed(signed: SignedRecord, *, now: float, ttl: float, max_skew: float) -> None:
    """Raise ``RecordError`` unless the record is authentic and fresh at ``now``."""
    record = signed.record
    if peer_id_from_public_key(record.public_key) != record.peer_id:
        raise RecordError(
            "record claims a peer id its key does not derive",
            reason="wrong_key",
            peer_id=record.peer_id,
        )
    if not verify_signature(record.public_key, signed.signature, DOMAIN + signed.payload):
        raise RecordError(
            "record signature does not verify", reason="bad_signature", peer_id=record.peer_id
        )
    if record.timestamp > now + max_skew:
        raise RecordError(
            "record is stamped in the future", reason="future", peer_id=record.peer_id
        )
    if now - record.timestamp > ttl:
        raise RecordError("record has expired", reason="expired", peer_id=record.peer_id)


def verified_records(
    wires: Any,
    *,
    now: float,
    ttl: float,
    max_skew: float,
    rejected: Counter[str] | None = None,
) -> list[SignedRecord]:
    """The authentic, fresh records among ``wires`` (a ``swarm.view`` reply's
    ``records``); the rest are dropped and counted by reason in ``rejected``.

    For clients: the peer that answered relays records, it cannot vouch for
    them, so each one is checked against its own owner's key."""
    if not isinstance(wires, list):
        raise RecordError("a view is a list of signed records", reason="malformed")
    good = []
    for wire in wires:
        try:
            signed = decode_signed(wire)
            verify_signed(signed, now=now, ttl=ttl, max_skew=max_skew)
        except RecordError as exc:
            if rejected is not None:
                rejected[exc.details.get("reason", "unknown")] += 1
            continue
        good.append(signed)
    return good


def check_model_size(record: ServerRecord, model_id: str, num_blocks: int) -> None:
    """Raise ``RecordError`` (reason ``num_blocks``) when ``record`` serves
    ``model_id``, whose block count the caller knows to be ``num_blocks``
    (from its own checkpoint or a server's ``info``), but announces another
    count or a span past the last block. A signature proves who said it,
    not that it is right: such a span would hide real gaps in coverage."""
    if not num_blocks or record.model_id != model_id:
        return
    if record.num_blocks not in (0, num_blocks) or record.span[1] > num_blocks:
        raise RecordError(
            f"record's span {record.span[0]}:{record.span[1]} of {record.num_blocks or '?'} "
            f"blocks does not fit {model_id} ({num_blocks} blocks)",
            reason="num_blocks",
            peer_id=record.peer_id,
        )


def peer_rtt(table: tuple[tuple[str, int], ...], peer_id: str) -> float | None:
    """Seconds to ``peer_id`` in a record's ``peer_rtt_us``; None if absent."""
    key = peer_id[:PEER_RTT_PREFIX]
    for prefix, us in table:
        if prefix == key:
            return us / 1e6
    return None


def is_expired(record: ServerRecord, *, now: float, ttl: float) -> bool:
    return now - record.timestamp > ttl


def _check(ok: bool, name: str) -> None:
    if not ok:
        raise RecordError(
            f"server record field {name!r} is invalid", reason="malformed", field=name
        )


def _valid_peer_rtts(value: Any) -> bool:
    """At most MAX_PEER_RTTS (prefix, us) pairs, prefixes distinct and sorted,
    each a whole number of microseconds in [0, MAX_PEER_RTT_US]."""
    if not isinstance(value, tuple) or len(value) > MAX_PEER_RTTS:
        return False
    previous = ""
    for item in value:
        if not (isinstance(item, tuple) and len(item) == 2):
            return False
        prefix, us = item
        if not (
            isinstance(prefix, str)
            and 0 < len(prefix) <= PEER_RTT_PREFIX
            and prefix > previous
            and _is_int(us)
            and 0 <= us <= MAX_PEER_RTT_US
        ):
            return False
        previous = prefix
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise RecordError(
            f"server record field {name!r} is invalid", reason="malformed", field=name
        )
    return tuple(value)
