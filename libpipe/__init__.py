"""libpipe: run large language models across many small, unreliable GPUs.

This module only re-exports; implementations live in the subpackages.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from .errors import (
    AuthenticationError as AuthenticationError,
)
from .errors import (
    BusyError as BusyError,
)
from .errors import (
    CacheFullError as CacheFullError,
)
from .errors import (
    ConfigError as ConfigError,
)
from .errors import (
    ConnectionBrokenError as ConnectionBrokenError,
)
from .errors import (
    ConnectionClosedError as ConnectionClosedError,
)
from .errors import (
    DeadlineExceededError as DeadlineExceededError,
)
from .errors import (
    LibpipeError as LibpipeError,
)
from .errors import (
    NoRouteError as NoRouteError,
)
from .errors import (
    ProtocolError as ProtocolError,
)
from .errors import (
    RemoteError as RemoteError,
)

if _TYPE_CHECKING:
    from .client import Client as Client
    from .client import SyncClient as SyncClient

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
