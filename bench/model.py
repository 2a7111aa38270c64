"""Decode throughput of one span: sessions one at a time vs batched.

Baseline (same run): each of N sessions takes its decode step alone
(``InferenceSession.step``), as PETALS serves them. Contender: one
``BlockSpan.decode_batch`` call for all N. Prints tokens/s per mode and the
ratio; ``--json`` prints one JSON object instead. Also: prefill tokens/s
with the prompt in chunks vs in one pass (what bounding the attention
scratch costs).

    .venv/bin/python bench/model.py [--hidden 1024 --blocks 8 --context 128 --json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from _shapes import llama_overrides

from libpipe.model import KVCachePool, load_span, write_random_checkpoint


def _decode_rates(span, sessions, steps: int) -> tuple[float, float]:
    """Aggregate decode tokens/s (one token per session per step), alone and
    batched, as medians over ``steps`` rounds that alternate the two modes so
    that load from other processes hits both alike."""
    xs = [torch.randn(1, 1, span.config.hidden_size) for _ in sessions]
    start = sessions[0].position
    alone, batched = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        for s, x in zip(sessions, xs, strict=True):
            s.step(x)
        t1 = time.perf_counter()
        for s in sessions:  # decode at the same context length every round
            s.rollback(start)
        t2 = time.perf_counter()
        span.decode_batch(sessions, xs)
        t3 = time.perf_counter()
        for s in sessions:
            s.rollback(start)
        alone.append(t1 - t0)
        batched.append(t3 - t2)
    n = len(sessions)
    return n / statistics.median(alone), n / statistics.median(batched)


def _prefill_rate(span, pool, length: int, chunk: int) -> float:
    x = torch.randn(1, length, span.config.hidden_size)
    span.prefill_chunk = chunk
    with span.open_session(pool, batch=1, max_length=length) as s:
        t0 = time.perf_counter()
        s.step(x)
        return length / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument(
        "--context", type=int, default=128, help="tokens already in each session's cache"
    )
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=2048, help="prompt length for the prefill rows")
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="a small model and short rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.sessions, args.prefill, args.chunks = 256, [1, 4], 256, [64, 256]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = llama_overrides(args.hidden, args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, "llama", overrides=overrides)
        span = load_span(path, 0, args.blocks, progress=False)
    pool = KVCachePool(8 << 30)
    rows = []
    for n in args.sessions:
        sessions = [span.open_session(pool, batch=1, max_length=args.context + 8) for _ in range(n)]
        for s in sessions:
            s.step(torch.randn(1, args.context, args.hidden))
        alone, batched = _decode_rates(span, sessions, args.steps)
        rows.append(
            {
                "sessions": n,
                "alone_tok_s": alone,
                "batched_tok_s": batched,
                "ratio": batched / alone,
            }
        )
        for s in sessions:
            s.close()
    whole = _prefill_rate(span, pool, args.prefill, args.prefill)
    prefill = [
        {"chunk": c, "tok_s": (r := _prefill_rate(span, pool, args.prefill, c)), "ratio": r / whole}
        for c in args.chunks
    ]
    prefill.append({"chunk": args.prefill, "tok_s": whole, "ratio": 1.0})
    single = next((r["alone_tok_s"] for r in rows if r["sessions"] == 1), None)
    result = {
        "bench": "model.decode",
        "hidden": args.hidden,
        "blocks": args.blocks,
        "context": args.context,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "prefill_len": args.prefill,
        "prefill": prefill,
    }
    for r in rows:
        result[f"batched_speedup_{r['sessions']}"] = r["ratio"]
        if single:
            result[f"aggregate_vs_single_{r['sessions']}"] = r["batched_tok_s"] / single
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"decode, {args.blocks} blocks, hidden {args.hidden}, context {args.context}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'sessions':>8} {'alone tok/s':>12} {'batched tok/s':>14} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['sessions']:>8} {r['alone_tok_s']:>12.1f} {r['batched_tok_s']:>14.1f} {r['ratio']:>7.2f}"
        )
    if single:
        print(
            f"aggregate batched at {rows[-1]['sessions']} sessions vs one session: "
            f"{rows[-1]['batched_tok_s'] / single:.2f}x"
        )
    print(f"\nprefill of {args.prefill} tokens, one session")
    print(f"{'chunk':>8} {'tok/s':>12} {'vs one pass':>12}")
    for p in prefill:
        print(f"{p['chunk']:>8} {p['tok_s']:>12.1f} {p['ratio']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
