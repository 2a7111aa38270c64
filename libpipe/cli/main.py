"""`libpipe` — one command with subcommands.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning an exit status. Modules
import their heavy dependencies (torch, trio) inside ``func`` so that
``libpipe --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import LibpipeError

# Module names under libpipe.cli, in the order `--help` lists them.
SUBCOMMANDS: tuple[str, ...] = ("ca",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libpipe",
        description="Run large language models across a swarm of small GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LibpipeError as exc:
        # A typed error is the user's answer, not a crash: no traceback.
        print(f"libpipe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
