"""A transmit-limited queue of news, piggybacked on whatever we send.

memberlist's TransmitLimitedQueue, reshaped: news goes out fewest
transmissions first (fresh news spreads fastest), newest first among equals,
and leaves the queue after ``limit(n)`` transmissions. News is keyed by the
member it is about, so newer news about a member replaces the older before
it wastes a single byte.

A heap ordered by (transmissions, newest first) makes taking m entries
O(m log Q). Replaced news stays in the heap as a stale entry (it is no
longer the one ``_by_key`` points at) and is discarded when it surfaces.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Each entry costs a few bytes of list framing on top of its own size.
_ENTRY_OVERHEAD = 2
# No message is smaller than this (a msgpack map with a type and a peer id),
# so a budget with less left is full: stop looking.
_MIN_MESSAGE = 32


@dataclass(eq=False)
class _Entry:
    key: str
    message: Any
    size: int
    seq: int
    transmits: int = 0


class BroadcastQueue:
    """News waiting to be piggybacked; ``limit`` gives the retransmit limit now."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._by_key: dict[str, _Entry] = {}
        # (transmits, -seq, entry); seq is unique, so entries never compare.
        self._heap: list[tuple[int, int, _Entry]] = []
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
        """Queue news about ``key``, superseding any older news about it."""
        self._seq += 1
        entry = _Entry(key, message, size, self._seq)
        self._by_key[key] = entry
        heapq.heappush(self._heap, (0, -entry.seq, entry))
        if len(self._heap) > 2 * len(self._by_key) + 64:
            # Mostly stale: rebuild, so churn cannot grow the heap without bound.
            self._heap = [(e.transmits, -e.seq, e) for e in self._by_key.values()]
            heapq.heapify(self._heap)

    def take(self, budget: int) -> list[Any]:
        """Messages fitting in ``budget`` bytes; each counts as one transmission."""
        taken: list[_Entry] = []
        skipped: list[tuple[int, int, _Entry]] = []
        used = 0
        while self._heap and budget - used >= _ENTRY_OVERHEAD + _MIN_MESSAGE:
            item = heapq.heappop(self._heap)
            entry = item[2]
            if self._by_key.get(entry.key) is not entry:
                continue  # superseded by newer news
            cost = entry.size + _ENTRY_OVERHEAD
            if used + cost > budget:
                skipped.append(item)
                continue
            used += cost
            taken.append(entry)
        for item in skipped:
            heapq.heappush(self._heap, item)
        limit = self._limit()
        for entry in taken:
            entry.transmits += 1
            if entry.transmits < limit:
                heapq.heappush(self._heap, (entry.transmits, -entry.seq, entry))
            else:
                del self._by_key[entry.key]
        return [entry.message for entry in taken]
