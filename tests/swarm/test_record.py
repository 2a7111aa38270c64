"""Signed server records: canonical bytes, and every way a record is refused."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, strategies as st

from libpipe.errors import RecordError
from libpipe.net import Identity
from libpipe.swarm import (
    RecordState,
    ServerRecord,
    SignedRecord,
    decode_signed,
    sign_record,
    verified_records,
    verify_signed,
)
from libpipe.swarm._record import (
    DOMAIN,
    MAX_ADDRESSES,
    MAX_BLOCKS,
    MAX_PEER_RTT_US,
    MAX_PEER_RTTS,
    MAX_RECORD_BYTES,
    MAX_STRING,
    PEER_RTT_PREFIX,
    check_model_size,
)

NOW = 1_800_000_000.0
TTL = 90.0


def make_record(identity, **changes) -> ServerRecord:
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        addresses=("10.0.0.7:31337",),
        model_id="meta-llama/Llama-2-7b-hf",
        span=(8, 16),
        dtype="float16",
        version="0.1.0",
        throughput_decode=41.5,
        throughput_forward=2300.0,
        free_cache_bytes=6 << 30,
        active_sessions=3,
        state=RecordState.ONLINE,
        incarnation=4,
        timestamp=NOW - 5.0,
    )
    fields.update(changes)
    return ServerRecord(**fields)


def reason(excinfo) -> str:
    return excinfo.value.details["reason"]


@pytest.fixture(scope="module")
def server():
    return Identity.generate()


@pytest.fixture(scope="module")
def attacker():
    return Identity.generate()


def test_signed_record_round_trips_and_verifies(server):
    signed = sign_record(make_record(server), server)
    back = decode_signed(msgpack.unpackb(msgpack.packb(signed.to_wire()), raw=False))
    verify_signed(back, now=NOW, ttl=TTL, max_skew=10.0)
    assert back.record == signed.record


def test_encoding_is_canonical(server):
    record = make_record(server)
    payload = record.encode()
    assert payload == make_record(server).encode()
    decoded = msgpack.unpackb(payload, raw=False)
    assert list(decoded) == sorted(decoded)
    assert ServerRecord.from_map(decoded).encode() == payload


def test_record_naming_another_key_is_dropped(server, attacker):
    # The attacker signs with its own key, but claims the server's peer id.
    forged = make_record(server, public_key=attacker.public_key_bytes)
    payload = forged.encode()
    signed = SignedRecord(payload, attacker.sign(DOMAIN + payload), forged)
    with pytest.raises(RecordError) as excinfo:
        verify_signed(signed, now=NOW, ttl=TTL, max_skew=10.0)
    assert reason(excinfo) == "wrong_key"


def test_record_signed_by_another_key_is_dropped(server, attacker):
    record = make_record(server)
    payload = record.encode()
    signed = SignedRecord(payload, attacker.sign(DOMAIN + payload), record)
    with pytest.raises(RecordError) as excinfo:
        verify_signed(signed, now=NOW, ttl=TTL, max_skew=10.0)
    assert reason(excinfo) == "bad_signature"


def test_tampered_record_is_dropped(server):
    signed = sign_record(make_record(server), server)
    raised = dataclasses.replace(signed.record, free_cache_bytes=1 << 40)
    tampered = decode_signed([raised.encode(), signed.signature])
    with pytest.raises(RecordError) as excinfo:
        verify_signed(tampered, now=NOW, ttl=TTL, max_skew=10.0)
    assert reason(excinfo) == "bad_signature"


def test_signature_without_the_domain_tag_is_dropped(server):
    record = make_record(server)
    payload = record.encode()
    with pytest.raises(RecordError) as excinfo:
        verify_signed(
            SignedRecord(payload, server.sign(payload), record), now=NOW, ttl=TTL, max_skew=1
        )
    assert reason(excinfo) == "bad_signature"


@pytest.mark.parametrize(("age", "why"), [(TTL + 1.0, "expired"), (-30.0, "future")])
def test_expired_and_future_records_are_dropped(server, age, why):
    signed = sign_record(make_record(server, timestamp=NOW - age), server)
    with pytest.raises(RecordError) as excinfo:
        verify_signed(signed, now=NOW, ttl=TTL, max_skew=10.0)
    assert reason(excinfo) == why


def test_only_the_named_identity_may_sign(server, attacker):
    with pytest.raises(RecordError):
        sign_record(make_record(server), attacker)


@pytest.mark.parametrize(
    "changes",
    [
        {"span": (9, 3)},
        {"span": (1, 2, 3)},
        {"addresses": ()},
        {"incarnation": -1},
        {"throughput_decode": float("nan")},
        {"active_sessions": True},
        {"public_key": b"short"},
        {"state": "online"},
        {"num_blocks": -1},
        {"num_blocks": MAX_BLOCKS + 1},
        {"num_blocks": 12, "span": (8, 13)},
        # Announcing no block count does not lift the absolute bound.
        {"span": (0, MAX_BLOCKS + 1)},
        {"span": (0, 10**12)},
    ],
)
def test_invalid_fields_are_refused(server, changes):
    with pytest.raises(RecordError):
        make_record(server, **changes)


def _wire_with(server, mutate) -> list[bytes]:
    raw = make_record(server).to_map()
    mutate(raw)
    return [msgpack.packb(raw, use_bin_type=True), bytes(64)]


@pytest.mark.parametrize(
    "wire_of",
    [
        lambda s: "not a record",
        lambda s: [b"x"],
        lambda s: [b"x", b"y", b"z"],
        lambda s: [b"\xc1", bytes(64)],  # 0xc1 is never valid msgpack
        lambda s: [b"\x91\x01", bytes(64)],  # valid msgpack, not a map
        lambda s: [bytes(5000), bytes(64)],
        lambda s: [make_record(s).encode(), bytes(10)],
        lambda s: _wire_with(s, lambda m: m.pop("span")),
        lambda s: _wire_with(s, lambda m: m.update(state="exploded")),
        lambda s: _wire_with(s, lambda m: m.update(addresses="10.0.0.1:1")),
        lambda s: _wire_with(s, lambda m: m.update(model_id=7)),
        lambda s: _wire_with(s, lambda m: m.update(span=[0, 10**12])),
    ],
)
def test_malformed_wire_records_raise_record_error(server, wire_of):
    with pytest.raises(RecordError) as excinfo:
        decode_signed(wire_of(server))
    assert reason(excinfo) == "malformed"


@given(st.binary(max_size=400), st.binary(min_size=64, max_size=64))
def test_arbitrary_bytes_decode_or_raise_record_error(payload, signature):
    try:
        decode_signed([payload, signature])
    except RecordError:
        pass


@pytest.mark.parametrize(
    ("changes", "fits"),
    [
        ({"span": (8, 16), "num_blocks": 32}, True),
        ({"span": (8, 16), "num_blocks": 0}, True),  # not announced, span inside
        ({"span": (8, 40), "num_blocks": 0}, False),  # past the last block
        ({"span": (8, 16), "num_blocks": 16}, False),  # another model size
        ({"span": (8, 40), "model_id": "other/model"}, True),  # not ours to judge
    ],
)
def test_span_is_checked_against_a_known_model_size(server, changes, fits):
    record = make_record(server, **changes)
    if fits:
        check_model_size(record, "meta-llama/Llama-2-7b-hf", 32)
    else:
        with pytest.raises(RecordError) as caught:
            check_model_size(record, "meta-llama/Llama-2-7b-hf", 32)
        assert reason(caught) == "num_blocks"
    # A receiver that does not know the size cannot judge, and does not.
    check_model_size(record, "meta-llama/Llama-2-7b-hf", 0)


def _rtts(n: int, us: int = 1500) -> tuple[tuple[str, int], ...]:
    return tuple((f"peer{i:04d}", us) for i in range(n))


def test_peer_rtts_round_trip_and_are_looked_up_by_peer_id_prefix(server):
    rtts = (("abcdefgh", 250), ("zz", 12_000))
    signed = sign_record(make_record(server, peer_rtt_us=rtts), server)
    back = decode_signed(msgpack.unpackb(msgpack.packb(signed.to_wire()), raw=False))
    verify_signed(back, now=NOW, ttl=TTL, max_skew=10.0)
    assert back.record.peer_rtt_us == rtts
    # Keyed by the first PEER_RTT_PREFIX characters of the full peer id.
    assert back.record.rtt_to("abcdefgh" + "q" * 24) == 250e-6
    assert back.record.rtt_to("zz") == 0.012
    assert back.record.rtt_to("someone-else") is None


def test_a_record_without_peer_rtts_encodes_as_before(server):
    """Mixed versions: an empty field is left out of the signed bytes, and a
    record that never had it (an older server's) decodes."""
    decoded = msgpack.unpackb(make_record(server).encode(), raw=False)
    assert "peer_rtt_us" not in decoded
    assert ServerRecord.from_map(decoded).peer_rtt_us == ()
    with_rtts = msgpack.unpackb(make_record(server, peer_rtt_us=_rtts(2)).encode(), raw=False)
    assert list(with_rtts) == sorted(with_rtts)
    assert with_rtts["peer_rtt_us"] == {"peer0000": 1500, "peer0001": 1500}


@pytest.mark.parametrize(
    "rtts",
    [
        (("a", float("nan")),),
        (("a", 1.5),),  # whole microseconds only
        (("a", -1),),
        (("a", MAX_PEER_RTT_US + 1),),
        (("a", True),),
        (("a", "1"),),
        (("", 1),),
        (("x" * (PEER_RTT_PREFIX + 1), 1),),
        (("b", 1), ("a", 1)),  # not sorted
        (("a", 1), ("a", 2)),  # twice
        (("a", 1, 2),),
        _rtts(MAX_PEER_RTTS + 1),
        ["a", 1],
    ],
)
def test_invalid_peer_rtts_are_refused(server, rtts):
    with pytest.raises(RecordError) as caught:
        make_record(server, peer_rtt_us=rtts)
    assert caught.value.details["field"] == "peer_rtt_us"


@pytest.mark.parametrize(
    "value",
    [
        {"a": float("nan")},
        {"a": 2.5},
        {"a": -5},
        {"a": 2**64 - 1},
        {"a": "fast"},
        {b"a": 1},
        {"a": 1, b"b": 1},  # mixed key types must not reach a sort
        {"x" * 40: 1},
        [["a", 1]],
        {f"p{i}": 1 for i in range(MAX_PEER_RTTS + 1)},
        {f"p{i}": 1 for i in range(1000)},  # oversized: refused by count, not decoded further
    ],
)
def test_forged_peer_rtts_on_the_wire_are_malformed(server, value):
    wire = _wire_with(server, lambda m: m.update(peer_rtt_us=value))
    with pytest.raises(RecordError) as caught:
        decode_signed(wire)
    assert reason(caught) == "malformed"


def test_the_largest_legal_record_fits_the_size_limit(server):
    record = make_record(
        server,
        addresses=tuple("a" * MAX_STRING for _ in range(MAX_ADDRESSES)),
        model_id="m" * MAX_STRING,
        dtype="d" * MAX_STRING,
        version="v" * MAX_STRING,
        peer_rtt_us=tuple((f"{i:0{PEER_RTT_PREFIX}d}", MAX_PEER_RTT_US) for i in range(16)),
    )
    signed = sign_record(record, server)
    assert len(signed.payload) <= MAX_RECORD_BYTES
    assert decode_signed(signed.to_wire()).record == record


def _signed_with_extra_keys(identity, extra: dict) -> list[bytes]:
    """What a newer version signs: our fields plus ones we do not know."""
    raw = make_record(identity).to_map()
    raw.update(extra)
    payload = msgpack.packb(dict(sorted(raw.items())), use_bin_type=True)
    return [payload, identity.sign(DOMAIN + payload)]


def test_a_newer_records_unknown_keys_are_ignored_and_relayed_verbatim(server):
    extra = {"gpu_temp_c": 71, "zz_future": {"nested": [1, 2.5, "x"]}}
    wire = _signed_with_extra_keys(server, extra)
    signed = decode_signed(msgpack.unpackb(msgpack.packb(wire), raw=False))
    # The signature covers the bytes received, unknown keys included.
    verify_signed(signed, now=NOW, ttl=TTL, max_skew=10.0)
    assert signed.record == make_record(server)
    # Relayed as received: a newer receiver downstream still gets the keys
    # (re-encoding would drop them and break the signature).
    assert signed.to_wire() == wire
    assert signed.record.encode() != wire[0]
    (relayed,) = verified_records([wire], now=NOW, ttl=TTL, max_skew=10.0)
    assert relayed.to_wire() == wire
    assert msgpack.unpackb(relayed.payload, raw=False)["zz_future"] == extra["zz_future"]


def test_an_unknown_key_does_not_excuse_a_tampered_payload(server):
    wire = _signed_with_extra_keys(server, {"gpu_temp_c": 71})
    tampered = wire[0].replace(b"gpu_temp_c\x47", b"gpu_temp_c\x10")
    assert tampered != wire[0]
    with pytest.raises(RecordError) as excinfo:
        verify_signed(decode_signed([tampered, wire[1]]), now=NOW, ttl=TTL, max_skew=10.0)
    assert reason(excinfo) == "bad_signature"


@pytest.mark.parametrize(
    "known",
    [
        {"span": [0, 10**12]},
        {"state": "exploded"},
        {"peer_rtt_us": [1, 2]},
        {"free_cache_bytes": -1},
    ],
)
def test_a_malformed_known_key_fails_beside_unknown_ones(server, known):
    wire = _signed_with_extra_keys(server, {"gpu_temp_c": 71, **known})
    with pytest.raises(RecordError) as excinfo:
        decode_signed(wire)
    assert reason(excinfo) == "malformed"


def test_a_record_missing_a_required_key_fails_whatever_else_it_carries(server):
    raw = make_record(server).to_map()
    del raw["span"]
    raw["span_v2"] = [0, 4]
    payload = msgpack.packb(raw, use_bin_type=True)
    with pytest.raises(RecordError) as excinfo:
        decode_signed([payload, server.sign(DOMAIN + payload)])
    assert reason(excinfo) == "malformed"
