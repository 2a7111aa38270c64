"""The swarm CA: the certificate authority that defines a private swarm.

A node may join only with a certificate the swarm CA signed (mutual TLS).
Everything is Ed25519; a node certificate's subject key *is* the node's
identity key, so the peer id is recovered from the certificate alone and
nothing else needs to be trusted about its subject name.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import AuthenticationError, ConfigError
from ._identity import Identity, peer_id_from_public_key

# A swarm CA outlives its nodes; ten years means "until you rotate it".
CA_VALIDITY = datetime.timedelta(days=3650)
# A node certificate is re-issued about yearly; short enough that a leaked
# key does not stay useful forever, long enough not to be a chore.
NODE_VALIDITY = datetime.timedelta(days=365)
# Tolerates clocks a little behind the issuer's.
BACKDATE = datetime.timedelta(minutes=5)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
KEY_FILE = "node.key"
CERT_FILE = "node.crt"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate_public_key(cert_pem: bytes) -> bytes:
    """The raw Ed25519 public key inside a PEM certificate."""
    return _public_key_of(load_certificate(cert_pem))


def peer_id_from_certificate(cert: bytes | x509.Certificate) -> str:
    """The peer id of a certificate given as PEM, DER or a parsed object."""
    if not isinstance(cert, x509.Certificate):
        cert = load_certificate(cert)
    return peer_id_from_public_key(_public_key_of(cert))


def load_certificate(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise AuthenticationError("not a valid X.509 certificate") from exc


def _public_key_of(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AuthenticationError("certificate key is not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SwarmCA:
    """A swarm CA's key and self-signed certificate."""

    identity: Identity
    cert_pem: bytes

    @classmethod
    def create(cls, name: str = "libpipe swarm CA") -> SwarmCA:
        identity = Identity.generate()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(identity.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(identity.public_key), critical=False
            )
            .sign(identity.private_key, algorithm=None)
        )
        return cls(identity, cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        identity: Identity | None = None,
        *,
        not_before: datetime.datetime | None = None,
        validity: datetime.timedelta = NODE_VALIDITY,
    ) -> NodeCredentials:
        """Sign a node certificate for ``identity`` (a fresh one by default).

        ``not_before`` and ``validity`` exist so tests can make expired
        certificates the same way real ones are made."""
        if not name or len(name) > 64:
            raise ConfigError("a node name is 1 to 64 characters")
        identity = identity or Identity.generate()
        start = not_before or _now() - BACKDATE
        ca_cert = load_certificate(self.cert_pem)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_cert.subject)
            .public_key(identity.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.identity.public_key),
                critical=False,
            )
            .sign(self.identity.private_key, algorithm=None)
        )
        return NodeCredentials(
            identity, cert.public_bytes(serialization.Encoding.PEM), self.cert_pem
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        root = Path(directory)
        if (root / CA_KEY_FILE).exists():
            raise ConfigError(f"{root} already holds a swarm CA; refusing to overwrite it")
        self.identity.save_key(root / CA_KEY_FILE)
        (root / CA_CERT_FILE).write_bytes(self.cert_pem)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SwarmCA:
        root = Path(directory)
        identity = Identity.load_key(root / CA_KEY_FILE)
        cert_pem = _read(root / CA_CERT_FILE)
        if certificate_public_key(cert_pem) != identity.public_key_bytes:
            raise ConfigError(f"{root / CA_CERT_FILE} does not belong to {root / CA_KEY_FILE}")
        return cls(identity, cert_pem)


@dataclass(frozen=True)
class NodeCredentials:
    """A node identity with its certificate and the swarm CA certificate:
    what a node needs to join (the contents of an identity directory)."""

    identity: Identity
    cert_pem: bytes
    ca_cert_pem: bytes

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def save(self, directory: str | os.PathLike[str]) -> None:
        root = Path(directory)
        self.identity.save_key(root / KEY_FILE)
        (root / CERT_FILE).write_bytes(self.cert_pem)
        (root / CA_CERT_FILE).write_bytes(self.ca_cert_pem)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> NodeCredentials:
        """Load an identity directory; refuses a certificate that is not the key's."""
        root = Path(directory)
        identity = Identity.load_key(root / KEY_FILE)
        cert_pem = _read(root / CERT_FILE)
        ca_cert_pem = _read(root / CA_CERT_FILE)
        if certificate_public_key(cert_pem) != identity.public_key_bytes:
            raise ConfigError(f"{root / CERT_FILE} does not belong to {root / KEY_FILE}")
        load_certificate(ca_cert_pem)
        return cls(identity, cert_pem, ca_cert_pem)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
