"""libpipe: run large language models across many small, unreliable GPUs.

This module only re-exports; implementations live in the subpackages.
"""

from .errors import (
    AuthenticationError as AuthenticationError,
    BusyError as BusyError,
    CacheFullError as CacheFullError,
    ConfigError as ConfigError,
    ConnectionBrokenError as ConnectionBrokenError,
    ConnectionClosedError as ConnectionClosedError,
    DeadlineExceededError as DeadlineExceededError,
    LibpipeError as LibpipeError,
    NoRouteError as NoRouteError,
    ProtocolError as ProtocolError,
    RemoteError as RemoteError,
)

__version__ = "0.1.0"
