"""The server's gossip: its node kept running, its record kept current.

Load (free cache, open sessions) changes with every session; each
re-signing is news that travels to the whole swarm, so changes are
published at most once per ``interval``. A state change (online, draining)
is published at once through ``poke``.

Gossip is how clients find a server, not what it serves: if the node fails
after joining (a bug, say), the server logs it and rejoins through the
members it knew, with backoff, instead of dropping every open session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import sole_error
from ..swarm import GossipNode
from ._serving import Serving

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


# Backoff between rejoins after a failure: from one second up to a probe
# period's worth of a WAN swarm.
REJOIN_DELAY = 1.0
MAX_REJOIN_DELAY = 30.0


async def supervise_gossip(
    node: GossipNode,
    peers: Sequence[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``node`` (started once it has joined through ``peers``); restart it on failure.

    A failed first join raises (the server cannot start); ``leave()`` ends it."""
    started = False
    delay = REJOIN_DELAY
    while True:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run, list(peers))
                if not started:
                    started = True
                    task_status.started()
            return
        except Exception as exc:
            if not started:
                raise sole_error(exc) from None
            logger.exception("gossip failed; rejoining in %g s", delay)
        await trio.sleep(delay)
        delay = min(2 * delay, MAX_REJOIN_DELAY)
        known = [m.address for m in node.members.values() if m.peer_id != node.peer_id]
        peers = list(dict.fromkeys([*known, *peers]))
