"""`libpipe demo`: what libpipe does, on this machine, in about a minute."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="show libpipe working on this machine",
        description="Show libpipe working on this machine.",
    )
    parser.add_argument(
        "--codec",
        action="store_true",
        help="push a real activation of a small Llama checkpoint through the wire codec "
        "and print its sizes and timings",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ._demo_codec import run

    # The block server and client are not in yet: until they are, the demo
    # shows the part of the pipeline that exists, the codec.
    status = run()
    if not args.codec:
        print(
            "\ncoming next: `libpipe demo` starts a private TLS swarm of block servers on "
            "127.0.0.1,\nstreams text from a small trained model through them, and kills one "
            "server mid-generation."
        )
    return status
