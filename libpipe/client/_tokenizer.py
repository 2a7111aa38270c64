"""Text in and out, when the checkpoint ships a ``tokenizer.json``.

Token ids always work; text needs the Hugging Face ``tokenizers`` file that
sits beside ``config.json``. Without it, passing text is a ``ConfigError``
that says so, rather than a guess at some default vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    """Encodes prompts and decodes generated ids with the checkpoint's tokenizer."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size

    @classmethod
    def from_checkpoint(cls, model_dir: Path, vocab_size: int) -> TextCodec | None:
        """The checkpoint's tokenizer, or None when it has no ``tokenizer.json``."""
        path = model_dir / TOKENIZER_FILE
        if not path.exists():
            return None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises bare Exceptions
            raise CheckpointError(f"cannot read {path}: {exc}", path=str(path)) from None
        return cls(tokenizer, vocab_size)

    def encode(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ConfigError("the prompt encodes to no tokens")
        if max(ids) >= self._vocab_size:
            raise CheckpointError(
                f"tokenizer produced id {max(ids)}, outside the model's vocabulary of {self._vocab_size}"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


class TextStream:
    """Generated ids to text, piece by piece, for printing as tokens come.

    Decoding one token at a time is wrong twice: a character split over
    several byte tokens decodes to U+FFFD per token, and decoders that strip
    a leading space (SentencePiece) lose the spaces between pieces. So each
    ``push`` decodes a short window of recent ids and emits only what was
    added past the text already emitted, holding back a tail that still ends
    in an incomplete character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: context for the decoder, never re-emitted
        self._read = 0  # ids[_prefix:_read] decode to text already emitted

    def push(self, token: int) -> str:
        """The new text that ``token`` completes ("" while it is partial)."""
        self._ids.append(token)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back (generation ended mid-character)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]


def require_codec(codec: TextCodec | None, model_dir: Path) -> TextCodec:
    if codec is None:
        raise ConfigError(
            f"text needs {model_dir / TOKENIZER_FILE}, which this checkpoint lacks; pass token ids"
        )
    return codec
