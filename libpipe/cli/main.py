"""`libpipe` — one command with subcommands.

Each public module of this package (no leading underscore) is one
subcommand and exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a function taking the parsed arguments and returning an
exit status. Adding a subcommand is adding a file. Modules import their
heavy dependencies (torch, trio) inside ``func`` so that ``libpipe --help``
stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ..errors import LibpipeError


def subcommand_modules() -> list[str]:
    """Module names under libpipe.cli that are subcommands, sorted."""
    package = importlib.import_module(__package__)
    return sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and info.name != "main"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libpipe",
        description="Run large language models across a swarm of small GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in subcommand_modules():
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
