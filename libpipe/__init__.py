"""libpipe: run large language models across many small, unreliable GPUs.

This module only re-exports; implementations live in the subpackages.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING, Any as _Any

from .errors import (
    AuthenticationError as AuthenticationError,
    BadMagicError as BadMagicError,
    BusyError as BusyError,
    CacheFullError as CacheFullError,
    CheckpointError as CheckpointError,
    ConfigError as ConfigError,
    ConnectionBrokenError as ConnectionBrokenError,
    ConnectionClosedError as ConnectionClosedError,
    DeadlineExceededError as DeadlineExceededError,
    DecompressionError as DecompressionError,
    DrainingError as DrainingError,
    IncompatiblePeerError as IncompatiblePeerError,
    InvalidMessageError as InvalidMessageError,
    InvalidRequestError as InvalidRequestError,
    LibpipeError as LibpipeError,
    LimitExceededError as LimitExceededError,
    MalformedMetadataError as MalformedMetadataError,
    NonFiniteError as NonFiniteError,
    NoRouteError as NoRouteError,
    PayloadMismatchError as PayloadMismatchError,
    ProtocolError as ProtocolError,
    RecordError as RecordError,
    RemoteError as RemoteError,
    RetriesExhaustedError as RetriesExhaustedError,
    SessionError as SessionError,
    StreamStateError as StreamStateError,
    TensorOverflowError as TensorOverflowError,
    TruncatedFrameError as TruncatedFrameError,
    UnknownFrameKindError as UnknownFrameKindError,
    UnsupportedModelError as UnsupportedModelError,
    UnsupportedVersionError as UnsupportedVersionError,
)

if _TYPE_CHECKING:
    from .client import Client as Client, SyncClient as SyncClient

__version__ = "0.1.0"

# The client pulls in torch and trio; loading it on first use keeps
# `import libpipe.errors` (and so `libpipe --help`) instant.
_LAZY = {"Client": "client", "SyncClient": "client"}


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
