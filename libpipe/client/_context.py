"""What sessions and bulk calls share inside one ``Client``: the swarm view,
the connection pool, the retry policy and the wire dtype."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import trio

from ..errors import (
    ConnectionBrokenError,
    DeadlineExceededError,
    InvalidRequestError,
    LibpipeError,
    NoRouteError,
    TensorOverflowError,
)
from ..net import Connection, ConnectionPool
from ._failover import FailureLedger, RetryPolicy
from ._routing import PlannedHop, plan_route
from ._view import ServerEntry, SwarmView


@dataclass
class SwarmContext:
    view: SwarmView
    pool: ConnectionPool
    peers: Sequence[str]
    policy: RetryPolicy
    wire_dtype: torch.dtype
    num_blocks: int
    hidden_size: int
    rng: random.Random = field(default_factory=random.Random)
    # Sessions run steps server to server (client/_session.py) when true.
    forwarding: bool = True
    # Bulk calls in flight per server, for throughput spreading.
    load: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    _refresh_lock: trio.Lock = field(default_factory=trio.Lock)

    async def connect(self, entry: ServerEntry) -> Connection:
        with trio.fail_after(self.policy.connect_timeout):
            return await self.view.connect(self.pool, entry)

    async def refresh(self) -> None:
        """Learn the swarm again from the given peers (one refresh at a time;
        callers that queue behind a running one reuse its result)."""
        if self._refresh_lock.locked():
            async with self._refresh_lock:
                return
        async with self._refresh_lock:
            await self.view.refresh(self.pool, self.peers, self.policy.connect_timeout)

    async def plan(
        self,
        ledger: FailureLedger,
        *,
        start: int,
        end: int,
        objective: str = "latency",
        session_tokens: int = 0,
        batch: int = 1,
        tokens: int = 1,
    ) -> list[PlannedHop]:
        """A route over ``[start, end)``; when there is none, learn the swarm
        again and retry within the ledger's bound (a server whose ban is
        over may answer the refresh's probe, a new one may have joined, a
        gap may be covered by a move)."""
        refreshed = False
        while True:
            try:
                return plan_route(
                    self.view,
                    start=start,
                    end=end,
                    objective=objective,  # type: ignore[arg-type]
                    session_tokens=session_tokens,
                    batch=batch,
                    load=self.load if objective == "throughput" else None,
                    rng=self.rng if objective == "throughput" else None,
                    tokens=tokens,
                    forwarding=self.forwarding and objective == "latency",
                )
            except NoRouteError as exc:
                if not refreshed:
                    refreshed = True
                else:
                    await ledger.wait_for_route(exc)
                await self.refresh()


def same_on_every_server(error: LibpipeError) -> bool:
    """A request the server calls invalid, or values that overflow the wire
    dtype, would fail alike anywhere: the caller's problem, not a failover's."""
    return isinstance(error, (InvalidRequestError, TensorOverflowError))


def hop_error(exc: BaseException) -> LibpipeError | None:
    """The failure a hop's exception means, or None if it is not a hop's
    fault (cancellation, a bug of ours) and must propagate."""
    if isinstance(exc, LibpipeError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return DeadlineExceededError("the server did not answer in time")
    if isinstance(exc, (trio.EndOfChannel, trio.BrokenResourceError, OSError)):
        return ConnectionBrokenError(f"the server ended the exchange: {type(exc).__name__}")
    return None
