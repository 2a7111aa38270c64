"""The smallest trio program that runs a model on a libpipe swarm.

    python examples/trio_client.py --model examples/demo_model \\
        --peer 10.0.0.5:31337 --identity ~/libpipe/client [--prompt TEXT] [--stop TEXT]

``--model`` is the checkpoint directory: the client reads only config.json,
the embeddings, final norm and LM head from it, and tokenizer.json; the
blocks run on the swarm's servers. ``--peer`` is any member of the swarm
(repeat it for more); the client learns the rest by gossip. ``--identity``
is a directory made by ``libpipe ca issue``; ``--insecure`` instead talks
plaintext to servers started with ``--insecure`` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import aclosing

import trio

import libpipe
from libpipe.client import TextStream


async def main(args: argparse.Namespace) -> None:
    async with libpipe.Client(
        args.model, args.peer, identity=args.identity, insecure=args.insecure
    ) as client:
        print(args.prompt, end="", flush=True)
        tokens: list[int] = []
        # Decodes piece by piece, holding back a character split over tokens.
        text = TextStream(client.decode)
        started = time.perf_counter()
        # aclosing: should the loop end early (an error, a break), the
        # servers' sessions close at once, not when the generator is collected.
        async with aclosing(
            client.stream(args.prompt, max_new_tokens=args.tokens, stop=args.stop)
        ) as stream:
            async for token in stream:
                tokens.append(token)
                print(text.push(token), end="", flush=True)
        print(text.flush(), end="")
        elapsed = time.perf_counter() - started
        route = " -> ".join(hop.describe() for hop in client.last_route)
        print(f"\n\n{len(tokens)} tokens in {elapsed:.2f} s via {route}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate text on a libpipe swarm (trio).")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--peer", action="append", required=True, help="HOST:PORT of a member")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--identity", help="identity directory (libpipe ca issue)")
    who.add_argument("--insecure", action="store_true", help="plaintext, local development")
    parser.add_argument("--prompt", default="And God said")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end at TEXT (repeatable)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
