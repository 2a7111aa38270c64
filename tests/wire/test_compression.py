"""zstd negotiation, the byte-shuffle, zstd bombs, and fp16 overflow."""

from __future__ import annotations

import pytest
import torch
import zstandard

from libpipe.errors import DecompressionError, InvalidMessageError, TensorOverflowError
from libpipe.wire import FrameKind, Request, cast_for_wire
from libpipe.wire._tensors import COMPRESS_MIN_BYTES, shuffle, unshuffle_into


def _activations(n=64 * 1024):
    """fp16 values with short mantissas: compressible once shuffled."""
    gen = torch.Generator().manual_seed(1)
    return ((torch.randn(n, generator=gen) * 8).round() / 8).half()


def _sent_size(conn, event):
    return sum(memoryview(b).nbytes for b in conn.send(event))


@pytest.mark.parametrize(
    ("offers", "expected"),
    [((True, True), True), ((True, False), False), ((False, True), False)],
)
def test_compression_needs_both_offers(make_pair, offers, expected):
    pair = make_pair(compression=offers)
    assert pair.dialer.compression_active is expected
    assert pair.acceptor.compression_active is expected
    t = _activations()
    sent = _sent_size(pair.dialer, Request(1, "m", {}, (t,)))
    assert (sent < t.numel() * 2) is expected


def test_compressed_round_trip(pair):
    t = _activations().view(2, -1)
    event = pair.deliver(pair.dialer, Request(1, "m", {}, (t, _activations(16))))
    assert torch.equal(event.tensors[0], t)
    assert event.tensors[0].shape == t.shape


def test_incompressible_payload_stays_raw(pair):
    noise = torch.randint(0, 256, (COMPRESS_MIN_BYTES * 2,), dtype=torch.uint8)
    buffers = pair.dialer.send(Request(1, "m", {}, (noise,)))
    assert any(isinstance(b, memoryview) and b.nbytes == noise.numel() for b in buffers)


def test_small_payload_is_not_compressed(pair):
    t = torch.zeros(COMPRESS_MIN_BYTES // 2 - 1, dtype=torch.float16)
    assert _sent_size(pair.dialer, Request(1, "m", {}, (t,))) > t.numel() * 2


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_shuffle_round_trip(itemsize):
    raw = bytes(range(256)) * itemsize
    planes = shuffle(memoryview(raw), itemsize).tobytes()
    assert planes[: len(raw) // itemsize] == raw[itemsize - 1 :: itemsize]  # high bytes first
    out = bytearray(len(raw))
    unshuffle_into(planes, itemsize, memoryview(out))
    assert bytes(out) == raw


def _zstd_frame(tools, body, shape, codec="shuffle-zstd", dtype="f16"):
    return tools.raw_frame(
        FrameKind.REQUEST,
        {"method": "m", "tensors": [[dtype, shape, codec, len(body)]]},
        body,
        stream_id=1,
        flags=1,
    )


def test_zstd_bomb_is_rejected_from_its_header(pair, tools):
    # 1 GiB of zeros compresses to a few KiB; the tensor claims 8 bytes
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))
    with pytest.raises(DecompressionError, match="declares 16777216 bytes"):
        tools.feed(pair.acceptor, _zstd_frame(tools, bomb, [4]))


def test_zstd_frame_without_a_content_size_is_rejected(pair, tools):
    body = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8))
    with pytest.raises(DecompressionError, match="declares -1 bytes"):
        tools.feed(pair.acceptor, _zstd_frame(tools, body, [4]))


def test_zstd_trailing_bytes_are_rejected(pair, tools):
    body = zstandard.ZstdCompressor().compress(bytes(8)) + b"junk"
    with pytest.raises(DecompressionError, match="4 trailing bytes"):
        tools.feed(pair.acceptor, _zstd_frame(tools, body, [4]))


def test_corrupt_zstd_is_rejected(pair, tools):
    body = bytearray(zstandard.ZstdCompressor().compress(bytes(range(256)) * 64))
    body[-6] ^= 0xFF
    with pytest.raises(DecompressionError):
        tools.feed(pair.acceptor, _zstd_frame(tools, bytes(body), [8192]))


def test_not_zstd_at_all(pair, tools):
    with pytest.raises(DecompressionError, match="not a zstd frame"):
        tools.feed(pair.acceptor, _zstd_frame(tools, b"\x00" * 16, [4]))


def test_compressed_frame_when_zstd_was_not_offered(make_pair, tools):
    pair = make_pair(compression=(True, False))
    body = zstandard.ZstdCompressor().compress(bytes(8))
    with pytest.raises(DecompressionError, match="did not offer zstd"):
        tools.feed(pair.acceptor, _zstd_frame(tools, body, [4]))


def test_compressed_flag_must_match_the_codecs(pair, tools):
    frame = tools.raw_frame(
        FrameKind.REQUEST,
        {"method": "m", "tensors": [["u8", [8], "raw", 8]]},
        bytes(8),
        stream_id=1,
        flags=1,
    )
    with pytest.raises(InvalidMessageError, match="COMPRESSED flag"):
        tools.feed(pair.acceptor, frame)


def test_cast_for_wire_detects_fp16_overflow():
    t = torch.tensor([1.0, 70000.0, -1e6, float("inf")])
    with pytest.raises(TensorOverflowError, match="overflows 2 value") as info:
        cast_for_wire(t)
    assert info.value.details["count"] == 2
    assert info.value.details["max_abs"] == 1e6


def test_cast_for_wire_keeps_existing_infinities_and_fitting_values():
    t = torch.tensor([1.0, 65504.0, float("-inf")])
    out = cast_for_wire(t)
    assert out.dtype == torch.float16
    assert torch.equal(out.float(), t)
    same = torch.ones(3, dtype=torch.float16)
    assert cast_for_wire(same) is same
    assert cast_for_wire(torch.tensor([1e30]), torch.bfloat16).isfinite().all()
