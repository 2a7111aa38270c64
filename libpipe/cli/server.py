"""`libpipe-server` (and `libpipe server`): serve a span of a model's blocks.

Once serving, the daemon prints one line ``libpipe-server ready ADDRESS
PEER_ID`` on stdout and, with ``--ready-file``, writes the same facts as
JSON (what ``libpipe.server.ServerProcess`` waits for). SIGTERM or SIGINT
drains: no new sessions, open ones finish within ``--drain-grace``
seconds, then exit 0; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, LibpipeError, sole_error

if TYPE_CHECKING:
    import trio

    from ..net import Security
    from ..server import ServerConfig

_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("server", help="serve a span of a model's blocks")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="libpipe-server", description="Serve a span of a model's blocks to a libpipe swarm."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LibpipeError as exc:
        print(f"libpipe-server: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags; those left out take ``ServerConfig``'s defaults (documented there)."""
    add = parser.add_argument
    add("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    add(
        "--blocks",
        metavar="A:B",
        help="blocks to serve, half-open (e.g. 0:8); without it the server chooses its span "
        "from the swarm and moves it when the swarm gains",
    )
    add("--num-blocks", type=int, help="without --blocks: how many (default: what --memory fits)")
    add("--memory", help="without --blocks: memory budget for weights + KV cache, e.g. 8G")
    add("--rebalance-period", type=float, help="without --blocks: seconds between re-checks (60)")
    add("--monitor", type=int, metavar="PORT", help="serve the monitor page on 127.0.0.1:PORT")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    add("--identity", metavar="DIR", help="node identity directory (`libpipe ca issue`)")
    add("--ca", metavar="FILE", help="swarm CA certificate (default: the identity's)")
    add("--insecure", action="store_true", help="plaintext, no authentication (development)")
    add("--allow-public-insecure", action="store_true", help="plaintext beyond loopback too")
    add("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    add(
        "--threads",
        type=int,
        help="torch threads, intra-op and inter-op (default: torch's intra-op default, one per "
        "physical core or $OMP_NUM_THREADS: right for a server alone on its host); with "
        "several servers on one host give each CORES/SERVERS, or they spin against each other",
    )
    add("--dtype", help="compute dtype: fp32, bf16, fp16 (default: the device's)")
    add("--cache-bytes", default="1G", help="KV cache budget, e.g. 512M, 4G (default 1G)")
    add("--max-length", type=int, help="longest session in tokens (default 8192)")
    add("--idle-timeout", type=float, help="seconds after which an idle session ends (default 60)")
    add("--drain-grace", type=float, help="seconds SIGTERM lets sessions finish (default 30)")
    add("--no-batching", action="store_true", help="run decode steps one at a time")
    add("--max-batch", type=int, help="sessions per batched decode pass (default 64)")
    add(
        "--inline-decode-ms",
        type=float,
        help="a lone session's decode step runs on the event loop (no thread hand-off) when its "
        "last pass took at most this many ms; pings and pushes then wait for it (default 30; "
        "0: every step on the compute thread)",
    )
    add("--prefill-chunk", type=int, help="positions per prefill chunk (default 512)")
    add(
        "--backward-chunk",
        type=int,
        help="blocks per compute job of a backward call (default 1): decode steps run between "
        "jobs; every chunk but the last is computed once more, so the whole span (one job) "
        "gives backward throughput priority over decode latency",
    )
    add(
        "--forward-chunk",
        type=int,
        help="blocks per compute job of a forward call (default 1): decode steps run between "
        "jobs; each job costs a hand-off to the compute thread, no recomputation",
    )
    add(
        "--bulk-bytes",
        help="inputs of forward/backward calls held at once (queued or computing), e.g. 2G; "
        "past it new calls are refused as busy (default 1G)",
    )
    add("--adapters", nargs="*", default=[], metavar="DIR", help="LoRA adapters (PEFT layout)")
    add("--throughput", metavar="DECODE,FORWARD", help="announce these instead of measuring")
    add(
        "--cache-dir",
        metavar="DIR",
        help="throughput cache (default $LIBPIPE_CACHE_DIR or ~/.cache/libpipe)",
    )
    add("--peers", default="", metavar="HOST:PORT,...", help="any swarm members to join through")
    add("--announce-address", metavar="HOST:PORT", help="address peers should dial")
    add("--gossip", choices=("lan", "wan", "local"), default="lan", help="gossip timing preset")
    add("--ready-file", metavar="FILE", help="write address and peer id here when serving")
    add("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    add("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import trio

    from ..net import Security

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = build_config(args)
    intra, inter = apply_threads(args.threads)
    logging.getLogger("libpipe.server").info(
        "torch threads: %d intra-op, %d inter-op (%d CPUs here; several servers on one host "
        "want --threads CPUS/SERVERS each)",
        intra, inter, os.cpu_count() or 1,
    )  # fmt: skip
    if args.monitor is not None and not 0 <= args.monitor < 65536:
        raise ConfigError(f"--monitor must be a port in [0, 65535], got {args.monitor}")
    security = Security.from_options(
        identity=args.identity,
        ca=args.ca,
        insecure=args.insecure,
        allow_public_insecure=args.allow_public_insecure,
    )
    try:
        trio.run(_serve, config, security, args.ready_file, args.monitor)
    except BaseExceptionGroup as group:
        # A start-up error arrives wrapped by the nurseries; show it as itself.
        sole = sole_error(group)
        if isinstance(sole, LibpipeError):
            raise sole from None
        raise
    return 0


def apply_threads(threads: int | None) -> tuple[int, int]:
    """Give torch ``threads`` intra-op and inter-op threads, before any
    weights load; ``None``: torch's intra-op default for both. Returns what
    torch then uses (intra-op, inter-op).

    The default suits a server alone on its host. Every server process
    starts that many threads, and OpenMP threads busy-wait for work, so k
    servers on one host at the default run k times as many threads as there
    are cores and slow each other down; give each ``--threads`` cores / k.
    Inter-op threads run independent operators side by side (rare in a
    block's forward, which is a chain); torch can set them only once per
    process, before any parallel work, so a second call (tests run this
    in-process) keeps what the first set."""
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    wanted = torch.get_num_threads() if threads is None else threads
    torch.set_num_threads(wanted)
    if torch.get_num_interop_threads() != wanted:
        try:
            torch.set_num_interop_threads(wanted)
        except RuntimeError as exc:  # already set, or parallel work has started
            logging.getLogger("libpipe.server").warning(
                "inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc
            )
    return torch.get_num_threads(), torch.get_num_interop_threads()


def build_config(args: argparse.Namespace) -> ServerConfig:
    from ..server import ServerConfig, parse_blocks
    from ..swarm import GossipConfig

    optional = {
        "max_length": args.max_length,
        "idle_timeout": args.idle_timeout,
        "drain_grace": args.drain_grace,
        "max_batch": args.max_batch,
        "inline_decode_max": None if args.inline_decode_ms is None else args.inline_decode_ms / 1e3,
        "prefill_chunk": args.prefill_chunk,
        "backward_chunk": args.backward_chunk,
        "forward_chunk": args.forward_chunk,
        "cache_dir": Path(args.cache_dir) if args.cache_dir else None,
        "throughput": parse_throughput(args.throughput) if args.throughput else None,
        "num_blocks": args.num_blocks,
        "memory_bytes": parse_bytes(args.memory, "--memory") if args.memory else None,
        "rebalance_period": args.rebalance_period,
        "bulk_bytes": parse_bytes(args.bulk_bytes, "--bulk-bytes") if args.bulk_bytes else None,
    }
    return ServerConfig(
        model_dir=Path(args.model_dir),
        blocks=parse_blocks(args.blocks) if args.blocks else None,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        cache_bytes=parse_bytes(args.cache_bytes, "--cache-bytes"),
        batching=not args.no_batching,
        adapters=tuple(Path(a) for a in args.adapters),
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        announce_address=args.announce_address,
        gossip=getattr(GossipConfig, args.gossip)(),
        progress=not args.no_progress,
        **{k: v for k, v in optional.items() if v is not None},
    )


def parse_bytes(text: str, flag: str) -> int:
    """``1073741824``, ``512M``, ``4G`` (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _SUFFIXES.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _SUFFIXES else t
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "inf", "nan", "1e400" parse as floats but are no size
        raise ConfigError(f"{flag} must be a size like 512M or 4G, got {text!r}")
    if value < 0:
        raise ConfigError(f"{flag} must not be negative, got {text!r}")
    return int(value)


def parse_throughput(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        decode, forward = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--throughput must be DECODE,FORWARD (two numbers), got {text!r}"
        ) from None
    return decode, forward


async def _serve(
    config: ServerConfig, security: Security, ready_file: str | None, monitor_port: int | None
) -> None:
    import signal

    import trio

    from ..server import BlockServer

    server = BlockServer(config, security)
    logger = logging.getLogger("libpipe.server")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[str]) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            address = await nursery.start(serve_then_stop)
            assert server.serving is not None
            if monitor_port is not None:
                await nursery.start(_monitor, security, address, monitor_port)
            _announce_ready(address, server.peer_id, server.serving.blocks, ready_file)
            draining = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if draining:
                    logger.warning("%s again: stopping now", name)
                    nursery.cancel_scope.cancel()
                    break
                logger.info("%s: draining", name)
                draining = True
                nursery.start_soon(server.drain)


async def _monitor(
    security: Security, address: str, port: int, *, task_status: trio.TaskStatus[None]
) -> None:
    """The monitor page, looking at the swarm through this very server."""
    from ..monitor import Monitor, bound_address, open_http_listeners
    from ..net import ConnectionPool

    listeners = await open_http_listeners("127.0.0.1", port)
    host, bound = bound_address(listeners)
    print(f"libpipe-server monitor http://{host}:{bound}/", flush=True)
    async with ConnectionPool(security) as pool:
        monitor = Monitor(pool, [address])
        await monitor.serve_listeners(listeners, task_status=task_status)


def _announce_ready(
    address: str, peer_id: str, blocks: tuple[int, int], ready_file: str | None
) -> None:
    print(f"libpipe-server ready {address} {peer_id}", flush=True)
    if ready_file:
        facts = {"address": address, "peer_id": peer_id, "span": list(blocks), "pid": os.getpid()}
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(json.dumps(facts), encoding="utf-8")
        tmp.replace(ready_file)  # whole or absent: the launcher polls for it


if __name__ == "__main__":
    sys.exit(main())
