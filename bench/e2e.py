"""End to end: per-token decode latency through 1, 2 and 4 hops of real
``libpipe-server`` processes on loopback, against the same model run in
one process (the baseline, measured in the same run).

Rows: local; 1, 2, 4 hops direct; the same through a ``DelayProxy`` per hop
adding ``--delay-ms`` per round trip; and time to first token for a
``--prompt``-token prompt (session open + prefill + the first token).

``hop_overhead_ms`` is what each hop adds per token beyond its compute:
``(latency(h hops) - local latency) / h``, median over the hop counts on
loopback. The target is <= 1 ms. ``extra_hop_ms`` is the slope
``(latency(4) - latency(1)) / 3``, the cost of splitting the same blocks
over one more server.

    .venv/bin/python bench/e2e.py [--quick] [--json] [--hidden 512]

Every server and the client share this machine's cores: each server and
the baseline run ``--threads`` torch threads (default 1) so that the hops
do not oversubscribe a small machine; the baseline pays no contention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import torch
import trio

from libpipe import Client
from libpipe.model import KVCachePool, load_client_head, load_span, write_random_checkpoint
from libpipe.net import DelayProxy
from libpipe.server import ServerProcess

BLOCKS = 8


def write_model(root: Path, hidden: int) -> Path:
    heads = max(1, hidden // 64)
    overrides = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": 1000,
    }
    return write_random_checkpoint(root / "model", "llama", overrides=overrides, seed=0)


@torch.no_grad()
def local_latency(model: Path, tokens: int, prompt: int) -> tuple[float, float]:
    """(median seconds per decode token, time to first token) in one process."""
    head = load_client_head(model, progress=False)
    span = load_span(model, 0, BLOCKS, progress=False)
    pool = KVCachePool(1 << 30)
    ids = torch.randint(0, 1000, (1, prompt))
    t0 = time.perf_counter()
    session = span.open_session(pool, batch=1, max_length=prompt + tokens + 1)
    logits = head.logits(session.step(head.embed(ids)))
    token = logits[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        token = head.logits(session.step(head.embed(token)))[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    session.close()
    return statistics.median(times), ttft


def start_servers(model: Path, hops: int, cache: Path, threads: int) -> list[ServerProcess]:
    per = BLOCKS // hops
    spans = [(i * per, (i + 1) * per) for i in range(hops)]
    args = ["--throughput", "100,1000", "--cache-dir", str(cache), "--log-level", "WARNING"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with ThreadPoolExecutor(max_workers=hops) as pool:
        return list(
            pool.map(
                lambda s: ServerProcess.start(model, blocks=s, extra_args=args, env=env), spans
            )
        )


async def swarm_latency(
    model: Path, addresses: list[str], tokens: int, prompt: int, delay: float
) -> tuple[float, float]:
    """(median seconds per decode token, time to first token) through the servers."""
    async with AsyncExitStack() as stack:
        if delay:
            proxies = [
                await stack.enter_async_context(DelayProxy(a, delay=delay / 2)) for a in addresses
            ]
            addresses = [p.address for p in proxies]
        client = await stack.enter_async_context(Client(model, addresses, insecure=True))
        ids = torch.randint(0, 1000, (1, prompt))
        for _ in range(2):  # warm connections and the servers' first steps
            await client.generate(ids, max_new_tokens=2, stop_tokens=())
        t0 = time.perf_counter()
        async with client.inference_session(max_length=prompt + tokens + 1) as session:
            logits = await session.step(ids)
            token = logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            times = []
            for _ in range(tokens):
                t = time.perf_counter()
                token = (await session.step(token))[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t)
        return statistics.median(times), ttft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps measured per row")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length for time to first token")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="added round trip per hop")
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per server and for the baseline"
    )
    ap.add_argument("--quick", action="store_true", help="small model, few tokens")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.tokens = 128, 16
    if any(h < 1 or BLOCKS % h for h in args.hops):
        ap.error(f"--hops must divide {BLOCKS}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp), args.hidden)
        local, local_ttft = local_latency(model, args.tokens, args.prompt)
        rows.append({"mode": "local", "hops": 0, "delay_ms": 0.0, "ms_per_token": 1e3 * local,
                     "ttft_ms": 1e3 * local_ttft})  # fmt: skip
        for hops in args.hops:
            servers = start_servers(model, hops, Path(tmp) / "cache", args.threads)
            try:
                addresses = [s.address for s in servers]
                for delay in (0.0, args.delay_ms / 1e3):
                    per_token, ttft = trio.run(
                        swarm_latency, model, addresses, args.tokens, args.prompt, delay
                    )
                    rows.append({"mode": "swarm", "hops": hops, "delay_ms": 1e3 * delay,
                                 "ms_per_token": 1e3 * per_token, "ttft_ms": 1e3 * ttft})  # fmt: skip
            finally:
                for s in servers:
                    s.close()
    for r in rows:
        r["ratio_to_local"] = r["ms_per_token"] / rows[0]["ms_per_token"]
        r["overhead_ms_per_hop"] = (
            (r["ms_per_token"] - rows[0]["ms_per_token"] - r["delay_ms"] * r["hops"]) / r["hops"]
            if r["hops"]
            else 0.0
        )
    loopback = {r["hops"]: r for r in rows if r["mode"] == "swarm" and r["delay_ms"] == 0}
    result = {
        "bench": "e2e",
        "hidden": args.hidden,
        "blocks": BLOCKS,
        "tokens": args.tokens,
        "prompt": args.prompt,
        "delay_ms": args.delay_ms,
        "threads": args.threads,
        "local_ms_per_token": rows[0]["ms_per_token"],
        "hop_overhead_ms": statistics.median(r["overhead_ms_per_hop"] for r in loopback.values()),
        "rows": rows,
    }
    if 1 in loopback and 4 in loopback:
        result["extra_hop_ms"] = (loopback[4]["ms_per_token"] - loopback[1]["ms_per_token"]) / 3
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"end to end decode, {BLOCKS} blocks, hidden {args.hidden}, {args.tokens} tokens/row, "
          f"time to first token for {args.prompt} tokens")  # fmt: skip
    print(f"{'mode':>6} {'hops':>5} {'+RTT/hop':>9} {'ms/token':>9} {'x local':>8} "
          f"{'overhead/hop':>13} {'TTFT ms':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['mode']:>6} {r['hops']:>5} {r['delay_ms']:>7.1f}ms {r['ms_per_token']:>9.2f} "
              f"{r['ratio_to_local']:>8.2f} {r['overhead_ms_per_hop']:>11.2f}ms {r['ttft_ms']:>8.1f}")  # fmt: skip
    print(f"hop_overhead_ms (median over loopback rows): {result['hop_overhead_ms']:.2f} "
          f"(target <= 1.0)")  # fmt: skip
    if "extra_hop_ms" in result:
        print(f"extra_hop_ms (slope 1 -> 4 hops): {result['extra_hop_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
