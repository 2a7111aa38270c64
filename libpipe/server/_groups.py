"""Errors out of nurseries as themselves: callers catch ``ConnectionBrokenError``,
not an exception group holding one."""

from __future__ import annotations


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested groups of one; anything else unchanged."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
