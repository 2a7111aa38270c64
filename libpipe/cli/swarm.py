"""`libpipe swarm`: the swarm as one node sees it: servers, RTTs, coverage, warnings."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from ._swarm_options import add_swarm_options, peers_of, security_of

if TYPE_CHECKING:
    from ..swarm import SwarmSnapshot

# Blocks per row of the coverage table: fits 100 columns.
BLOCKS_PER_ROW = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "swarm",
        help="show the servers of a swarm and how well they cover the model",
        description="Ask a peer for the swarm view, verify every record, ping every "
        "server from here, and print servers, per-block coverage and warnings.",
    )
    add_swarm_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import trio

    from ..net import ConnectionPool
    from ..swarm import survey

    peers = peers_of(args)
    security = security_of(args)

    async def main() -> SwarmSnapshot:
        async with ConnectionPool(security) as pool:
            return await survey(pool, peers, timeout=args.timeout)

    snapshot = trio.run(main)
    if args.json:
        print(json.dumps(snapshot.to_json(), indent=2))
    else:
        print(render(snapshot))
    return 0


def render(snapshot: SwarmSnapshot) -> str:
    """The human-readable report."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot.taken_at))
    lines = [f"swarm view from {snapshot.source} at {when}: {len(snapshot.servers)} server(s)", ""]
    header = (
        "PEER", "ADDRESS", "MODEL", "SPAN", "STATE", "DECODE/s", "FWD tok/s", "FREE CACHE",
        "SESS", "RTT",
    )  # fmt: skip
    rows = [header]
    for s in sorted(snapshot.servers, key=lambda s: (s.record.model_id, s.record.span)):
        r = s.record
        rows.append(
            (
                r.peer_id[:8],
                r.addresses[0],
                r.model_id,
                f"{r.span[0]}:{r.span[1]}",
                r.state.value,
                f"{r.throughput_decode:.1f}",
                f"{r.throughput_forward:.0f}",
                _bytes(r.free_cache_bytes),
                str(r.active_sessions),
                "-" if s.rtt is None else f"{s.rtt * 1000:.1f} ms",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {5, 6, 7, 8, 9}
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    for model in snapshot.models:
        size = f"{model.num_blocks} blocks"
        if model.size_from == "spans":
            size = f"block count unknown, {model.num_blocks} seen"
        lines += ["", f"coverage of {model.model_id} ({size}; online servers per block):"]
        for first in range(0, model.num_blocks, BLOCKS_PER_ROW):
            blocks = range(first, min(first + BLOCKS_PER_ROW, model.num_blocks))
            lines.append("  block    " + "".join(f"{b:>6}" for b in blocks))
            lines.append("  servers  " + "".join(f"{model.servers[b]:>6}" for b in blocks))
            lines.append(
                "  steps/s  "
                + "".join(
                    f"{model.throughput[b]:>6.0f}" if model.servers[b] else f"{'-':>6}"
                    for b in blocks
                )
            )
    warnings = snapshot.warnings()
    lines += [
        "",
        "warnings:" if warnings else "no warnings: every block has a second online server",
    ]
    lines += [f"  ! {w}" for w in warnings]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
