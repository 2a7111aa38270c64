"""BlockServer: one span of blocks served over the RPC layer, and gossiped.

Start-up order: choose the span (or take ``--blocks``), open the listener
and join gossip as ``joining`` with that span (so servers choosing next
count it; clients route to online servers only), then load the span
(worker thread, progress bar), learn its throughput (disk cache or a
measurement), register the block RPCs, open the compute queue and announce
``online``. Only then does ``nursery.start(server.run)`` return the
address, so a caller never sees a server that cannot yet compute.

Shutdown is ``drain()``: the state becomes ``draining`` (announced at once),
new sessions and calls get ``DrainingError``, open sessions go on for up to
``drain_grace`` seconds; those still open then end with ``DrainingError``,
the node leaves the swarm and ``run`` returns.
"""

from __future__ import annotations

import functools
import logging

import trio

from .. import __version__
from ..errors import ConfigError, LibpipeError, sole_error
from ..model import KVCachePool, ModelConfig, load_span, resolve_device, resolve_dtype
from ..net import ConnectionPool, HelloInfo, Router, Security, serve, short_peer_id
from ..swarm import GossipNode, Rebalancer, RecordState, RpcTransport
from ._config import ServerConfig
from ._executor import Executor
from ._gossip import RecordPublisher, supervise_gossip
from ._handlers import RpcHandlers
from ._push import KnownServers
from ._rebalance import assumed_throughput, choose_blocks, rebalance
from ._serving import Serving
from ._sessions import SessionTable
from ._throughput import Throughput, load_or_measure

logger = logging.getLogger("libpipe.server")

# After the grace period, how long kicked sessions get to hear their error
# (each waits at most for the step it is running).
KICK_WAIT = 5.0


class BlockServer:
    """``address = await nursery.start(server.run)``; ``await server.drain()`` to stop."""

    def __init__(self, config: ServerConfig, security: Security) -> None:
        self.config = config
        self.security = security
        self.address: str | None = None
        self.serving: Serving | None = None
        self.node: GossipNode | None = None
        self._publisher: RecordPublisher | None = None
        # Set when the server chose its own span (no --blocks) and moves it.
        self.rebalancer: Rebalancer | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def peer_id(self) -> str:
        return self.security.peer_id

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, measure, serve and gossip until drained or cancelled.

        Start-up errors (checkpoint, flags, no peer answering) raise as
        their own ``LibpipeError`` class, not wrapped in exception groups."""
        try:
            await self._run(task_status)
        except BaseExceptionGroup as group:
            sole = sole_error(group)
            if isinstance(sole, LibpipeError):
                raise sole from None
            raise

    async def _run(self, task_status: trio.TaskStatus[str]) -> None:
        cfg = self.config
        me = short_peer_id(self.peer_id)
        model = ModelConfig.from_file(cfg.model_dir)
        if cfg.blocks is not None:
            blocks = cfg.blocks
            assumed = assumed_throughput(cfg, blocks[1] - blocks[0])
        else:
            blocks, assumed = await choose_blocks(cfg, self.security, model)
        if blocks[1] > model.num_hidden_layers:
            raise ConfigError(
                f"blocks {blocks[0]}:{blocks[1]} are not within the model's "
                f"{model.num_hidden_layers} blocks",
                num_blocks=model.num_hidden_layers,
            )
        device = resolve_device(cfg.device)
        router = Router()
        hello = HelloInfo(model_id=model.model_id)
        with (
            KVCachePool(cfg.cache_bytes, device) as pool,
            trio.CancelScope() as self._scope,
        ):
            async with (
                ConnectionPool(self.security, router=router, hello=hello) as connections,
                trio.open_nursery() as nursery,
            ):
                host, port = await nursery.start(
                    functools.partial(
                        serve,
                        router,
                        host=cfg.host,
                        port=cfg.port,
                        security=self.security,
                        hello=hello,
                    )
                )
                self.address = cfg.announce_address or _host_port(host, port)
                # Joined before loading: servers choosing their spans while
                # this one loads count it where it will be (and not all pile
                # onto the same blocks). Clients route to online servers only.
                self.node = GossipNode(
                    self.security.identity,
                    RpcTransport(router, connections, self.address),
                    model_id=model.model_id,
                    span=blocks,
                    num_blocks=model.num_hidden_layers,
                    dtype=str(resolve_dtype(device, cfg.dtype)).removeprefix("torch."),
                    version=__version__,
                    state=RecordState.JOINING,
                    config=cfg.gossip,
                )
                self.node.update_local_record(
                    throughput_decode=assumed.decode, throughput_forward=assumed.forward
                )
                await nursery.start(supervise_gossip, self.node, cfg.peers)
                serving = await self._load(blocks, pool)
                known = KnownServers(self.node, model.model_id)
                RpcHandlers(serving, connections, known).register(router)
                await nursery.start(serving.executor.run)
                serving.state = RecordState.ONLINE
                self._publisher = RecordPublisher(self.node, serving, cfg.record_interval)
                self._publisher.publish()
                nursery.start_soon(self._publisher.run)
                if cfg.blocks is None:
                    self.rebalancer = await nursery.start(
                        rebalance, cfg, serving, self.node, self._publisher
                    )
                logger.info(
                    "server %s online at %s: blocks %d:%d of %s, %s on %s",
                    me, self.address, *blocks, model.model_id,
                    serving.dtype_name, serving.span.device,
                )  # fmt: skip
                task_status.started(self.address)
        logger.info("server %s stopped", me)

    async def _load(self, blocks: tuple[int, int], pool: KVCachePool) -> Serving:
        """Load ``blocks`` (worker thread, progress bar) and learn their
        throughput (disk cache or a measurement): what the handlers serve."""
        cfg = self.config
        span = await trio.to_thread.run_sync(
            functools.partial(
                load_span,
                cfg.model_dir,
                *blocks,
                device=cfg.device,
                dtype=cfg.dtype,
                progress=cfg.progress,
                prefill_chunk=cfg.prefill_chunk,
                adapters=cfg.adapters,
            )
        )
        if cfg.throughput is not None:
            throughput = Throughput(*cfg.throughput)
        else:
            throughput = await trio.to_thread.run_sync(
                functools.partial(
                    load_or_measure,
                    span,
                    cfg.cache_dir,
                    seconds=cfg.measure_seconds,
                    progress=cfg.progress,
                )
            )
        self.serving = Serving(
            config=cfg,
            span=span,
            pool=pool,
            executor=Executor(
                batching=cfg.batching,
                max_batch=cfg.max_batch,
                inline_max=cfg.inline_decode_max,
            ),
            sessions=SessionTable(),
            peer_id=self.peer_id,
            throughput=throughput,
            max_length=min(cfg.max_length, span.config.max_position_embeddings),
        )
        return self.serving

    async def drain(self) -> None:
        """Finish open work (bounded by ``drain_grace``), leave the swarm, stop ``run``."""
        serving, scope = self.serving, self._scope
        if serving is None or scope is None:
            raise ConfigError("the server is not running")
        if serving.state is RecordState.DRAINING:
            return
        serving.state = RecordState.DRAINING
        if self._publisher is not None:
            self._publisher.poke()
        grace = self.config.drain_grace
        logger.info(
            "draining: %d session(s), %d call(s) open; grace %g s",
            len(serving.sessions), serving.sessions.calls_in_flight, grace,
        )  # fmt: skip
        with trio.move_on_after(grace) as waited:
            await serving.sessions.wait_idle()
        if waited.cancelled_caught:
            logger.warning("drain grace over: ending %d session(s)", len(serving.sessions))
            serving.sessions.kick_all()
            with trio.move_on_after(KICK_WAIT):
                await serving.sessions.wait_idle()
        if self.node is not None:
            with trio.move_on_after(self.config.gossip.request_timeout):
                try:
                    await self.node.leave()
                except LibpipeError as exc:
                    # Gossip between a failure and its rejoin: the swarm
                    # learns of our exit from failed probes instead.
                    logger.info("could not announce leaving: %s", exc)
        scope.cancel()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
