"""A transmit-limited queue of news, piggybacked on whatever we send.

memberlist's TransmitLimitedQueue, reshaped: news goes out fewest
transmissions first (fresh news spreads fastest), newest first among equals,
and leaves the queue after ``limit(n)`` transmissions. News is keyed by the
member it is about, so newer news about a member replaces the older before
it wastes a single byte. Entries live in buckets by transmission count, so
a take sorts only the buckets it reaches (usually just the first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Each entry costs a few bytes of list framing on top of its own size.
_ENTRY_OVERHEAD = 2
# No message is smaller than this (a msgpack map with a type and a peer id),
# so a budget with less left is full: stop scanning the queue.
_MIN_MESSAGE = 32


@dataclass
class _Entry:
    key: str
    message: Any
    size: int
    seq: int
    transmits: int = 0


class BroadcastQueue:
    """News waiting to be piggybacked; ``limit`` maps live members to retransmits."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._by_key: dict[str, _Entry] = {}
        # transmits -> {key: entry}.
        self._buckets: dict[int, dict[str, _Entry]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def transmits(self, key: str) -> int | None:
        """How often the news about ``key`` went out (None when not queued)."""
        entry = self._by_key.get(key)
        return None if entry is None else entry.transmits

    def queue(self, key: str, message: Any, size: int) -> None:
        """Queue news about ``key``, dropping any older news about it."""
        self._drop(key)
        self._seq += 1
        entry = _Entry(key, message, size, self._seq)
        self._by_key[key] = entry
        self._buckets.setdefault(0, {})[key] = entry

    def take(self, budget: int) -> list[Any]:
        """Messages fitting in ``budget`` bytes; each counts as one transmission."""
        limit = self._limit()
        taken: list[_Entry] = []
        used = 0
        for transmits in sorted(self._buckets):
            if budget - used < _ENTRY_OVERHEAD + _MIN_MESSAGE:
                break
            for entry in sorted(self._buckets[transmits].values(), key=_newest_first):
                cost = entry.size + _ENTRY_OVERHEAD
                if used + cost <= budget:
                    used += cost
                    taken.append(entry)
        for entry in taken:
            self._drop(entry.key)
            entry.transmits += 1
            if entry.transmits < limit:
                self._by_key[entry.key] = entry
                self._buckets.setdefault(entry.transmits, {})[entry.key] = entry
        return [entry.message for entry in taken]

    def _drop(self, key: str) -> None:
        entry = self._by_key.pop(key, None)
        if entry is None:
            return
        bucket = self._buckets[entry.transmits]
        del bucket[entry.key]
        if not bucket:
            del self._buckets[entry.transmits]


def _newest_first(entry: _Entry) -> int:
    return -entry.seq
