"""The one error hierarchy of libpipe.

Each class has one meaning and a stable ``kind`` string. The kind is what
travels over the wire: a server that raises ``CacheFullError`` sends
``("cache_full", message, details)`` and the client re-raises a
``CacheFullError`` with the same message and details (``error_from_remote``).
``details`` must therefore hold only msgpack-able values (str, int, float,
bool, None, lists and dicts of those).

Kinds are append-only: a kind, once released, keeps its meaning forever,
because an older peer maps it back onto its own classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

_BY_KIND: dict[str, type[LibpipeError]] = {}


class LibpipeError(Exception):
    """Base of every error libpipe raises on purpose."""

    kind: ClassVar[str] = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details
        # True when this instance was rebuilt from a peer's error report.
        self.remote = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if cls.kind in _BY_KIND:
                raise TypeError(f"error kind {cls.kind!r} is already taken by {_BY_KIND[cls.kind]}")
            _BY_KIND[cls.kind] = cls

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps details when errors cross process boundaries (pickling).
        return (_rebuild, (type(self), self.message, self.details, self.remote))


def _rebuild(
    cls: type[LibpipeError], message: str, details: dict[str, Any], remote: bool
) -> LibpipeError:
    err = cls(message, **details)
    err.remote = remote
    return err


# --- configuration and input -------------------------------------------------


class ConfigError(LibpipeError, ValueError):
    """A setting, argument or file given by the user is invalid."""

    kind = "config"


class InvalidRequestError(LibpipeError, ValueError):
    """A request is well-formed on the wire but makes no sense: bad shape,
    dtype, span or position. The peer that sent it is at fault."""

    kind = "invalid_request"


class TensorOverflowError(LibpipeError, ValueError):
    """Casting a tensor down to the wire dtype would produce infinities."""

    kind = "tensor_overflow"


# --- wire protocol -------------------------------------------------------------


class ProtocolError(LibpipeError):
    """The peer broke the wire protocol. After one, that connection is dead."""

    kind = "protocol"


class BadMagicError(ProtocolError):
    kind = "protocol.bad_magic"


class UnsupportedVersionError(ProtocolError):
    kind = "protocol.version"


class UnknownFrameKindError(ProtocolError):
    kind = "protocol.unknown_kind"


class LimitExceededError(ProtocolError):
    """A declared length is over a configured limit; nothing was allocated."""

    kind = "protocol.limit"


class TruncatedFrameError(ProtocolError):
    kind = "protocol.truncated"


class MalformedMetadataError(ProtocolError):
    """The metadata is not valid msgpack."""

    kind = "protocol.metadata"


class InvalidMessageError(ProtocolError):
    """The metadata decodes but does not have the fields its kind requires."""

    kind = "protocol.message"


class PayloadMismatchError(ProtocolError):
    """The payload size disagrees with the declared dtype x shape."""

    kind = "protocol.payload_size"


class DecompressionError(ProtocolError):
    """A compressed payload is corrupt or would expand past its declared size."""

    kind = "protocol.decompression"


class StreamStateError(ProtocolError):
    """A frame is not allowed in the stream's current state."""

    kind = "protocol.stream_state"


# --- transport -----------------------------------------------------------------


class ConnectionClosedError(LibpipeError):
    """We closed the connection (or stream) and then tried to use it."""

    kind = "closed"


class ConnectionBrokenError(LibpipeError):
    """The peer went away or the connection failed under us."""

    kind = "broken"


class AuthenticationError(LibpipeError):
    """TLS, certificate or peer-id verification failed."""

    kind = "auth"


class IncompatiblePeerError(LibpipeError):
    """The peer speaks another protocol version, model or dtype."""

    kind = "incompatible"


class BusyError(LibpipeError):
    """The peer refuses more work right now (stream cap, queue full)."""

    kind = "busy"


class DeadlineExceededError(LibpipeError, TimeoutError):
    """A call did not finish before its deadline."""

    kind = "deadline"


class RemoteError(LibpipeError):
    """The peer failed with an error this side has no class for."""

    kind = "remote"


# --- model and serving ---------------------------------------------------------


class UnsupportedModelError(LibpipeError):
    """The checkpoint's architecture or an option of it is not supported."""

    kind = "unsupported_model"


class CheckpointError(LibpipeError):
    """A checkpoint is missing files or tensors, or they are inconsistent."""

    kind = "checkpoint"


class CacheFullError(LibpipeError):
    """The KV cache budget cannot hold the session asked for.

    details: ``requested`` and ``free`` in bytes."""

    kind = "cache_full"


class SessionError(LibpipeError):
    """An inference session is unknown, closed, timed out or past max_length."""

    kind = "session"


class DrainingError(LibpipeError):
    """The server is shutting down or moving and takes no new sessions."""

    kind = "draining"


# --- client and swarm ------------------------------------------------------------


class NoRouteError(LibpipeError):
    """No chain of servers covers the model. details: ``missing_blocks``."""

    kind = "no_route"


class RetriesExhaustedError(LibpipeError):
    """Failover gave up after its bounded number of attempts."""

    kind = "retries_exhausted"


class NonFiniteError(LibpipeError):
    """Values that must be finite (logits, activations) hold NaN or
    infinity: a faulty server or a broken local head. details: ``nan`` and
    ``inf`` (how many of each)."""

    kind = "non_finite"


class RecordError(LibpipeError):
    """A gossiped server record is forged, tampered with or expired."""

    kind = "record"


def error_from_remote(
    kind: str, message: str, details: dict[str, Any] | None = None
) -> LibpipeError:
    """Rebuild the error a peer reported, as the same class when we know it."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        err: LibpipeError = RemoteError(f"{kind}: {message}", remote_kind=kind, **(details or {}))
    else:
        try:
            err = cls(message, **(details or {}))
        except TypeError:
            err = cls(message)
    err.remote = True
    return err


def error_kinds() -> dict[str, type[LibpipeError]]:
    """Every known kind and its class (a copy; for specs and tests)."""
    return dict(_BY_KIND)


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups of one; anything else
    unchanged. Nurseries wrap what their tasks raise, and callers want to
    catch ``ConnectionBrokenError`` itself, not a group holding one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
