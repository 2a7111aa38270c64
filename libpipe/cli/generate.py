"""`libpipe generate`: generate tokens with a model served by a swarm.

Streams the new tokens to stdout as they come (text when the checkpoint
has a tokenizer, else token ids); with ``--json`` prints one object with
the token ids, the route taken and timings instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import ConfigError
from ._swarm_options import add_swarm_options, peers_of, security_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model served by a swarm",
        description="Load the model's embeddings and head from --model, route through the "
        "swarm's servers for the blocks, and stream the new tokens.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the checkpoint directory")
    add_swarm_options(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text (needs tokenizer.json)")
    prompt.add_argument("--prompt-ids", metavar="ID,ID,...", help="token ids, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, required=True, metavar="N")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampled"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus cut (default 1: none)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k cut (default 0: none)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible runs)")
    parser.add_argument(
        "--no-stop",
        action="store_true",
        help="do not stop at the checkpoint's eos token (--stop and --stop-ids still apply)",
    )
    parser.add_argument(
        "--no-forwarding",
        action="store_true",
        help="carry each hop's output to the next hop from here; servers do not push "
        "to each other (for servers that cannot reach each other)",
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME",
        help="a LoRA adapter: route only through servers started with it (--adapters)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end when the generated text contains TEXT (needs tokenizer.json); repeatable",
    )
    parser.add_argument(
        "--stop-ids",
        action="append",
        default=[],
        metavar="ID,ID,...",
        help="end when the generated ids end with this sequence; repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.set_defaults(func=_run)


def parse_ids(text: str, flag: str = "--prompt-ids") -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; errors name ``flag``."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be integers separated by commas, got {text!r}") from None
    if not ids:
        raise ConfigError(f"{flag} needs at least one token id")
    return ids


def _run(args: argparse.Namespace) -> int:
    # Arguments first: a typo costs no torch import.
    prompt: str | list[int] = args.prompt if args.prompt is not None else parse_ids(args.prompt_ids)
    stop: list[str | list[int]] = [*args.stop, *(parse_ids(i, "--stop-ids") for i in args.stop_ids)]
    peers = peers_of(args)
    import trio

    from ..client import Client, RetryPolicy

    security = security_of(args)
    client = Client(
        args.model,
        peers,
        security=security,
        retry=RetryPolicy(connect_timeout=args.timeout),
        forwarding=not args.no_forwarding,
    )
    if isinstance(prompt, str) and not client.has_tokenizer:
        raise ConfigError(f"--prompt needs {args.model}/tokenizer.json; use --prompt-ids")
    if args.stop and not client.has_tokenizer:
        raise ConfigError(f"--stop needs {args.model}/tokenizer.json; use --stop-ids")
    result = trio.run(_generate, client, prompt, stop, args)
    if args.json:
        print(json.dumps(result))
    return 0


async def _generate(
    client: Any, prompt: str | list[int], stop: list[str | list[int]], args: argparse.Namespace
) -> dict:
    from ..client import TextStream

    text = TextStream(client.decode)
    text_out = client.has_tokenizer and not args.json
    started = time.perf_counter()
    first_token_s: float | None = None
    tokens: list[int] = []
    async with client:
        connected = time.perf_counter()
        async for token in client.stream(
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop_tokens=() if args.no_stop else None,
            stop=stop,
            adapter=args.adapter,
        ):
            if first_token_s is None:
                first_token_s = time.perf_counter() - connected
            tokens.append(token)
            if not args.json:
                sys.stdout.write(text.push(token) if text_out else f"{token} ")
                sys.stdout.flush()
        done = time.perf_counter()
        route = [
            {"peer_id": h.peer_id, "address": h.server.address, "start": h.start, "end": h.end}
            for h in client.last_route
        ]
    if not args.json:
        sys.stdout.write((text.flush() if text_out else "") + "\n")
    decode_s = done - connected - (first_token_s or 0.0)
    return {
        "token_ids": tokens,
        "text": client.decode(tokens) if client.has_tokenizer else None,
        "route": route,
        "timings": {
            "connect_s": connected - started,
            "first_token_s": first_token_s,
            "total_s": done - started,
            "decode_ms_per_token": 1000 * decode_s / max(1, len(tokens) - 1),
        },
    }
