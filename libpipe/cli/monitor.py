"""`libpipe monitor`: a live page of the swarm (coverage map, servers, events) on 127.0.0.1."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ._swarm_options import add_swarm_options, peers_of, security_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="serve a live web page of the swarm on 127.0.0.1",
        description="Poll the swarm through any peer and serve a page on 127.0.0.1 showing "
        "block coverage, the servers and recent events (joins, deaths, moves), updating live.",
    )
    add_swarm_options(parser)
    parser.add_argument(
        "--port", type=int, default=8080, help="port of the page on 127.0.0.1 (0: any free one)"
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between looks"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import trio

    from ..monitor import Monitor, bound_address, open_http_listeners
    from ..net import ConnectionPool

    peers = peers_of(args)
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if not args.interval > 0:
        raise ConfigError(f"--interval must be positive, got {args.interval}")
    security = security_of(args)

    async def main() -> None:
        async with ConnectionPool(security) as pool:
            monitor = Monitor(pool, peers, interval=args.interval, timeout=args.timeout)
            listeners = await open_http_listeners("127.0.0.1", args.port)
            host, port = bound_address(listeners)
            print(f"libpipe monitor: http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
            await monitor.serve_listeners(listeners)

    trio.run(main)
    return 0
