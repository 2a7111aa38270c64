"""Prompt tuning through a swarm: the model stays frozen on the servers,
only a soft prompt (and, with --deep, per-block deep prompts) trains here.

    .venv/bin/python examples/prompt_tuning.py [--steps 30] [--deep] [--model DIR]

Starts two real ``libpipe-server`` processes on 127.0.0.1 holding blocks
[0, 4) and [4, 8) of a model (by default a small random Llama written to a
temporary directory, since no weights can be downloaded here), connects a
``SyncClient``, and trains on a toy task: after any string of lowercase
letters, say " ok". Each step's ``loss.backward()`` goes back through the
servers' ``backward`` RPC; the loss printed per step falls as the prompt
learns to steer a model that has never seen the task.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from libpipe.client import PromptTuning, SyncClient
from libpipe.model import load_client_head, write_random_checkpoint
from libpipe.server import ServerProcess

SPANS = [(0, 4), (4, 8)]
ANSWER = b" ok"


def toy_batch(gen: torch.Generator, batch: int, letters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``: random letters then " ok" (byte ids); ``labels``: only
    the answer is to be learned."""
    text = torch.randint(ord("a"), ord("z") + 1, (batch, letters), generator=gen)
    answer = torch.tensor(list(ANSWER)).expand(batch, -1)
    ids = torch.cat([text, answer], dim=1)
    labels = ids.clone()
    labels[:, :letters] = PromptTuning.IGNORE_INDEX
    return ids, labels


def train(
    model_dir: Path,
    peers: Sequence[str],
    *,
    steps: int,
    deep: bool = False,
    prefix: int = 4,
    batch: int = 8,
    lr: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train a prompt through the servers at ``peers``; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    head = load_client_head(model_dir, progress=False)
    losses = []
    with SyncClient(model_dir, peers, insecure=True) as client:
        tuner = PromptTuning(client.remote_blocks(), head, prefix=prefix, deep=deep, generator=gen)
        optimizer = torch.optim.Adam([p for p in tuner.parameters() if p.requires_grad], lr=lr)
        for step in range(steps):
            began = time.perf_counter()
            ids, labels = toy_batch(gen, batch, letters=8)
            loss = tuner.loss(ids, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            log(f"step {step:3d}  loss {losses[-1]:.4f}  ({time.perf_counter() - began:.2f} s)")
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--deep", action="store_true", help="train deep prompts too")
    parser.add_argument("--model", type=Path, help="checkpoint (default: a random 8-block Llama)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_checkpoint(Path(tmp) / "model", "llama", seed=0)
        servers = []
        # One compute thread per server: two servers and this client share
        # the machine, and oversubscribed OpenMP threads spin-wait for each other.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            for blocks in SPANS:
                servers.append(
                    ServerProcess.start(
                        model_dir, blocks=blocks, extra_args=["--throughput", "100,1000"], env=env
                    )
                )
            print(f"servers: {', '.join(f'{s.address} {s.span}' for s in servers)}")
            losses = train(
                model_dir, [s.address for s in servers], steps=args.steps, deep=args.deep
            )
        finally:
            for server in servers:
                server.close()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
