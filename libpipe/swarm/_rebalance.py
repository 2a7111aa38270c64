"""Each server re-chooses its span from the gossiped view, now and then.

Theory of operation. The gossip node already holds every server's signed
record; a ``Rebalancer`` turns the records of servers of the same model
into ``placement.ServerView``s and asks the placement layer the two
questions the simulator asks too: where should a server that holds nothing
yet start (``placement.choose_span``), and should a running server move
(``placement.should_move``, with hysteresis: only a clear improvement of
the swarm counts). It evaluates on a randomised period (uniform over
``period * (1 +- jitter)``, the first at a random phase) so that servers
which learn of the same death at the same moment do not all rush to the
same gap: the first mover announces its new span, and the others see the
gap covered when their turn comes. Servers on the very same span would see
the gap identically, so the one with the lowest peer id moves first and its
twins hold back for a while (``_defer``).

Moving is the embedding server's job, through the ``move(start, end)``
callback: load the new blocks, announce them (``update_local_record``),
stop new sessions on the old span, let running ones finish, drop the old
blocks. The callback returns True once the new span is served and
announced (False when it could not move: the server stays and the next
evaluation tries again); the next evaluation sees the swarm as it is after
the move.

Records count when they are ONLINE or JOINING (a joining server already
announced where it will be, and counting it is what keeps a crowd that
starts together from piling up) with a span and a measured throughput;
DRAINING servers are leaving and count as gone.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from ..errors import ConfigError
from ..net import short_peer_id
from ..placement import DEFAULT_MOVE_MARGIN, ModelSpec, ServerView, choose_span, should_move
from ._node import GossipNode
from ._record import RecordState, ServerRecord

logger = logging.getLogger("libpipe.swarm")

# The server supplies this: move to [start, end) and return True once the new
# span is announced, or False when it could not (shutting down, no memory).
MoveCallback = Callable[[int, int], Awaitable[bool]]

COUNTED_STATES = (RecordState.ONLINE, RecordState.JOINING)
# How long a server lets a twin on the same span move first (see _defer):
# waits are at most 1.5 periods, so the twin has evaluated by then.
DEFER_PERIODS = 2


@dataclass(frozen=True)
class RebalanceConfig:
    """When and how eagerly a server re-chooses its span."""

    # Mean seconds between evaluations. Must exceed the time a move takes
    # (loading blocks), so that a move is announced before most other
    # servers next look at the swarm.
    period: float = 60.0
    # Each wait is uniform over period * [1 - jitter, 1 + jitter].
    jitter: float = 0.5
    # Hysteresis of placement.should_move: the improvement a move must bring
    # (its default is argued there).
    margin: float = DEFAULT_MOVE_MARGIN

    def __post_init__(self) -> None:
        if not self.period > 0:
            raise ConfigError("rebalance period must be positive", period=self.period)
        if not 0 <= self.jitter < 1:
            raise ConfigError("rebalance jitter must lie in [0, 1)", jitter=self.jitter)
        if not 0 <= self.margin < 1:
            raise ConfigError("rebalance margin must lie in [0, 1)", margin=self.margin)

    def next_wait(self, rng: random.Random) -> float:
        return self.period * rng.uniform(1 - self.jitter, 1 + self.jitter)


def server_view(record: ServerRecord, model: ModelSpec) -> ServerView | None:
    """What placement knows of a server from its record, or None when it
    counts for nothing (no span, no measured speed, or leaving), or cannot be
    right (a span past the model's last block would hide real gaps)."""
    start, end = record.span
    n = end - start
    if (
        record.state not in COUNTED_STATES
        or n <= 0
        or end > model.num_blocks
        or record.throughput_decode <= 0
        or record.throughput_forward <= 0
    ):
        return None
    # Throughputs are over the whole span; placement wants seconds per block.
    return ServerView(
        peer_id=record.peer_id,
        start=start,
        end=end,
        tau_decode=1.0 / (record.throughput_decode * n),
        tau_forward=1.0 / (record.throughput_forward * n),
        free_cache_bytes=record.free_cache_bytes,
        cache_bytes_per_token_block=model.kv_bytes_per_token_block,
    )


def server_views(
    records: Iterable[ServerRecord], model_id: str, model: ModelSpec, *, exclude: str | None = None
) -> list[ServerView]:
    """Views of the servers of ``model_id`` among ``records`` (``exclude``: ourselves)."""
    views = (
        server_view(r, model) for r in records if r.peer_id != exclude and r.model_id == model_id
    )
    return [v for v in views if v is not None]


@dataclass(frozen=True)
class LocalServer:
    """What a server knows of itself before it serves: its model, how many
    blocks it holds, the KV cache it promises over them, and its measured
    seconds per block (decode step, forward token)."""

    model_id: str
    model: ModelSpec
    blocks: int
    cache_bytes: int
    tau_decode: float
    tau_forward: float

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= self.model.num_blocks:
            raise ConfigError(
                f"a server holds between 1 and {self.model.num_blocks} blocks, not {self.blocks}",
                blocks=self.blocks,
            )
        if self.cache_bytes < 0:
            raise ConfigError("cache_bytes must not be negative", cache_bytes=self.cache_bytes)
        for name in ("tau_decode", "tau_forward"):
            tau = getattr(self, name)
            if not (math.isfinite(tau) and tau > 0):
                raise ConfigError(f"{name} must be a positive number of seconds", tau=tau)

    @property
    def cache_tokens(self) -> int:
        """Tokens of cache per block the server promises."""
        return self.cache_bytes // (self.blocks * self.model.kv_bytes_per_token_block)

    def view(self, peer_id: str, span: tuple[int, int]) -> ServerView:
        """This server at ``span``, with its whole cache budget free (a busy
        server must not look like a poor one to itself)."""
        return ServerView(
            peer_id=peer_id,
            start=span[0],
            end=span[1],
            tau_decode=self.tau_decode,
            tau_forward=self.tau_forward,
            free_cache_bytes=self.cache_bytes,
            cache_bytes_per_token_block=self.model.kv_bytes_per_token_block,
        )


def initial_span(
    records: Iterable[ServerRecord], me: LocalServer, *, peer_id: str
) -> tuple[int, int]:
    """Where a server that holds nothing yet should start, given the swarm's records."""
    return choose_span(
        server_views(records, me.model_id, me.model, exclude=peer_id),
        me.model,
        blocks=me.blocks,
        cache_tokens=me.cache_tokens,
        tau_decode=me.tau_decode,
        tau_forward=me.tau_forward,
        peer_id=peer_id,
    )


class Rebalancer:
    """Chooses and re-chooses this server's span from ``node``'s view.

    ``move`` is awaited when the server should move; it is public so that
    an operator's tool (or a test) can move a server by hand."""

    def __init__(
        self,
        node: GossipNode,
        me: LocalServer,
        *,
        move: MoveCallback,
        config: RebalanceConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.me = me
        self.move = move
        self.config = config if config is not None else RebalanceConfig()
        self.moves = 0
        self._rng = rng if rng is not None else random.Random()
        self._deferring_since: float | None = None

    @property
    def span(self) -> tuple[int, int]:
        return self.node.local_record.record.span

    def others(self) -> list[ServerView]:
        """Every other server of our model that currently counts."""
        records = (signed.record for signed in self.node.view())
        return server_views(records, self.me.model_id, self.me.model, exclude=self.node.peer_id)

    def initial_span(self) -> tuple[int, int]:
        """Where this server should start if it held nothing yet."""
        records = (signed.record for signed in self.node.view())
        return initial_span(records, self.me, peer_id=self.node.peer_id)

    def evaluate(self) -> tuple[int, int] | None:
        """The span to move to now, or None to stay."""
        start, end = self.span
        if end <= start:
            return self.initial_span()
        me = self.me.view(self.node.peer_id, (start, end))
        return should_move(me, self.others(), self.me.model, margin=self.config.margin)

    async def step(self) -> bool:
        """One evaluation, and the move when it says so; True when we moved."""
        target = self.evaluate()
        if target is None:
            self._deferring_since = None
            return False
        if self._defer():
            return False
        logger.info(
            "rebalance peer=%s from=%s to=%s",
            short_peer_id(self.node.peer_id),
            list(self.span),
            list(target),
        )
        self._deferring_since = None
        if not await self.move(*target):
            return False
        self.moves += 1
        return True

    def _defer(self) -> bool:
        """Whether to let a twin move first.

        Servers holding the very same span see the same gap the same way, and
        if two of them move at once (within the seconds a move takes to be
        announced) they uncover the span they shared. The twin with the
        lowest peer id goes first; the others hold back for up to
        ``DEFER_PERIODS`` periods, by which time its move is announced and
        their next evaluation sees it (or it could not move, and they go)."""
        span = self.span
        first = min(
            (v.peer_id for v in self.others() if (v.start, v.end) == span),
            default=self.node.peer_id,
        )
        if first >= self.node.peer_id:
            self._deferring_since = None
            return False
        now = trio.current_time()
        if self._deferring_since is None:
            self._deferring_since = now
        return now - self._deferring_since < DEFER_PERIODS * self.config.period

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Evaluate on a randomised period until cancelled."""
        task_status.started()
        # A random phase: servers started together do not evaluate together.
        await trio.sleep(self.config.period * self._rng.uniform(0, 1))
        while True:
            await self.step()
            await trio.sleep(self.config.next_wait(self._rng))
