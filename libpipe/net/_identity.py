"""Node identity: one Ed25519 key per node, and the peer id derived from it.

The peer id is what every other layer names a node by (gossip records, bans,
routing). It is a hash of the raw public key, so anyone holding the key can
check a claimed id, and it is printed in base32 so it survives logs, file
names and URLs without quoting.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError

# 20 bytes of SHA-256 = 160 bits: collision-safe for any swarm size, and an
# exact 32 base32 characters (160 / 5) so no padding is ever needed.
PEER_ID_HASH_BYTES = 20
# 8 base32 characters = 40 bits: unambiguous in a log of thousands of nodes.
SHORT_ID_CHARS = 8
PUBLIC_KEY_BYTES = 32


def peer_id_from_public_key(public_key: bytes | Ed25519PublicKey) -> str:
    """The peer id of a raw 32-byte Ed25519 public key (or key object)."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif (
        isinstance(public_key, bytes | bytearray | memoryview)
        and len(public_key) == PUBLIC_KEY_BYTES
    ):
        raw = bytes(public_key)
    else:
        raise ConfigError("a public key is 32 raw Ed25519 bytes")
    digest = hashlib.sha256(raw).digest()[:PEER_ID_HASH_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


def short_peer_id(peer_id: str) -> str:
    """The log-friendly prefix of a peer id."""
    return peer_id[:SHORT_ID_CHARS]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is the key's Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """A node's private key and what is derived from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_key_bytes(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key_bytes)

    @property
    def short_id(self) -> str:
        return short_peer_id(self.peer_id)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save_key(self, path: str | os.PathLike[str]) -> None:
        """Write the private key readable by its owner only (0600 from birth,
        so there is no window where another user could read it)."""
        write_private(Path(path), self.private_key_pem())

    @classmethod
    def load_key(cls, path: str | os.PathLike[str]) -> Identity:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read identity key {path}: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return cls(key)


def write_private(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with mode 0600 before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
