"""The open inference sessions of a server: counted for ``info`` and gossip,
waited for while draining, and ended with ``DrainingError`` when the drain
grace period runs out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from ..errors import DrainingError


@dataclass(eq=False)
class SessionEntry:
    id: int
    peer: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    kicked: bool = False
    closed: trio.Event = field(default_factory=trio.Event)


class SessionTable:
    def __init__(self) -> None:
        self._open: dict[int, SessionEntry] = {}
        self._ids = itertools.count(1)
        self._emptied = trio.Event()
        self._emptied.set()
        # Unary forward/backward calls in progress (a drain waits for them too).
        self.calls_in_flight = 0

    def __len__(self) -> int:
        return len(self._open)

    @contextmanager
    def session(self, peer: str) -> Iterator[SessionEntry]:
        """Register a session for the block's duration. Inside it, the
        handler runs under ``entry.scope``; if ``kick_all`` cancels that
        scope, leaving raises ``DrainingError`` for the client to hear."""
        entry = SessionEntry(next(self._ids), peer)
        self._open[entry.id] = entry
        self._busy()
        try:
            with entry.scope:
                yield entry
            if entry.kicked:
                raise DrainingError("the server shut down before this session ended")
        finally:
            del self._open[entry.id]
            entry.closed.set()
            self._check_empty()

    @contextmanager
    def call(self) -> Iterator[None]:
        self.calls_in_flight += 1
        self._busy()
        try:
            yield
        finally:
            self.calls_in_flight -= 1
            self._check_empty()

    async def wait_idle(self) -> None:
        """Until no session is open and no call is in flight."""
        while self._open or self.calls_in_flight:
            await self._emptied.wait()

    def open_entries(self) -> list[SessionEntry]:
        return list(self._open.values())

    def kick_all(self) -> None:
        self.kick(self.open_entries())

    def kick(self, entries: list[SessionEntry]) -> None:
        """End these sessions with ``DrainingError`` (a move or a drain ran out of grace)."""
        for entry in entries:
            entry.kicked = True
            entry.scope.cancel()

    def _busy(self) -> None:
        # A fresh event only once the old one fired: a drain may be waiting on it.
        if self._emptied.is_set():
            self._emptied = trio.Event()

    def _check_empty(self) -> None:
        if not self._open and not self.calls_in_flight:
            self._emptied.set()
