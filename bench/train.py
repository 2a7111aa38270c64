"""Training steps/s through remote blocks vs the same model run locally.

One training step is prompt tuning's: embeddings with a soft prompt (and
deep prompts) go through every block, the loss comes back, and
``loss.backward()`` reaches the prompts, here through the servers'
``backward`` RPC. Baseline (same run, same process): the same step with
the blocks as a local ``BlockSpan``, plain autograd. Contender: two real
``libpipe-server`` processes holding [0, L/2) and [L/2, L) on 127.0.0.1,
with fp32 and with fp16 on the wire; and two replicas of the whole model
with the batch split in two halves that run at once (``max_rows``, fp32).
Prints steps/s, ms/step, tensor bytes sent and received per step and the
ratio to local; ``--json`` prints one JSON object instead. Rounds alternate the modes so that load from other
processes hits all alike; figures are medians.

    .venv/bin/python bench/train.py [--hidden 256 --batch 8 --tokens 64 --steps 10 --quick --json]

On a 2-core machine the servers and the client share the cores, so the
ratio says what the protocol and the recompute cost beyond the compute
itself (the server recomputes its forward for backward), not what a swarm
of GPUs gains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from libpipe.client import PromptTuning, RemoteBlocks, SyncClient
from libpipe.model import load_client_head, load_span, write_random_checkpoint
from libpipe.server import ServerProcess


def _step(tuner: PromptTuning, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    loss = tuner.loss(ids)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - began


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="measured rounds")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the client and of each server (three processes share the cores)",
    )
    ap.add_argument("--quick", action="store_true", help="small model, few rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.tokens, args.steps = 64, 32, 4
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    overrides = {
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
        "num_hidden_layers": args.blocks,
    }
    half = args.blocks // 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_checkpoint(Path(tmp) / "m", "llama", overrides=overrides)
        head = load_client_head(model_dir, progress=False)
        ids = torch.randint(0, head.config.vocab_size, (args.batch, args.tokens))
        servers = []
        try:
            # A chain of two, then two replicas of the whole model.
            for blocks in [(0, half), (half, args.blocks), (0, args.blocks), (0, args.blocks)]:
                servers.append(
                    ServerProcess.start(
                        model_dir, blocks=blocks, extra_args=["--throughput", "100,1000"], env=env
                    )
                )
            chain = [s.address for s in servers[:2]]
            replicas = [s.address for s in servers[2:]]
            local = PromptTuning(
                load_span(model_dir, 0, args.blocks, progress=False),
                head,
                prefix=args.prefix,
                deep=True,
            )
            modes: dict[str, tuple[PromptTuning, RemoteBlocks | None]] = {"local": (local, None)}
            clients = {
                "remote fp32": (chain, torch.float32, None),
                "remote fp16": (chain, torch.float16, None),
                "2 replicas": (replicas, torch.float32, max(1, args.batch // 2)),
            }
            opened = []
            for name, (peers, wire, rows) in clients.items():
                client = SyncClient(model_dir, peers, insecure=True, wire_dtype=wire)
                opened.append(client)
                blocks = client.remote_blocks(max_rows=rows)
                modes[name] = (PromptTuning(blocks, head, prefix=args.prefix, deep=True), blocks)
            optimizers = {
                name: torch.optim.Adam([tuner.prompt, tuner.deep_prompts], lr=1e-3)
                for name, (tuner, _) in modes.items()
            }
            for name, (tuner, _) in modes.items():  # warm up: connections, allocator
                _step(tuner, optimizers[name], ids)
            counts = {name: (b.bytes_sent, b.bytes_received) for name, (_, b) in modes.items() if b}
            times: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(args.steps):
                for name, (tuner, _) in modes.items():
                    times[name].append(_step(tuner, optimizers[name], ids))
            for client in opened:
                client.close()
        finally:
            for server in servers:
                server.close()
    base = statistics.median(times["local"])
    rows = []
    for name, (_, blocks) in modes.items():
        t = statistics.median(times[name])
        sent = received = 0.0
        if blocks is not None:
            sent = (blocks.bytes_sent - counts[name][0]) / args.steps
            received = (blocks.bytes_received - counts[name][1]) / args.steps
        rows.append(
            {"mode": name, "steps_s": 1 / t, "ms_step": 1e3 * t, "bytes_sent": sent,
             "bytes_received": received, "ratio": base / t}
        )  # fmt: skip
    result = {
        "hidden": args.hidden,
        "blocks": args.blocks,
        "batch": args.batch,
        "tokens": args.tokens,
        "prefix": args.prefix,
        "threads": args.threads,
        "rows": rows,
        "local_steps_s": rows[0]["steps_s"],
        "remote_fp32_steps_s": rows[1]["steps_s"],
        "remote_fp16_steps_s": rows[2]["steps_s"],
        "remote_fp32_ratio": rows[1]["ratio"],
        "remote_fp16_ratio": rows[2]["ratio"],
        "bytes_sent_per_step_fp16": rows[2]["bytes_sent"],
        "replicas_steps_s": rows[3]["steps_s"],
        "replicas_ratio": rows[3]["ratio"],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"model: {args.blocks} blocks, hidden {args.hidden}; step: batch {args.batch} x "
        f"{args.tokens} tokens + {args.prefix} prompt positions, deep prompts; "
        f"{args.threads} torch thread(s) per process"
    )
    print(
        f"{'mode':<12} {'steps/s':>8} {'ms/step':>8} {'sent/step':>11} {'recv/step':>11} {'vs local':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:<12} {r['steps_s']:>8.2f} {r['ms_step']:>8.1f} "
            f"{r['bytes_sent'] / 1e6:>9.2f}MB {r['bytes_received'] / 1e6:>9.2f}MB {r['ratio']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
