"""Streamed text: pieces printed as tokens come add up to the whole decode,
with no U+FFFD for a character split over several byte tokens."""

from __future__ import annotations

from pathlib import Path

from libpipe.client import TextStream
from libpipe.client._tokenizer import TextCodec
from libpipe.model._random_checkpoint import write_byte_tokenizer


def _codec(tmp_path: Path) -> TextCodec:
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    codec = TextCodec.from_checkpoint(tmp_path, 256)
    assert codec is not None
    return codec


def test_multibyte_characters_stream_whole(tmp_path: Path) -> None:
    codec = _codec(tmp_path)
    text = "héllo wörld ✓ 🙂!"
    ids = codec.encode(text)
    assert len(ids) > len(text)  # some characters span several tokens
    stream = TextStream(codec.decode)
    pieces = [stream.push(token) for token in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == text
    assert stream.flush() == ""


def test_flush_emits_a_truncated_character(tmp_path: Path) -> None:
    codec = _codec(tmp_path)
    ids = codec.encode("a🙂")[:-1]  # generation stopped mid-character
    stream = TextStream(codec.decode)
    pieces = "".join(stream.push(token) for token in ids)
    assert pieces == "a"
    assert pieces + stream.flush() == codec.decode(ids)
