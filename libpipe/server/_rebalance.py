"""A server that chooses its own blocks, and moves them when the swarm gains.

Theory of operation. Started without ``--blocks``, a server

1. sizes its span from its memory budget M: the weights of a block (s_m)
   and the KV cache it promises (``cache_bytes``, whatever the span's
   length) must fit, so it holds ``min(L, floor((M - cache_bytes) / s_m))``
   blocks (``placement.span_blocks``; ``--num-blocks`` overrides it);
2. asks any peer for the swarm view before it loads anything, so it loads
   only the blocks it will serve, and takes the window
   ``placement.choose_span`` picks (through ``libpipe.swarm.initial_span``).
   Its own speed is not measured yet (that needs the blocks): it uses
   ``--throughput`` if given, else assumes the swarm's median server, which
   only breaks ties between windows of equal coverage. The server then
   announces that span (state ``joining``, with the assumed throughput)
   before loading, so a server choosing next counts it;
3. once online, runs a ``libpipe.swarm.Rebalancer`` whose move is
   ``SpanMover.move``: load the new blocks beside the old ones, switch the
   server to them and announce at once (new sessions and calls now see
   the new span; a client that still asks for the old blocks gets
   ``DrainingError``, bans this hop and re-routes), let sessions opened on the old
   blocks finish on them for up to ``drain_grace`` seconds, end the rest
   with ``DrainingError`` (their clients fail over and replay), and drop
   the old blocks with the last reference to them.

During a move both spans are in memory; the budget in step 1 leaves the
KV cache's room for that, not a second copy of the weights, so on a GPU
filled to the brim a move can fail to load, which is logged and leaves the
server where it was.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics

import torch
import trio

from ..errors import LibpipeError
from ..model import ModelConfig, block_weight_bytes, load_span, resolve_device, resolve_dtype
from ..net import ConnectionPool, Security, short_peer_id
from ..placement import ModelSpec, ServerView, span_blocks
from ..swarm import (
    GossipNode,
    LocalServer,
    RebalanceConfig,
    Rebalancer,
    RecordState,
    fetch_view,
    initial_span,
    server_views,
)
from ._config import ServerConfig
from ._gossip import RecordPublisher
from ._serving import Serving
from ._throughput import Throughput

logger = logging.getLogger("libpipe.server")

# Share of free memory a server budgets when not told (--memory): on a GPU
# the rest is the CUDA context and allocator slack; on a CPU host the OS,
# page cache and other programs share what is available.
GPU_MEMORY_SHARE = 0.9
CPU_MEMORY_SHARE = 0.5
MEMINFO = "/proc/meminfo"


def model_spec(model: ModelConfig, element_size: int) -> ModelSpec:
    """The model as placement sees it, in this server's dtype."""
    return ModelSpec(
        num_blocks=model.num_hidden_layers,
        block_bytes=block_weight_bytes(model, element_size),
        hidden_size=model.hidden_size,
        kv_bytes_per_token_block=model.kv_bytes_per_token(1, element_size),
        name=model.model_id or "model",
    )


def free_memory(device: torch.device) -> int:
    """What this server may budget on ``device`` when ``--memory`` is not given."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_SHARE)
    return int(available_host_memory() * CPU_MEMORY_SHARE)


def available_host_memory() -> int:
    """Linux's MemAvailable (free pages plus the page cache it can drop: a
    host that has just read a checkpoint has little *free* memory but plenty
    available); elsewhere the free pages."""
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts KiB
    except (OSError, ValueError, IndexError):
        pass  # no readable /proc/meminfo (not Linux): the free pages below
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def element_size(config: ServerConfig) -> int:
    return resolve_dtype(resolve_device(config.device), config.dtype).itemsize


def span_length(config: ServerConfig, model: ModelConfig) -> int:
    """How many blocks this server holds: ``num_blocks`` if given, else what
    its memory budget fits beside the KV cache it promises."""
    if config.num_blocks is not None:
        return min(config.num_blocks, model.num_hidden_layers)
    memory = (
        config.memory_bytes
        if config.memory_bytes is not None
        else free_memory(resolve_device(config.device))
    )
    spec = model_spec(model, element_size(config))
    return span_blocks(memory - config.cache_bytes, spec, cache_tokens=0)


def assumed_taus(
    config: ServerConfig, blocks: int, others: list[ServerView]
) -> tuple[float, float]:
    """(tau_decode, tau_forward) before measuring: ``--throughput`` if given,
    else the swarm's median server (1 s when alone: no other to compare)."""
    if config.throughput is not None:
        decode, forward = config.throughput
        return 1.0 / (decode * blocks), 1.0 / (forward * blocks)
    if not others:
        return 1.0, 1.0
    return (
        statistics.median(v.tau_decode for v in others),
        statistics.median(v.tau_forward for v in others),
    )


def assumed_throughput(
    config: ServerConfig, blocks: int, others: list[ServerView] | None = None
) -> Throughput:
    """The throughput a joining server announces until it has measured its
    own: other servers' placement counts only records with one."""
    tau_decode, tau_forward = assumed_taus(config, blocks, others or [])
    return Throughput(1.0 / (tau_decode * blocks), 1.0 / (tau_forward * blocks))


async def choose_blocks(
    config: ServerConfig, security: Security, model: ModelConfig
) -> tuple[tuple[int, int], Throughput]:
    """The span to load, from the swarm as any of ``config.peers`` sees it
    (the first server of a swarm starts at block 0), and the throughput
    assumed in choosing it (``assumed_throughput``)."""
    blocks = span_length(config, model)
    if not config.peers:
        return (0, blocks), assumed_throughput(config, blocks)
    async with ConnectionPool(security) as pool:
        source, records = await fetch_view(
            pool, config.peers, timeout=config.gossip.request_timeout
        )
    spec = model_spec(model, element_size(config))
    others = server_views(records, model.model_id, spec, exclude=security.peer_id)
    assumed = assumed_throughput(config, blocks, others)
    me = LocalServer(
        model.model_id,
        spec,
        blocks,
        config.cache_bytes,
        1.0 / (assumed.decode * blocks),
        1.0 / (assumed.forward * blocks),
    )
    span = initial_span(records, me, peer_id=security.peer_id)
    logger.info(
        "chose blocks %d:%d of %d from the view of %s (%d server(s))",
        *span, model.num_hidden_layers, source, len(others),
    )  # fmt: skip
    return span, assumed


class SpanMover:
    """The ``move`` a server's Rebalancer calls (see the module docstring)."""

    def __init__(self, config: ServerConfig, serving: Serving, publisher: RecordPublisher) -> None:
        self.config = config
        self.serving = serving
        self.publisher = publisher

    async def move(self, start: int, end: int) -> bool:
        cfg, s = self.config, self.serving
        if s.state is not RecordState.ONLINE:
            return False  # draining (shutting down): stay put
        old = s.blocks
        try:
            span = await trio.to_thread.run_sync(
                functools.partial(
                    load_span,
                    cfg.model_dir,
                    start,
                    end,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    progress=False,
                    prefill_chunk=cfg.prefill_chunk,
                    adapters=cfg.adapters,
                )
            )
        except (LibpipeError, RuntimeError) as exc:
            # RuntimeError: torch's out-of-memory. The server stays where it was.
            logger.warning("move to blocks %d:%d failed to load: %s", start, end, exc)
            return False
        if s.state is not RecordState.ONLINE:
            return False
        on_old = s.sessions.open_entries()
        s.retired.append(old)
        s.span = span
        self.publisher.publish()
        logger.info(
            "moved blocks %d:%d -> %d:%d; %d session(s) finish on the old blocks",
            *old, start, end, len(on_old),
        )  # fmt: skip
        with trio.move_on_after(cfg.drain_grace):
            for entry in on_old:
                await entry.closed.wait()
        left = [e for e in on_old if not e.closed.is_set()]
        if left:
            logger.warning("ending %d session(s) still on blocks %d:%d", len(left), *old)
            s.sessions.kick(left)
        return True


async def rebalance(
    config: ServerConfig,
    serving: Serving,
    node: GossipNode,
    publisher: RecordPublisher,
    *,
    task_status: trio.TaskStatus[Rebalancer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this server's Rebalancer until cancelled (``nursery.start`` returns it)."""
    start, end = serving.blocks
    blocks = end - start
    model = serving.span.config
    me = LocalServer(
        model_id=model.model_id,
        model=model_spec(model, serving.span.dtype.itemsize),
        blocks=blocks,
        cache_bytes=config.cache_bytes,
        tau_decode=1.0 / (serving.throughput.decode * blocks),
        tau_forward=1.0 / (serving.throughput.forward * blocks),
    )
    rebalancer = Rebalancer(
        node,
        me,
        move=SpanMover(config, serving, publisher).move,
        config=RebalanceConfig(period=config.rebalance_period),
    )
    logger.info(
        "server %s rebalances every ~%g s", short_peer_id(node.peer_id), config.rebalance_period
    )
    task_status.started(rebalancer)
    await rebalancer.run()
