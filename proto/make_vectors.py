"""Generate proto/vectors/vectors.json, the golden frames of the protocol.

Run: ``.venv/bin/python proto/make_vectors.py`` (rewrites the file). The
tests replay every vector (tests/wire/test_vectors.py): valid frames must
decode to the described event and re-encode byte for byte, invalid ones must
raise the named error. A codec change that alters a single byte fails them,
which is the point: the bytes are the protocol.

Each vector is a small scenario between a dialer and an acceptor: ``setup``
lists events sent before (each side's Hello first), then ``hex`` is one frame
sent by ``sender`` (with ``slice_bytes``: a continued message, its head frame
and CONTINUATION frames of at most that many payload bytes, back to back).
``event`` is what the other side decodes, or ``error`` the
``libpipe.errors`` kind it raises. Tensors are given as dtype, shape and the
hex of their raw little-endian bytes. Compressed vectors are decode-only
(``reencode: false``): zstd's output may change between library versions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import torch
import zstandard

from libpipe import wire
from libpipe.wire._frame import HEADER, MAGIC
from libpipe.wire._tensors import DTYPES, WIRE_NAMES, shuffle, tensor_bytes

OUT = Path(__file__).parent / "vectors" / "vectors.json"

_FIELDS: dict[str, tuple[str, ...]] = {
    "Hello": ("version", "peer_id", "role", "model_id", "features", "info"),
    "Request": ("stream_id", "method", "meta", "tensors"),
    "Response": ("stream_id", "meta", "tensors"),
    "StreamOpen": ("stream_id", "method", "meta", "tensors"),
    "StreamData": ("stream_id", "meta", "tensors"),
    "StreamClose": ("stream_id", "meta"),
    "ErrorReply": ("stream_id", "kind", "message", "details"),
    "Cancel": ("stream_id",),
    "Notify": ("method", "meta"),
    "Ping": ("nonce",),
    "Pong": ("nonce",),
    "GoAway": ("last_stream_id", "reason"),
}


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    _, data = tensor_bytes(t)
    return {"dtype": WIRE_NAMES[t.dtype], "shape": list(t.shape), "hex": data.hex()}


def tensor_from_json(d: dict[str, Any]) -> torch.Tensor:
    raw = bytearray.fromhex(d["hex"])
    dtype = DTYPES[d["dtype"]]
    if not raw:
        return torch.empty(d["shape"], dtype=dtype)
    flat = torch.frombuffer(raw, dtype=torch.uint8 if dtype is torch.bool else dtype)
    return (flat.view(torch.bool) if dtype is torch.bool else flat).view(d["shape"])


def event_to_json(event: Any) -> dict[str, Any]:
    name = type(event).__name__
    out: dict[str, Any] = {"type": name}
    for f in _FIELDS[name]:
        value = getattr(event, f)
        if f == "tensors":
            value = [tensor_to_json(t) for t in value]
        elif f == "features":
            value = sorted(value)
        out[f] = value
    return out


def event_from_json(d: dict[str, Any]) -> Any:
    cls = getattr(wire, d["type"])
    kwargs = {f: d[f] for f in _FIELDS[d["type"]] if f in d}
    if "tensors" in kwargs:
        kwargs["tensors"] = tuple(tensor_from_json(t) for t in kwargs["tensors"])
    if "features" in kwargs:
        kwargs["features"] = frozenset(kwargs["features"])
    return cls(**kwargs)


def hellos(zstd: bool = True, continuation: bool = False) -> list[list[Any]]:
    features = (["zstd"] if zstd else []) + (["continuation"] if continuation else [])
    return [
        ["dialer", event_to_json(wire.Hello(1, "dialer-peer", "dialer", "llama-test", features))],
        [
            "acceptor",
            event_to_json(wire.Hello(1, "acceptor-peer", "acceptor", "llama-test", features)),
        ],
    ]


def play(setup: list[list[Any]]) -> dict[str, wire.WireConnection]:
    """Both sides after the setup events went across."""
    conns = {
        "dialer": wire.WireConnection(wire.Role.DIALER),
        "acceptor": wire.WireConnection(wire.Role.ACCEPTOR),
    }
    for who, ev in setup:
        other = conns["acceptor" if who == "dialer" else "dialer"]
        for b in conns[who].send(event_from_json(ev)):
            other.receive_data(b)
        decoded = other.next_event()
        assert type(decoded).__name__ == ev["type"], (decoded, ev)
    return conns


def raw_frame(kind: int, meta: Any, payload: bytes = b"", **header: Any) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True) if not isinstance(meta, bytes) else meta
    pad = bytes(-len(packed) % 8) if payload else b""
    fields = {
        "magic": MAGIC,
        "version": 1,
        "flags": 0,
        "stream_id": 0,
        "meta_len": len(packed),
        "payload_len": len(payload),
    }
    fields.update(header)
    head = HEADER.pack(
        fields["magic"],
        fields["version"],
        kind,
        fields["flags"],
        fields["stream_id"],
        fields["meta_len"],
        fields["payload_len"],
    )
    return head + packed + pad + payload


def valid(
    name: str, description: str, sender: str, event: Any, setup: list[list[Any]]
) -> dict[str, Any]:
    conns = play(setup)
    data = b"".join(bytes(b) for b in conns[sender].send(event))
    return {
        "name": name,
        "description": description,
        "setup": setup,
        "sender": sender,
        "hex": data.hex(),
        "event": event_to_json(event),
        "reencode": True,
    }


def continued(
    name: str, description: str, event: Any, setup: list[list[Any]], slice_bytes: int
) -> dict[str, Any]:
    """A message the dialer cuts into a head frame and CONTINUATION frames."""
    conns = play(setup)
    frames = conns["dialer"].send_frames(event, slice_bytes)
    assert len(frames) > 1, "the setup must offer continuation and the payload exceed a slice"
    return {
        "name": name,
        "description": description,
        "setup": setup,
        "sender": "dialer",
        "slice_bytes": slice_bytes,
        "hex": b"".join(bytes(b) for frame in frames for b in frame).hex(),
        "event": event_to_json(event),
        "reencode": True,
    }


def invalid(
    name: str, description: str, frame: bytes, error: str, setup: list[list[Any]]
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "setup": setup,
        "sender": "dialer",
        "hex": frame.hex(),
        "error": error,
    }


def build() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    h = hellos()
    req = ["dialer", event_to_json(wire.Request(1, "forward", {}))]
    opened = ["dialer", event_to_json(wire.StreamOpen(1, "inference", {}))]
    hidden = (torch.randn(1, 2, 4, generator=gen) * 3).half()
    vectors = [
        valid("hello", "the dialer's Hello, offering zstd", "dialer", event_from_json(h[0][1]), []),
        valid(
            "hello_acceptor_info",
            "the acceptor's Hello with info",
            "acceptor",
            wire.Hello(
                1,
                "acceptor-peer",
                "acceptor",
                "llama-test",
                frozenset(),
                {"max_open_streams": 256, "span": [0, 8]},
            ),
            h[:1],
        ),
        valid(
            "request_no_tensors",
            "a unary call without tensors",
            "dialer",
            wire.Request(1, "info", {"verbose": True}),
            h,
        ),
        valid(
            "request_fp16",
            "a decode step: one fp16 hidden state",
            "dialer",
            wire.Request(1, "forward", {"span": [0, 4], "position": 7}, (hidden,)),
            h,
        ),
        valid(
            "request_mixed_dtypes",
            "bf16, f32, i64 and bool tensors, with padding between",
            "dialer",
            wire.Request(
                3,
                "forward",
                {},
                (
                    torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
                    torch.tensor([[0.5], [-1.0]], dtype=torch.float32),
                    torch.tensor([1, -2, 2**40]),
                    torch.tensor([True, False, True]),
                ),
            ),
            h,
        ),
        valid(
            "request_scalar_and_empty",
            "a 0-dim tensor and a tensor with no elements",
            "dialer",
            wire.Request(
                5,
                "m",
                {},
                (torch.tensor(2.5, dtype=torch.float32), torch.empty(0, 3, dtype=torch.float16)),
            ),
            h,
        ),
        valid(
            "response",
            "the answer to a unary call",
            "acceptor",
            wire.Response(1, {"ok": True}, (hidden * 2,)),
            [*h, req],
        ),
        valid(
            "error_reply",
            "a call ending with cache_full",
            "acceptor",
            wire.ErrorReply(
                1, "cache_full", "no room for 2048 tokens", {"requested": 1 << 20, "free": 4096}
            ),
            [*h, req],
        ),
        valid("cancel", "the opener abandons its call", "dialer", wire.Cancel(1), [*h, req]),
        valid(
            "stream_open",
            "opens an inference session",
            "dialer",
            wire.StreamOpen(1, "inference", {"max_length": 128}),
            h,
        ),
        valid(
            "stream_data",
            "a step on an open stream, from the responder",
            "acceptor",
            wire.StreamData(1, {"step": 3}, (hidden,)),
            [*h, opened],
        ),
        valid(
            "stream_close",
            "the opener half-closes",
            "dialer",
            wire.StreamClose(1, {}),
            [*h, opened],
        ),
        valid(
            "notify",
            "a gossip message on stream 0",
            "acceptor",
            wire.Notify("gossip", {"records": ["a", "b"]}),
            h,
        ),
        valid("ping", "keepalive", "dialer", wire.Ping(42), h),
        valid("pong", "keepalive answer", "acceptor", wire.Pong(42), h),
        valid("go_away", "graceful close", "acceptor", wire.GoAway(0, "draining"), h),
        valid(
            "connection_error",
            "a connection-level error before any Hello",
            "acceptor",
            wire.ErrorReply(0, "auth", "certificate not signed by the swarm CA", {}),
            [],
        ),
    ]
    # Continued messages: 40 payload bytes in slices of 16.
    hc = hellos(continuation=True)
    opened_c = ["dialer", event_to_json(wire.StreamOpen(1, "inference", {}))]
    step = (torch.randn(1, 2, 10, generator=gen) * 3).half()
    vectors.append(
        continued(
            "stream_data_continued",
            "a STREAM_DATA head frame (CONTINUED) and three CONTINUATION frames",
            wire.StreamData(1, {"step": 2}, (step,)),
            [*hc, opened_c],
            16,
        )
    )
    head = raw_frame(
        5,
        {"meta": {}, "tensors": [["f16", [4], "raw", 8]]},
        stream_id=1,
        flags=2,
        payload_len=8,
    )
    vectors.append(
        invalid(
            "continuation_without_message",
            "a CONTINUATION frame that continues nothing",
            raw_frame(13, b"", b"\x00" * 8, stream_id=1),
            "protocol.stream_state",
            [*hc, opened_c],
        )
    )
    vectors.append(
        invalid(
            "continuation_overrun",
            "a head frame declaring 8 payload bytes, then a CONTINUATION of 16",
            head + raw_frame(13, b"", b"\x00" * 16, stream_id=1),
            "protocol.payload_size",
            [*hc, opened_c],
        )
    )
    # A compressed frame: decode-only, since zstd's exact bytes are not ours.
    plain = torch.zeros(1024, dtype=torch.float16)
    plain[::7] = 1.5
    _, data = tensor_bytes(plain)
    body = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(shuffle(data, 2))
    meta = {
        "method": "forward",
        "meta": {},
        "tensors": [["f16", [1024], "shuffle-zstd", len(body)]],
    }
    vectors.append(
        {
            "name": "request_zstd_shuffled",
            "description": "an fp16 tensor, byte-shuffled and zstd-compressed",
            "setup": h,
            "sender": "dialer",
            "hex": raw_frame(2, meta, body, stream_id=1, flags=1).hex(),
            "event": event_to_json(wire.Request(1, "forward", {}, (plain,))),
            "reencode": False,
        }
    )
    ping = {"nonce": 1}
    vectors += [
        invalid(
            "bad_magic",
            "a TLS ClientHello where a frame should be",
            bytes.fromhex("160301020001000001fc0303") + bytes(12),
            "protocol.bad_magic",
            h,
        ),
        invalid(
            "bad_version", "header version 2", raw_frame(10, ping, version=2), "protocol.version", h
        ),
        invalid("unknown_kind", "frame kind 99", raw_frame(99, ping), "protocol.unknown_kind", h),
        invalid(
            "metadata_too_long",
            "metadata length 2 GiB (limit 1 MiB)",
            raw_frame(10, ping, meta_len=1 << 31),
            "protocol.limit",
            h,
        ),
        invalid(
            "payload_too_long",
            "payload length 1 TiB (limit 512 MiB)",
            raw_frame(2, {"method": "m"}, b"", stream_id=1, payload_len=1 << 40),
            "protocol.limit",
            h,
        ),
        invalid(
            "truncated",
            "a Ping frame cut short, then EOF",
            raw_frame(10, ping)[:-1],
            "protocol.truncated",
            h,
        ),
        invalid(
            "bad_msgpack",
            "metadata that is not msgpack",
            raw_frame(10, b"\xc1"),
            "protocol.metadata",
            h,
        ),
        invalid(
            "missing_field", "a Ping without its nonce", raw_frame(10, {}), "protocol.message", h
        ),
        invalid(
            "payload_size",
            "an f16 [2, 2] tensor with 6 bytes",
            raw_frame(
                2, {"method": "m", "tensors": [["f16", [2, 2], "raw", 6]]}, bytes(6), stream_id=1
            ),
            "protocol.payload_size",
            h,
        ),
        invalid(
            "unknown_stream",
            "data on a stream nobody opened",
            raw_frame(5, {"meta": {}}, stream_id=9),
            "protocol.stream_state",
            h,
        ),
        invalid(
            "wrong_parity",
            "the dialer opening an even stream",
            raw_frame(2, {"method": "m"}, stream_id=2),
            "protocol.stream_state",
            h,
        ),
    ]
    bomb = zstandard.ZstdCompressor().compress(bytes(16 << 20))
    vectors.append(
        invalid(
            "zstd_bomb",
            "a zstd frame declaring 16 MiB for a 4-element tensor",
            raw_frame(
                2,
                {"method": "m", "tensors": [["f16", [4], "shuffle-zstd", len(bomb)]]},
                bomb,
                stream_id=1,
                flags=1,
            ),
            "protocol.decompression",
            h,
        )
    )
    return {
        "protocol_version": wire.PROTOCOL_VERSION,
        "header": {"size": HEADER.size, "struct": HEADER.format, "magic": MAGIC.hex()},
        "vectors": vectors,
    }


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    vectors = build()
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {OUT}: {len(vectors['vectors'])} vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
