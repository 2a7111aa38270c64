"""Decode throughput of a real `libpipe-server` with 1, 4 and 16 concurrent sessions.

Two server processes hold the same generated model, one batching decode
steps of concurrent sessions (continuous batching), one running them one
at a time as PETALS does (``--no-batching``): the baseline, measured in the
same run, alternating with the contender so that load from other processes
hits both alike. Each session opens an inference stream, sends a prompt,
then decode steps (one token each, fp16 on the wire) as fast as replies
come. Reported: aggregate decode tokens/s per mode and session count,
``batched_speedup_N`` (batching on at N sessions vs one session) and
``batching_gain_N`` (on vs off at N sessions).

    .venv/bin/python bench/server.py [--quick] [--json] [--hidden 1024 --blocks 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time

import torch
import trio

from libpipe.model import write_random_checkpoint
from libpipe.net import ConnectionPool, Security
from libpipe.server import ServerProcess


async def decode_rate(
    address: str, blocks: tuple[int, int], n: int, seconds: float, hidden: int, prompt: int
) -> float:
    """Aggregate decode tokens/s of ``n`` concurrent sessions over ``seconds``.

    Every session first opens and prefills; then all decode, and only steps
    completed inside the window (after a short warm-up) are counted."""
    counted = [0] * n
    all_open = trio.Event()
    opened = 0
    window: list[float] = []
    meta = {"start": blocks[0], "end": blocks[1], "batch": 1, "max_length": 8192}

    async def session(conn, i: int) -> None:
        nonlocal opened
        async with conn.open_stream("inference", meta) as stream:
            await stream.receive()
            await stream.send({"position": 0}, (torch.randn(1, prompt, hidden).half(),))
            await stream.receive()
            opened += 1
            if opened == n:
                warmup = min(1.0, seconds / 4)
                window.extend(
                    [time.perf_counter() + warmup, time.perf_counter() + warmup + seconds]
                )
                all_open.set()
            await all_open.wait()
            one = torch.randn(1, 1, hidden).half()
            position = prompt
            while time.perf_counter() < window[1]:
                await stream.send({"position": position}, (one,))
                await stream.receive()
                position += 1
                if window[0] <= time.perf_counter() <= window[1]:
                    counted[i] += 1
            await stream.close_send()

    async with ConnectionPool(Security.insecure()) as pool:
        conn = await pool.get(address)
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(session, conn, i)
    return sum(counted) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per point")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (median)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per session")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per server (0: torch's default)"
    )
    ap.add_argument("--quick", action="store_true", help="short run: 2 s per point, one round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # The plaintext warning would repeat for every connection of the run.
    logging.getLogger("libpipe.net").setLevel(logging.ERROR)
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    heads = max(1, args.hidden // 64)
    overrides = {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": 1000,
    }
    rates: dict[str, dict[int, list[float]]] = {"batched": {}, "unbatched": {}}
    common = ["--throughput", "1,1", "--cache-bytes", "4G", "--log-level", "WARNING"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_checkpoint(tmp, "llama", overrides=overrides)
        with (
            ServerProcess.start(model, blocks=(0, args.blocks), extra_args=common) as on,
            ServerProcess.start(
                model, blocks=(0, args.blocks), extra_args=[*common, "--no-batching"]
            ) as off,
        ):
            for _ in range(args.rounds):
                for n in args.sessions:
                    for mode, server in (("batched", on), ("unbatched", off)):
                        rate = trio.run(
                            decode_rate,
                            server.address,
                            (0, args.blocks),
                            n,
                            args.seconds,
                            args.hidden,
                            args.prompt,
                        )
                        rates[mode].setdefault(n, []).append(rate)
    median = {mode: {n: statistics.median(v) for n, v in r.items()} for mode, r in rates.items()}
    result: dict[str, object] = {
        "bench": "server.decode",
        "hidden": args.hidden,
        "blocks": args.blocks,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "threads": args.threads or torch.get_num_threads(),
        "decode_tok_s": {mode: {str(n): v for n, v in m.items()} for mode, m in median.items()},
    }
    single = median["batched"].get(1)
    for n in args.sessions:
        if single:
            result[f"batched_speedup_{n}"] = median["batched"][n] / single
        result[f"batching_gain_{n}"] = median["batched"][n] / median["unbatched"][n]
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"libpipe-server decode, {args.blocks} blocks, hidden {args.hidden}, "
        f"{args.threads or torch.get_num_threads()} threads per server, "
        f"{args.seconds:g} s x {args.rounds} round(s) per point"
    )
    print(f"{'sessions':>8} {'batched tok/s':>14} {'one-at-a-time':>14} {'gain':>6} {'vs 1':>6}")
    for n in args.sessions:
        b, u = median["batched"][n], median["unbatched"][n]
        vs1 = f"{b / single:6.2f}" if single else "     -"
        print(f"{n:>8} {b:>14.1f} {u:>14.1f} {b / u:>6.2f} {vs1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
