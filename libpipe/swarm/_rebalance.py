"""Each server re-chooses its span from the gossiped view, now and then.

Theory of operation. The gossip node already holds every server's signed
record; a ``Rebalancer`` turns the records of servers of the same model
into spans with throughputs and asks the placement rule two questions:
where should a server that holds nothing yet start (``initial_span``), and
should a running server move (``evaluate``, with hysteresis: only a clear
improvement of the swarm counts). It evaluates on a randomised period
(uniform over ``period * (1 +- jitter)``, first one at a random phase) so
that servers which learn of the same death at the same moment do not all
rush to the same gap: the first mover announces its new span, and the
others see the gap covered when their turn comes.

Moving is the embedding server's job, through the ``move(start, end)``
callback: load the new blocks, announce them (``update_local_record``),
stop new sessions on the old span, let running ones finish, drop the old
blocks. The callback returns once the new span is served and announced;
the next evaluation then sees the swarm as it is after the move.

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
from ._node import GossipNode
from ._petals_rule import Holding, best_start, block_throughput, should_move
from ._record import RecordState, ServerRecord

logger = logging.getLogger("libpipe.swarm")

# The server supplies this: move to [start, end), return once it is announced.
MoveCallback = Callable[[int, int], Awaitable[None]]

COUNTED_STATES = (RecordState.ONLINE, RecordState.JOINING)


@dataclass(frozen=True)
class RebalanceConfig:
    """When and how eagerly a server re-chooses its span."""

    # Mean seconds between evaluations. Must exceed the time a move takes
    # (loading blocks), so that a move is announced before most other
    # servers next look at the swarm.
    period: float = 60.0
    # Each wait is uniform over period * [1 - jitter, 1 + jitter].
    jitter: float = 0.5
    # Hysteresis: the swarm's per-block throughput must improve by more than
    # this fraction at its weakest differing block before a server moves.
    # Measured throughputs vary by a few percent between runs; 20% is well
    # clear of that noise.
    margin: float = 0.2

    def __post_init__(self) -> None:
        if not self.period > 0:
            raise ConfigError("rebalance period must be positive", period=self.period)
        if not 0 <= self.jitter < 1:
            raise ConfigError("rebalance jitter must lie in [0, 1)", jitter=self.jitter)
        if not 0 <= self.margin < 1:
            raise ConfigError("rebalance margin must lie in [0, 1)", margin=self.margin)

    def next_wait(self, rng: random.Random) -> float:
        return self.period * rng.uniform(1 - self.jitter, 1 + self.jitter)


def holding_of(record: ServerRecord) -> Holding | None:
    """What a record says a server contributes, or None when it counts for nothing."""
    start, end = record.span
    if record.state not in COUNTED_STATES or end <= start or record.throughput_decode <= 0:
        return None
    return Holding(record.peer_id, start, end, record.throughput_decode)


def initial_span(
    records: Iterable[ServerRecord],
    *,
    model_id: str,
    num_blocks: int,
    blocks: int,
    exclude: str | None = None,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Where a server of ``blocks`` blocks that holds nothing yet should start,
    given the records of the swarm (``exclude``: our own peer id)."""
    holdings = (holding_of(r) for r in records if r.peer_id != exclude and r.model_id == model_id)
    per_block = block_throughput([h for h in holdings if h is not None], num_blocks)
    blocks = min(blocks, num_blocks)
    start = best_start(per_block, blocks, rng)
    return start, start + blocks


class Rebalancer:
    """Chooses and re-chooses this server's span from ``node``'s view.

    ``blocks`` is how many blocks the server can hold (from its memory
    budget); ``tau_decode`` its measured seconds per block for one decode
    step. ``move`` is awaited when the server should move."""

    def __init__(
        self,
        node: GossipNode,
        *,
        num_blocks: int,
        blocks: int,
        tau_decode: float,
        move: MoveCallback,
        config: RebalanceConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if num_blocks < 1 or blocks < 1:
            raise ConfigError(
                "a model has at least one block and a server holds at least one",
                num_blocks=num_blocks,
                blocks=blocks,
            )
        if not (math.isfinite(tau_decode) and tau_decode > 0):
            raise ConfigError("tau_decode must be a positive number of seconds", tau=tau_decode)
        self.node = node
        self.num_blocks = num_blocks
        self.blocks = min(blocks, num_blocks)
        self.tau_decode = tau_decode
        self.config = config if config is not None else RebalanceConfig()
        self.moves = 0
        self.move = move
        self._rng = rng if rng is not None else random.Random()

    @property
    def span(self) -> tuple[int, int]:
        return self.node.local_record.record.span

    def others(self) -> list[Holding]:
        """Every other server of our model that currently counts."""
        me = self.node.local_record.record
        holdings = (
            holding_of(signed.record)
            for signed in self.node.view()
            if signed.record.peer_id != me.peer_id and signed.record.model_id == me.model_id
        )
        return [h for h in holdings if h is not None]

    def coverage(self) -> list[float]:
        """Throughput per block as this node sees the swarm, itself included."""
        me = self.node.local_record.record
        mine = Holding(me.peer_id, *me.span, self._throughput(me.span[1] - me.span[0]))
        return block_throughput([*self.others(), mine], self.num_blocks)

    def initial_span(self) -> tuple[int, int]:
        """Where a server that holds nothing yet should start."""
        return initial_span(
            (signed.record for signed in self.node.view()),
            model_id=self.node.local_record.record.model_id,
            num_blocks=self.num_blocks,
            blocks=self.blocks,
            exclude=self.node.peer_id,
            rng=self._rng,
        )

    def evaluate(self) -> tuple[int, int] | None:
        """The span to move to now, or None to stay."""
        start, end = self.span
        if end <= start:
            return self.initial_span()
        me = Holding(self.node.peer_id, start, end, self._throughput(end - start))
        return should_move(
            self.others(), me, self.num_blocks, margin=self.config.margin, rng=self._rng
        )

    async def step(self) -> bool:
        """One evaluation, and the move when it says so; True when we moved."""
        target = self.evaluate()
        if target is None:
            return False
        logger.info(
            "rebalance peer=%s from=%s to=%s",
            short_peer_id(self.node.peer_id),
            list(self.span),
            list(target),
        )
        await self.move(*target)
        self.moves += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Evaluate on a randomised period until cancelled."""
        task_status.started()
        # A random phase: servers started together do not evaluate together.
        await trio.sleep(self.config.period * self._rng.uniform(0, 1))
        while True:
            await self.step()
            await trio.sleep(self.config.next_wait(self._rng))

    def _throughput(self, length: int) -> float:
        """Decode steps per second through a span of ``length`` blocks."""
        return 0.0 if length <= 0 else 1.0 / (self.tau_decode * length)
