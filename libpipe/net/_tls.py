"""Admission: TLS 1.3 with mutual authentication against the swarm CA.

Identity is the peer id carried by the certificate's key, not a host name
(nodes move between addresses and have no DNS names), so host name checking
is off and a caller that knows whom it dials pins the peer id instead.
Plaintext exists for local development only, and says so loudly.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..errors import AuthenticationError, ConfigError, ConnectionBrokenError
from ._ca import NodeCredentials, load_certificate, peer_id_from_certificate
from ._identity import Identity, short_peer_id
from ._transport import SocketStream

logger = logging.getLogger("libpipe.net")

# A TLS 1.3 handshake with Ed25519 certificates takes ~4 ms on loopback and
# a few RTTs on a WAN; ten seconds only ever catches a peer that stalls.
HANDSHAKE_TIMEOUT = 10.0
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Security:
    """How a node authenticates itself and its peers.

    ``credentials`` set: mutual TLS 1.3 against the swarm CA. ``None``:
    plaintext, no authentication (``Security.insecure()``); the peer id a
    peer announces is then only a claim."""

    identity: Identity
    credentials: NodeCredentials | None = None
    allow_public_insecure: bool = False
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    _warned: list[bool] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.handshake_timeout > 0:
            raise ConfigError("handshake_timeout must be positive")
        if self.credentials is not None and self.credentials.identity is not self.identity:
            raise ConfigError("identity must be the credentials' identity")

    @classmethod
    def tls(
        cls, credentials: NodeCredentials, *, handshake_timeout: float = HANDSHAKE_TIMEOUT
    ) -> Security:
        return cls(credentials.identity, credentials, handshake_timeout=handshake_timeout)

    @classmethod
    def from_files(
        cls,
        identity: str | os.PathLike[str],
        ca: str | os.PathLike[str] | None = None,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> Security:
        """The ``--identity DIR`` / ``--ca FILE`` options: ``ca`` overrides
        the CA certificate stored in the identity directory."""
        credentials = NodeCredentials.load(identity)
        if ca is not None:
            try:
                ca_pem = Path(ca).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read CA certificate {ca}: {exc.strerror}") from exc
            load_certificate(ca_pem)
            credentials = NodeCredentials(credentials.identity, credentials.cert_pem, ca_pem)
        return cls.tls(credentials, handshake_timeout=handshake_timeout)

    @classmethod
    def insecure(
        cls,
        identity: Identity | None = None,
        *,
        allow_public: bool = False,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> Security:
        return cls(
            identity or Identity.generate(),
            None,
            allow_public_insecure=allow_public,
            handshake_timeout=handshake_timeout,
        )

    @classmethod
    def from_options(
        cls,
        *,
        identity: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        allow_public_insecure: bool = False,
    ) -> Security:
        """The command line's ``--identity/--ca/--insecure/--allow-public-insecure``,
        checked as a whole so that a contradiction is an error, not a guess."""
        if insecure:
            if identity is not None or ca is not None:
                raise ConfigError("--insecure cannot be combined with --identity or --ca")
            return cls.insecure(allow_public=allow_public_insecure)
        if allow_public_insecure:
            raise ConfigError("--allow-public-insecure only makes sense with --insecure")
        if identity is None:
            raise ConfigError(
                "give --identity DIR (made by `libpipe ca issue`), or --insecure for local development"
            )
        return cls.from_files(identity, ca)

    @property
    def is_tls(self) -> bool:
        return self.credentials is not None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    @functools.cached_property
    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT)

    def _context(self, protocol: int) -> ssl.SSLContext:
        if self.credentials is None:
            raise ConfigError("an insecure Security has no TLS context")
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.credentials.ca_cert_pem.decode("ascii"))
        # ssl loads keys from files only: a private directory that lives for
        # the duration of the call.
        with tempfile.TemporaryDirectory(prefix="libpipe-tls-") as tmp:
            cert, key = Path(tmp, "node.crt"), Path(tmp, "node.key")
            cert.write_bytes(self.credentials.cert_pem)
            self.identity.save_key(key)
            ctx.load_cert_chain(cert, key)
        return ctx

    def warn_insecure(self, what: str) -> None:
        if not self._warned:
            self._warned.append(True)
            logger.warning(
                "INSECURE: %s without TLS: no authentication, no encryption. "
                "For local development only.",
                what,
            )


@dataclass(frozen=True)
class SecureChannel:
    """A connected stream and who is at the other end.

    ``peer_id`` is verified (from the peer's certificate) under TLS, and
    ``None`` when plaintext gives nothing to verify."""

    stream: SocketStream
    peer_id: str | None


def check_bind_allowed(host: str, security: Security) -> None:
    """Plaintext may listen on loopback; anywhere else only when told twice."""
    if security.is_tls:
        return
    security.warn_insecure(f"listening on {host}")
    if security.allow_public_insecure or _is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve plaintext on non-loopback address {host!r}; "
        "pass allow_public_insecure=True (--allow-public-insecure) if you really mean it"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def dial(
    host: str, port: int, security: Security, *, expected_peer_id: str | None = None
) -> SecureChannel:
    """Open TCP, run the TLS handshake, check the peer id when pinned."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionBrokenError(f"cannot connect to {host}:{port}: {exc}") from exc
    sock = socket.socket(fileno=tcp.socket.detach())
    if not security.is_tls:
        security.warn_insecure(f"connecting to {host}:{port}")
        return SecureChannel(SocketStream(sock), None)
    tls_sock = security.client_context.wrap_socket(
        sock, server_side=False, do_handshake_on_connect=False
    )
    stream = SocketStream(tls_sock)
    try:
        peer_id = await _handshake(stream, security, f"{host}:{port}")
        if expected_peer_id is not None and peer_id != expected_peer_id:
            raise AuthenticationError(
                f"{host}:{port} is {short_peer_id(peer_id)}, expected {short_peer_id(expected_peer_id)}",
                peer_id=peer_id,
                expected_peer_id=expected_peer_id,
            )
    except BaseException:
        stream.close()
        raise
    return SecureChannel(stream, peer_id)


async def accept(sock: socket.socket, security: Security, address: str) -> SecureChannel:
    """Run the server side of admission on an accepted socket."""
    if not security.is_tls:
        return SecureChannel(SocketStream(sock), None)
    tls_sock = security.server_context.wrap_socket(
        sock, server_side=True, do_handshake_on_connect=False
    )
    stream = SocketStream(tls_sock)
    try:
        peer_id = await _handshake(stream, security, address)
    except BaseException:
        stream.close()
        raise
    return SecureChannel(stream, peer_id)


async def _handshake(stream: SocketStream, security: Security, address: str) -> str:
    with trio.move_on_after(security.handshake_timeout) as scope:
        try:
            await stream.do_handshake()
        except ssl.SSLError as exc:
            raise AuthenticationError(
                f"TLS handshake with {address} failed: {_explain(exc)}", address=address
            ) from exc
        except OSError as exc:
            raise ConnectionBrokenError(
                f"TLS handshake with {address} failed: {exc}", address=address
            ) from exc
    if scope.cancelled_caught:
        raise AuthenticationError(
            f"TLS handshake with {address} did not finish in {security.handshake_timeout} s",
            address=address,
        )
    der = stream.peer_certificate_der()
    if der is None:
        raise AuthenticationError(f"{address} presented no certificate", address=address)
    return peer_id_from_certificate(der)


def _explain(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate is not acceptable ({exc.verify_message})"
    reason = exc.reason or str(exc)
    if "ALERT" in reason.upper():
        return f"it refused our certificate ({reason})"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING"):
        return f"it does not speak TLS ({reason}); is it running --insecure?"
    return reason


async def open_listener(host: str, port: int, security: Security) -> trio.socket.SocketType:
    """Bind and listen (port 0 picks a free one); plaintext only where allowed."""
    check_bind_allowed(host, security)
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise ConfigError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    listener = trio.socket.socket(family, type_, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(sockaddr)
        listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return listener


async def accept_socket(listener: trio.socket.SocketType) -> tuple[socket.socket, str]:
    """The next accepted connection as a stdlib socket, with its address."""
    trio_sock, addr = await listener.accept()
    return socket.socket(fileno=trio_sock.detach()), f"{addr[0]}:{addr[1]}"
