"""Text in and out, when the checkpoint ships a ``tokenizer.json``.

Token ids always work; text needs the Hugging Face ``tokenizers`` file that
sits beside ``config.json``. Without it, passing text is a ``ConfigError``
that says so, rather than a guess at some default vocabulary.
"""

from __future__ import annotations

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


def require_codec(codec: TextCodec | None, model_dir: Path) -> TextCodec:
    if codec is None:
        raise ConfigError(
            f"text needs {model_dir / TOKENIZER_FILE}, which this checkpoint lacks; pass token ids"
        )
    return codec
