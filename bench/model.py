"""Decode throughput of one span: sessions one at a time vs batched.

Baseline (same run): each of N sessions takes its decode step alone
(``InferenceSession.step``), as PETALS serves them. Contender: one
``BlockSpan.decode_batch`` call for all N. Prints tokens/s per mode and the
ratio; ``--json`` prints one JSON object instead.

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

from libpipe.model import KVCachePool, load_span, write_random_checkpoint


def _decode_rate(span, sessions, batched: bool, steps: int) -> float:
    """Aggregate decode tokens/s (one token per session per step), median of ``steps``."""
    d = span.config.hidden_size
    xs = [torch.randn(1, 1, d) for _ in sessions]
    start = sessions[0].position
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if batched:
            span.decode_batch(sessions, xs)
        else:
            for s, x in zip(sessions, xs, strict=True):
                s.step(x)
        times.append(time.perf_counter() - t0)
        for s in sessions:  # decode at the same context length every step
            s.rollback(start)
    return len(sessions) / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument(
        "--context", type=int, default=128, help="tokens already in each session's cache"
    )
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    overrides = {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": 1000,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, "llama", overrides=overrides)
        span = load_span(path, 0, args.blocks, progress=False)
    pool = KVCachePool(8 << 30)
    rows = []
    for n in args.sessions:
        sessions = [span.open_session(pool, batch=1, max_length=args.context + 8) for _ in range(n)]
        for s in sessions:
            s.step(torch.randn(1, args.context, args.hidden))
        alone = _decode_rate(span, sessions, batched=False, steps=args.steps)
        batched = _decode_rate(span, sessions, batched=True, steps=args.steps)
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
    single = next((r["alone_tok_s"] for r in rows if r["sessions"] == 1), None)
    result = {
        "bench": "model.decode",
        "hidden": args.hidden,
        "blocks": args.blocks,
        "context": args.context,
        "threads": torch.get_num_threads(),
        "rows": rows,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
