"""End to end: per-token decode latency through 1, 2 and 4 hops of real
``libpipe-server`` processes on loopback, against the same model run in
one process (the baseline, measured in the same run).

Rows: local; 1, 2, 4 hops direct; the same through a ``DelayProxy`` per hop
adding ``--delay-ms`` per round trip; and time to first token for a
``--prompt``-token prompt (session open + prefill + the first token).
Each multi-hop row twice: with server-to-server forwarding (the library's
default: client -> s1 -> ... -> sk -> client) and without (the client
carries every hop's input).

Local and swarm decode steps are taken in turns, token by token, so that
load from other processes hits both alike; ``overhead_ms_per_hop`` is the
median of (swarm step - local step), less the emulated delay, divided by
the hops. ``hop_overhead_ms`` is its median over the loopback rows with
the default (forwarding on; target <= 1 ms); ``extra_hop_ms`` the slope
from 1 to 4 hops, the cost of splitting the same blocks over more
servers. With forwarding, a step through the delay proxies pays one
proxied round trip split over the hops rather than one per hop, so its
``overhead/hop`` (which subtracts a full delay per hop) goes negative.

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
from _shapes import llama_overrides

from libpipe import Client
from libpipe.model import KVCachePool, load_client_head, load_span, write_random_checkpoint
from libpipe.net import DelayProxy
from libpipe.server import ServerProcess

BLOCKS = 8
CLOCK_TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def write_model(root: Path, hidden: int) -> Path:
    return write_random_checkpoint(
        root / "model", "llama", overrides=llama_overrides(hidden, BLOCKS), seed=0
    )


class LocalModel:
    """The whole model in this process: the baseline."""

    def __init__(self, model: Path) -> None:
        self.head = load_client_head(model, progress=False)
        self.span = load_span(model, 0, BLOCKS, progress=False)
        self.pool = KVCachePool(1 << 30)

    @torch.no_grad()
    def open(self, ids: torch.Tensor, max_length: int) -> tuple[object, torch.Tensor]:
        """A session with the prompt in; returns it and the first token."""
        session = self.span.open_session(self.pool, batch=1, max_length=max_length)
        logits = self.head.logits(session.step(self.head.embed(ids)))
        return session, logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, session, token: torch.Tensor) -> torch.Tensor:
        logits = self.head.logits(session.step(self.head.embed(token)))
        return logits[:, -1].argmax(-1, keepdim=True)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far (every thread, dead ones too)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the fields after it do not.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK  # fields 14, 15


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


async def paired_latency(
    model: Path,
    local: LocalModel,
    addresses: list[str],
    pids: list[int],
    tokens: int,
    prompt: int,
    delay: float,
    forwarding: bool,
) -> dict[str, float]:
    """Decode steps and time to first token, the swarm's and the local
    model's taken in turns so that load from elsewhere hits both alike."""
    async with AsyncExitStack() as stack:
        if delay:
            proxies = [
                await stack.enter_async_context(DelayProxy(a, delay=delay / 2)) for a in addresses
            ]
            addresses = [p.address for p in proxies]
        client = await stack.enter_async_context(
            Client(model, addresses, insecure=True, forwarding=forwarding)
        )
        ids = torch.randint(0, 1000, (1, prompt))
        for _ in range(2):  # warm connections and the servers' first steps
            await client.generate(ids, max_new_tokens=2, stop_tokens=())
        max_length = prompt + tokens + 1
        t0 = time.perf_counter()
        local_session, local_token = local.open(ids, max_length)
        t1 = time.perf_counter()
        async with client.inference_session(max_length=max_length) as session:
            token = (await session.step(ids))[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            here, there = [], []
            local_cpu = client_cpu = 0.0
            servers_before = [process_cpu_seconds(p) for p in pids]
            for _ in range(tokens):
                t, c = time.perf_counter(), time.process_time()
                local_token = local.step(local_session, local_token)
                u, d = time.perf_counter(), time.process_time()
                token = (await session.step(token))[:, -1].argmax(-1, keepdim=True)
                here.append(u - t)
                there.append(time.perf_counter() - u)
                local_cpu += d - c
                client_cpu += time.process_time() - d
            servers_cpu = [
                process_cpu_seconds(p) - b for p, b in zip(pids, servers_before, strict=True)
            ]
        local_session.close()
        return {
            "local_ms": 1e3 * statistics.median(here),
            "swarm_ms": 1e3 * statistics.median(there),
            "extra_ms": 1e3 * statistics.median(b - a for a, b in zip(here, there, strict=True)),
            "local_ttft_ms": 1e3 * (t1 - t0),
            "ttft_ms": 1e3 * (t2 - t1),
            # CPU per decode step: the baseline's, the client's, each server's.
            "local_cpu_ms": 1e3 * local_cpu / tokens,
            "client_cpu_ms": 1e3 * client_cpu / tokens,
            "server_cpu_ms": [1e3 * c / tokens for c in servers_cpu],
        }


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
        local = LocalModel(model)
        for hops in args.hops:
            servers = start_servers(model, hops, Path(tmp) / "cache", args.threads)
            try:
                addresses = [s.address for s in servers]
                for delay in (0.0, args.delay_ms / 1e3):
                    for forwarding in (True, False) if hops > 1 else (True,):
                        m = trio.run(
                            paired_latency,
                            model,
                            local,
                            addresses,
                            [s.process.pid for s in servers],
                            args.tokens,
                            args.prompt,
                            delay,
                            forwarding,
                        )
                        m.update(hops=hops, delay_ms=1e3 * delay, forwarding=forwarding)
                        # What each hop adds beyond its compute and the emulated delay.
                        m["overhead_ms_per_hop"] = (m["extra_ms"] - m["delay_ms"] * hops) / hops
                        m["ratio_to_local"] = m["swarm_ms"] / m["local_ms"]
                        # The same in CPU time, which the machine's load moves much less.
                        cpu = m["client_cpu_ms"] + sum(m["server_cpu_ms"]) - m["local_cpu_ms"]
                        m["cpu_overhead_ms_per_hop"] = cpu / hops
                        rows.append(m)
            finally:
                for s in servers:
                    s.close()
    loopback = {r["hops"]: r for r in rows if r["delay_ms"] == 0 and r["forwarding"]}
    # One hop forwards nothing: its row is both paths' 1-hop row.
    carried = {
        r["hops"]: r for r in rows if r["delay_ms"] == 0 and (not r["forwarding"] or r["hops"] == 1)
    }
    result = {
        "bench": "e2e",
        "hidden": args.hidden,
        "blocks": BLOCKS,
        "tokens": args.tokens,
        "prompt": args.prompt,
        "delay_ms": args.delay_ms,
        "threads": args.threads,
        "hop_overhead_ms": statistics.median(r["overhead_ms_per_hop"] for r in loopback.values()),
        "hop_cpu_overhead_ms": statistics.median(
            r["cpu_overhead_ms_per_hop"] for r in loopback.values()
        ),
        "rows": rows,
    }
    if len(carried) > 1:  # the same hops, the client carrying every input (the old path)
        result["hop_overhead_ms_without_forwarding"] = statistics.median(
            r["overhead_ms_per_hop"] for r in carried.values()
        )
        result["hop_cpu_overhead_ms_without_forwarding"] = statistics.median(
            r["cpu_overhead_ms_per_hop"] for r in carried.values()
        )
    if 1 in loopback and 4 in loopback:
        result["extra_hop_ms"] = (loopback[4]["extra_ms"] - loopback[1]["extra_ms"]) / 3
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"end to end decode, {BLOCKS} blocks, hidden {args.hidden}, {args.tokens} tokens/row "
          f"(local and swarm steps in turns), time to first token for {args.prompt} tokens")  # fmt: skip
    print(f"{'hops':>4} {'fwd':>4} {'+RTT/hop':>9} {'local ms':>9} {'swarm ms':>9} {'x local':>8} "
          f"{'overhead/hop':>13} {'local TTFT':>11} {'TTFT ms':>8} {'local CPU':>10} "
          f"{'client CPU':>11} {'server CPU':>11} {'CPU ovh/hop':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['hops']:>4} {'on' if r['forwarding'] else 'off':>4} {r['delay_ms']:>7.1f}ms {r['local_ms']:>9.2f} {r['swarm_ms']:>9.2f} "
              f"{r['ratio_to_local']:>8.2f} {r['overhead_ms_per_hop']:>11.2f}ms "
              f"{r['local_ttft_ms']:>11.1f} {r['ttft_ms']:>8.1f} {r['local_cpu_ms']:>8.2f}ms "
              f"{r['client_cpu_ms']:>9.2f}ms {sum(r['server_cpu_ms']):>9.2f}ms "
              f"{r['cpu_overhead_ms_per_hop']:>10.2f}ms")  # fmt: skip
    print(f"hop_overhead_ms (median over loopback rows, forwarding on): "
          f"{result['hop_overhead_ms']:.2f} (target <= 1.0)")  # fmt: skip
    print(f"hop_cpu_overhead_ms (the same in CPU time, client + servers - local): "
          f"{result['hop_cpu_overhead_ms']:.2f}")  # fmt: skip
    if "hop_overhead_ms_without_forwarding" in result:
        print(f"hop_overhead_ms without forwarding: "
              f"{result['hop_overhead_ms_without_forwarding']:.2f}, CPU "
              f"{result['hop_cpu_overhead_ms_without_forwarding']:.2f}")  # fmt: skip
    if "extra_hop_ms" in result:
        print(f"extra_hop_ms (slope 1 -> 4 hops): {result['extra_hop_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
