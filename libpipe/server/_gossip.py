"""Keeping this server's signed gossip record in step with what it is doing.

Load (free cache, open sessions) changes with every session; each
re-signing is news that travels to the whole swarm, so changes are
published at most once per ``interval``. A state change (online, draining)
is published at once through ``poke``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..swarm import GossipNode
from ._handlers import Serving

logger = logging.getLogger("libpipe.server")


def record_fields(serving: Serving) -> dict[str, Any]:
    """The record fields that describe this server now."""
    return {
        "span": serving.blocks,
        "dtype": serving.dtype_name,
        "state": serving.state,
        "throughput_decode": serving.throughput.decode,
        "throughput_forward": serving.throughput.forward,
        "free_cache_bytes": serving.pool.free_bytes,
        "active_sessions": len(serving.sessions),
    }


class RecordPublisher:
    def __init__(self, node: GossipNode, serving: Serving, interval: float) -> None:
        self.node = node
        self.serving = serving
        self.interval = interval
        self._published: dict[str, Any] = {}
        self._poked = trio.Event()

    def publish(self) -> None:
        """Re-sign the record now if any field changed."""
        now = record_fields(self.serving)
        changes = {k: v for k, v in now.items() if self._published.get(k) != v}
        if changes:
            self.node.update_local_record(**changes)
            self._published = now
            logger.debug("record published: %s", changes)

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        while True:
            self.publish()
            with trio.move_on_after(self.interval):
                await self._poked.wait()
            self._poked = trio.Event()
