"""Decode throughput of a real `libpipe-server` with 1, 4 and 16 concurrent sessions,
and decode latency while a long backward runs.

Decode part: two server processes hold the same generated model, one
batching decode steps of concurrent sessions (continuous batching), one
running them one at a time as PETALS does (``--no-batching``): the
baseline, measured in the same run, alternating with the contender so that
load from other processes hits both alike. Each session opens an inference
stream, sends a prompt, then decode steps (one token each, fp16 on the
wire) as fast as replies come. Reported: aggregate decode tokens/s per mode
and session count, ``batched_speedup_N`` (batching on at N sessions vs one
session) and ``batching_gain_N`` (on vs off at N sessions).

Backward part: one interactive session decodes while another client sends
backward calls over the whole span back to back (``--bulk-tokens`` tokens
each). Two servers, alternating: ``--backward-chunk`` = the whole span (one
compute job per call, the baseline) and 1 (a job per block, decode steps
run between them). Reported: the session's decode-step latency (median,
p90, max) and backward tokens/s per mode, ``decode_p90_gain`` (baseline p90
/ per-block p90) and ``backward_rate_ratio`` (per block / baseline).

Forward part: the same with forward calls of ``--bulk-tokens`` tokens
and ``--forward-chunk`` (the whole span vs 1): ``forward_decode_p50_gain``,
``forward_decode_p90_gain`` (whole-span job / per-block jobs) and
``forward_rate_ratio`` (per block / whole span).

Inline part: one lone session decodes back to back, then goes on while
another connection pings the server every 5 ms. Two servers, alternating:
``--inline-decode-ms 0`` (every step handed to the compute thread, the
baseline) and the default (a lone session's step runs on the event loop).
Reported per mode: decode-step latency (median) and the server's CPU time
per step (``/proc`` utime + stime, which the machine's load moves much
less) without pings, and the ping round trip (median, p99, max: what the
loop's inline passes cost everything else); ``inline_step_gain``
(baseline median step / inline) and ``inline_cpu_saved_ms`` (baseline CPU
per step - inline).

    .venv/bin/python bench/server.py [--quick] [--json] [--part decode|backward|forward|inline|all]
        [--hidden 1024 --blocks 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import trio
from _shapes import llama_overrides

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


async def decode_under_bulk(
    address: str,
    blocks: tuple[int, int],
    seconds: float,
    hidden: int,
    prompt: int,
    tokens: int,
    method: str,
) -> tuple[list[float], float]:
    """One session's decode-step latencies (s) while ``method`` calls
    (backward or forward) of ``tokens`` tokens over ``blocks`` run back to
    back, over ``seconds`` (from a short warm-up after the session's
    prefill), and the bulk tokens/s meanwhile. Both go on past the window
    until each has a few measurements (a loaded machine can make single
    steps slow)."""
    latencies: list[float] = []
    done: list[float] = []  # when backward calls ended inside the window
    meta = {"start": blocks[0], "end": blocks[1], "batch": 1, "max_length": 8192}
    bulk = {"start": blocks[0], "end": blocks[1]}
    window: list[float] = []  # [begin, stop], set once the session has prefilled
    prefilled = trio.Event()

    async def session(conn) -> None:
        async with conn.open_stream("inference", meta) as stream:
            await stream.receive()
            await stream.send({"position": 0}, (torch.randn(1, prompt, hidden).half(),))
            await stream.receive()
            begin = time.perf_counter() + min(1.0, seconds / 4)
            window.extend([begin, begin + seconds])
            prefilled.set()
            one = torch.randn(1, 1, hidden).half()
            position = prompt
            while time.perf_counter() < window[1] or len(latencies) < 3:
                sent = time.perf_counter()
                await stream.send({"position": position}, (one,))
                await stream.receive()
                position += 1
                if sent >= begin:
                    latencies.append(time.perf_counter() - sent)
            await stream.close_send()

    async def bulk_calls(conn) -> None:
        x = torch.randn(1, tokens, hidden).half()
        g = (torch.randn(1, tokens, hidden) * 1e-3).half()
        inputs = (x, g) if method == "backward" else (x,)
        await prefilled.wait()
        while time.perf_counter() < window[1] or len(done) < 2:
            await conn.call(method, bulk, inputs, timeout=600)
            if time.perf_counter() >= window[0]:
                done.append(time.perf_counter())

    async with ConnectionPool(Security.insecure()) as pool:
        conn = await pool.get(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session, conn)
            nursery.start_soon(bulk_calls, conn)
    # Whole calls between the first and the last end: no call counted in part.
    return latencies, (len(done) - 1) * tokens / (done[-1] - done[0])


async def decode_with_pings(
    address: str, blocks: tuple[int, int], steps: int, hidden: int, prompt: int, pid: int
) -> tuple[list[float], float, list[float]]:
    """A lone session's decode steps: ``steps`` latencies (s) and the
    server's CPU seconds per step with nothing else going on, then
    ``steps`` more while another connection pings every ``PING_GAP`` s:
    the ping round trips (s)."""
    latencies: list[float] = []
    pings: list[float] = []
    meta = {"start": blocks[0], "end": blocks[1], "batch": 1, "max_length": prompt + 2 * steps + 8}
    pinging = trio.Event()
    finished = trio.Event()
    cpu = 0.0

    async def session(conn) -> None:
        nonlocal cpu
        async with conn.open_stream("inference", meta) as stream:
            await stream.receive()
            await stream.send({"position": 0}, (torch.randn(1, prompt, hidden).half(),))
            await stream.receive()
            one = torch.randn(1, 1, hidden).half()
            position = prompt
            for _ in range(4):  # the first steps time the pass
                await stream.send({"position": position}, (one,))
                await stream.receive()
                position += 1
            before = process_cpu_seconds(pid)
            for _ in range(steps):
                sent = time.perf_counter()
                await stream.send({"position": position}, (one,))
                await stream.receive()
                latencies.append(time.perf_counter() - sent)
                position += 1
            cpu = (process_cpu_seconds(pid) - before) / steps
            pinging.set()
            for _ in range(steps):
                await stream.send({"position": position}, (one,))
                await stream.receive()
                position += 1
            finished.set()
            await stream.close_send()

    async def pinger(conn) -> None:
        await pinging.wait()
        while not finished.is_set():
            sent = time.perf_counter()
            await conn.call("ping")
            pings.append(time.perf_counter() - sent)
            await trio.sleep(PING_GAP)

    # Two pools: the pings travel on a connection of their own.
    async with (
        ConnectionPool(Security.insecure()) as pool,
        ConnectionPool(Security.insecure()) as other,
    ):
        conn, ping_conn = await pool.get(address), await other.get(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session, conn)
            nursery.start_soon(pinger, ping_conn)
    return latencies, cpu, pings


# Between the pings of the inline part: several land in every pass, and
# they load the server little (back to back, on 2 cores, they slow every
# pass by contention and measure the pinger rather than the server).
PING_GAP = 0.005


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def decode_part(args: argparse.Namespace, model, common: list[str]) -> dict[str, object]:
    rates: dict[str, dict[int, list[float]]] = {"batched": {}, "unbatched": {}}
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
        "decode_tok_s": {mode: {str(n): v for n, v in m.items()} for mode, m in median.items()}
    }
    single = median["batched"].get(1)
    for n in args.sessions:
        if single:
            result[f"batched_speedup_{n}"] = median["batched"][n] / single
        result[f"batching_gain_{n}"] = median["batched"][n] / median["unbatched"][n]
    if not args.json:
        print(
            f"{'sessions':>8} {'batched tok/s':>14} {'one-at-a-time':>14} {'gain':>6} {'vs 1':>6}"
        )
        for n in args.sessions:
            b, u = median["batched"][n], median["unbatched"][n]
            vs1 = f"{b / single:6.2f}" if single else "     -"
            print(f"{n:>8} {b:>14.1f} {u:>14.1f} {b / u:>6.2f} {vs1}")
    return result


def backward_part(args: argparse.Namespace, model, common: list[str]) -> dict[str, object]:
    return bulk_part(args, model, common, "backward")


def forward_part(args: argparse.Namespace, model, common: list[str]) -> dict[str, object]:
    return bulk_part(args, model, common, "forward")


def bulk_part(args: argparse.Namespace, model, common: list[str], method: str) -> dict[str, object]:
    modes = {"whole_span": args.blocks, "per_block": 1}
    chunk_flag = f"--{method}-chunk"
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with (
        ServerProcess.start(
            model,
            blocks=(0, args.blocks),
            extra_args=[*common, chunk_flag, str(args.blocks)],
        ) as whole,
        ServerProcess.start(
            model, blocks=(0, args.blocks), extra_args=[*common, chunk_flag, "1"]
        ) as per_block,
    ):
        for _ in range(args.rounds):
            for mode, server in (("whole_span", whole), ("per_block", per_block)):
                lat, rate = trio.run(
                    decode_under_bulk,
                    server.address,
                    (0, args.blocks),
                    args.seconds,
                    args.hidden,
                    args.prompt,
                    args.bulk_tokens,
                    method,
                )
                latencies[mode] += lat
                rates[mode].append(rate)
    stats = {
        mode: {
            "decode_ms_p50": 1e3 * statistics.median(latencies[mode]),
            "decode_ms_p90": 1e3 * percentile(latencies[mode], 0.9),
            "decode_ms_max": 1e3 * max(latencies[mode]),
            "decode_steps": len(latencies[mode]),
            f"{method}_tok_s": statistics.median(rates[mode]),
        }
        for mode in modes
    }
    # Backward's keys as they were; forward's carry its name.
    gain = "" if method == "backward" else f"{method}_"
    result: dict[str, object] = {
        "bulk_tokens": args.bulk_tokens,
        f"under_{method}": stats,
        f"{gain}decode_p50_gain": stats["whole_span"]["decode_ms_p50"]
        / stats["per_block"]["decode_ms_p50"],
        f"{gain}decode_p90_gain": stats["whole_span"]["decode_ms_p90"]
        / stats["per_block"]["decode_ms_p90"],
        f"{method}_rate_ratio": stats["per_block"][f"{method}_tok_s"]
        / stats["whole_span"][f"{method}_tok_s"],
    }
    if not args.json:
        print(f"decode latency while {method} calls of {args.bulk_tokens} tokens run back to back")
        print(
            f"{method + ' jobs':>14} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'steps':>6} "
            f"{method + ' tok/s':>15}"
        )
        for mode, st in stats.items():
            print(
                f"{mode:>14} {st['decode_ms_p50']:>8.1f} {st['decode_ms_p90']:>8.1f} "
                f"{st['decode_ms_max']:>8.1f} {st['decode_steps']:>6} "
                f"{st[f'{method}_tok_s']:>15.1f}"
            )
        print(
            f"decode p50 whole/per-block {result[f'{gain}decode_p50_gain']:.2f}, "
            f"p90 {result[f'{gain}decode_p90_gain']:.2f}, "
            f"{method} rate per-block/whole {result[f'{method}_rate_ratio']:.2f}"
        )
    return result


def inline_part(args: argparse.Namespace, model, common: list[str]) -> dict[str, object]:
    modes = {"thread": ["--inline-decode-ms", "0"], "inline": []}
    steps = max(20, int(args.seconds * 50))
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    pings: dict[str, list[float]] = {m: [] for m in modes}
    with (
        ServerProcess.start(
            model, blocks=(0, args.blocks), extra_args=[*common, *modes["thread"]]
        ) as thread,
        ServerProcess.start(model, blocks=(0, args.blocks), extra_args=common) as inline,
    ):
        for _ in range(args.rounds):
            for mode, server in (("thread", thread), ("inline", inline)):
                lat, per_step, rtts = trio.run(
                    decode_with_pings,
                    server.address,
                    (0, args.blocks),
                    steps,
                    args.hidden,
                    args.prompt,
                    server.process.pid,
                )
                latencies[mode] += lat
                cpu[mode].append(per_step)
                pings[mode] += rtts
    stats = {
        mode: {
            "decode_ms_p50": 1e3 * statistics.median(latencies[mode]),
            "server_cpu_ms_per_step": 1e3 * statistics.median(cpu[mode]),
            "ping_ms_p50": 1e3 * statistics.median(pings[mode]),
            "ping_ms_p99": 1e3 * percentile(pings[mode], 0.99),
            "ping_ms_max": 1e3 * max(pings[mode]),
        }
        for mode in modes
    }
    result: dict[str, object] = {
        "lone_session": stats,
        "inline_step_gain": stats["thread"]["decode_ms_p50"] / stats["inline"]["decode_ms_p50"],
        "inline_cpu_saved_ms": stats["thread"]["server_cpu_ms_per_step"]
        - stats["inline"]["server_cpu_ms_per_step"],
    }
    if not args.json:
        print("a lone session decoding (pings every 5 ms from another connection: ping columns)")
        print(
            f"{'decode steps':>13} {'p50 ms':>8} {'CPU ms/step':>12} {'ping p50':>9} "
            f"{'ping p99':>9} {'ping max':>9}"
        )
        for mode, st in stats.items():
            print(
                f"{mode:>13} {st['decode_ms_p50']:>8.2f} {st['server_cpu_ms_per_step']:>12.2f} "
                f"{st['ping_ms_p50']:>9.2f} {st['ping_ms_p99']:>9.2f} {st['ping_ms_max']:>9.2f}"
            )
        print(
            f"decode p50 thread/inline {result['inline_step_gain']:.2f}, "
            f"server CPU saved per step {result['inline_cpu_saved_ms']:.2f} ms"
        )
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per point")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (median)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per session")
    ap.add_argument("--bulk-tokens", type=int, default=128, help="tokens per backward call")
    ap.add_argument(
        "--part", choices=("decode", "backward", "forward", "inline", "all"), default="all"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per server (0: torch's default)"
    )
    ap.add_argument("--device", default="cpu", help="the servers' --device")
    ap.add_argument("--quick", action="store_true", help="short run: 2 s per point, one round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # The plaintext warning would repeat for every connection of the run.
    logging.getLogger("libpipe.net").setLevel(logging.ERROR)
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    common = ["--throughput", "1,1", "--cache-bytes", "4G", "--log-level", "WARNING"]
    common += ["--device", args.device]
    if args.threads:
        common += ["--threads", str(args.threads)]
    threads = args.threads or torch.get_num_threads()
    result: dict[str, object] = {
        "bench": "server",
        "hidden": args.hidden,
        "blocks": args.blocks,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "threads": threads,
        "device": args.device,
    }
    if not args.json:
        print(
            f"libpipe-server, {args.blocks} blocks, hidden {args.hidden}, {args.device}, "
            f"{threads} threads per server, {args.seconds:g} s x {args.rounds} round(s) per point"
        )
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_checkpoint(
            tmp, "llama", overrides=llama_overrides(args.hidden, args.blocks)
        )
        if args.part in ("decode", "all"):
            result |= decode_part(args, model, common)
        if args.part in ("backward", "all"):
            result |= backward_part(args, model, common)
        if args.part in ("forward", "all"):
            result |= forward_part(args, model, common)
        if args.part in ("inline", "all"):
            result |= inline_part(args, model, common)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
