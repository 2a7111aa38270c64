"""The golden frames of proto/vectors/: decode each, re-encode the valid ones
byte for byte, and check each invalid one raises its error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from libpipe.errors import ProtocolError, error_kinds
from libpipe.wire import NEED_DATA, PROTOCOL_VERSION, FrameKind
from libpipe.wire._frame import HEADER, MAGIC

PROTO = Path(__file__).resolve().parents[2] / "proto"
VECTORS = json.loads((PROTO / "vectors" / "vectors.json").read_text())["vectors"]

_spec = importlib.util.spec_from_file_location("make_vectors", PROTO / "make_vectors.py")
assert _spec is not None and _spec.loader is not None
make_vectors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_vectors)


def test_header_facts():
    index = json.loads((PROTO / "vectors" / "vectors.json").read_text())
    assert index["protocol_version"] == PROTOCOL_VERSION
    assert index["header"] == {"size": HEADER.size, "struct": HEADER.format, "magic": MAGIC.hex()}


def test_every_frame_kind_and_error_kind_has_a_vector():
    kinds = {v["event"]["type"] for v in VECTORS if "event" in v}
    assert kinds >= set(make_vectors._FIELDS)
    errors = {v["error"] for v in VECTORS if "error" in v}
    protocol_kinds = {k for k, cls in error_kinds().items() if issubclass(cls, ProtocolError)}
    assert errors == protocol_kinds - {"protocol"}


def test_the_spec_lists_every_frame_kind_and_error_kind():
    spec = (PROTO / "PROTOCOL.md").read_text()
    for kind in FrameKind:
        assert f"| {int(kind)} | {kind.name} |" in spec
    for kind, cls in error_kinds().items():
        assert f"| `{kind}` | `{cls.__name__}` |" in spec


def _receive(conn, data):
    conn.receive_data(data)
    event = conn.next_event()
    if event is NEED_DATA:
        conn.receive_data(b"")
        event = conn.next_event()
    return event


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector):
    conns = make_vectors.play(vector["setup"])
    sender = conns[vector["sender"]]
    receiver = conns["acceptor" if vector["sender"] == "dialer" else "dialer"]
    data = bytes.fromhex(vector["hex"])
    if "error" in vector:
        with pytest.raises(ProtocolError) as info:
            _receive(receiver, data)
        assert info.value.kind == vector["error"]
        return
    expected = make_vectors.event_from_json(vector["event"])
    if "slice_bytes" in vector:
        frames = sender.send_frames(expected, vector["slice_bytes"])
        assert len(frames) > 1
        assert b"".join(bytes(b) for frame in frames for b in frame).hex() == vector["hex"]
    elif vector["reencode"]:
        assert b"".join(bytes(b) for b in sender.send(expected)).hex() == vector["hex"]
    got = _receive(receiver, data)
    assert make_vectors.event_to_json(got) == vector["event"]
    for t, e in zip(getattr(got, "tensors", ()), getattr(expected, "tensors", ()), strict=True):
        assert torch.equal(t, e)
