"""`libpipe demo`: a private swarm on this machine generating text, in about a minute.

Starts a fresh swarm CA and identities, three or four ``libpipe-server``
processes on 127.0.0.1 over the demo model (mutual TLS, joined by gossip),
and a ``libpipe.Client`` that streams text through them while showing its
route and per-token latency. Part-way, it kills a server on the route; the
client re-routes to a replica and carries on. Then it checks the text
against the same model run locally, and shuts the swarm down.

``--codec`` shows the wire codec on a real activation instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError

DEFAULT_PROMPT = "And God said"


def default_model_dir() -> Path:
    """The checkpoint trained by examples/train_demo_model.py, in the source
    tree this package runs from (`make demo` installs it editable)."""
    return Path(__file__).resolve().parents[2] / "examples" / "demo_model"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a local swarm generating text (or --codec: the wire codec)",
        description="Start a fresh swarm CA and identities, 3 or 4 libpipe-server processes "
        "on 127.0.0.1 over the demo model (mutual TLS, spans chosen by gossip), and a client "
        "that streams text through them, showing its route and per-token latency. Part-way, "
        "a server on the route is killed; the client re-routes to a replica and carries on. "
        "The text is checked against the same model run locally, then the swarm shuts down.",
    )
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: examples/demo_model)"
    )
    parser.add_argument("--servers", type=int, default=4, choices=(3, 4), help="default 4")
    parser.add_argument("--tokens", type=int, default=120, help="tokens to generate (default 120)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default {DEFAULT_PROMPT!r}")
    parser.add_argument(
        "--kill-after",
        type=int,
        metavar="N",
        help="kill a server after N tokens (default: a third of --tokens; 0: never)",
    )
    parser.add_argument(
        "--codec",
        action="store_true",
        help="instead: push a real activation of a small Llama checkpoint through the wire "
        "codec and print its sizes and timings",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.codec:
        from ._demo_codec import run

        return run()
    if args.tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {args.tokens}")
    if not args.prompt:
        # Checked before a minute of swarm start-up: an empty prompt has no token to prefill.
        raise ConfigError("--prompt must not be empty")
    kill_after = args.tokens // 3 if args.kill_after is None else args.kill_after
    if not 0 <= kill_after < args.tokens:
        raise ConfigError(f"--kill-after must be in [0, {args.tokens}), got {kill_after}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (model_dir / "config.json").exists():
        raise ConfigError(
            f"no demo model at {model_dir}: pass --model DIR, or train one with "
            "examples/train_demo_model.py"
        )
    if not (model_dir / "tokenizer.json").exists():
        raise ConfigError(f"{model_dir} has no tokenizer.json: the demo prints text")
    from ._demo_main import run_swarm_demo

    return run_swarm_demo(
        model_dir,
        servers=args.servers,
        prompt=args.prompt,
        tokens=args.tokens,
        kill_after=kill_after or None,
        bundled=args.model is None,
    )
