"""The options every command that talks to a running swarm shares."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..net import Security


def add_swarm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peers",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="any member(s) of the swarm; the first that answers is asked for the view",
    )
    parser.add_argument("--identity", metavar="DIR", help="identity made by `libpipe ca issue`")
    parser.add_argument(
        "--ca", metavar="FILE", help="swarm CA certificate (default: the identity's)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, no authentication (local development)"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="per request (default 5 s)"
    )


def peers_of(args: argparse.Namespace) -> list[str]:
    """``--peers`` as a list, each checked to be ``host:port``."""
    from ..net import parse_address

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not peers:
        raise ConfigError("--peers needs at least one HOST:PORT")
    for peer in peers:
        parse_address(peer)
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    return peers


def security_of(args: argparse.Namespace) -> Security:
    from ..net import Security

    return Security.from_options(identity=args.identity, ca=args.ca, insecure=args.insecure)
