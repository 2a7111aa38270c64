"""The simulator against a live loopback swarm: predicted vs measured per-token time.

A real swarm on 127.0.0.1: a generated Llama checkpoint, four
``libpipe-server`` processes on fixed spans, each behind a ``DelayProxy``
that puts it in a cluster as seen from the client (near: 10 ms RTT, far:
50 ms), and one ``libpipe.Client`` generating for Poisson sessions.

1. Servers start one after another so each measures its own decode and
   forward throughput undisturbed; tau is what they announce, converted as
   the client's router converts it.
2. RTTs: pings through each proxy, fed to the client's RTT estimator (what
   the live router sees). The simulator's network is the proxies' set
   round trips (10 and 50 ms): a ping also pays the RPC's own work, which
   the per-hop overhead below counts, and counting it twice over-predicts.
3. Calibration, as the paper calibrated PETALS' two constants: sessions run
   one at a time through the same client and proxies give a per-hop
   overhead (decode step minus set RTTs and k * tau, per hop: client and
   server per-call work, serialisation, the proxy's relaying, and what the
   machine's load adds to them) and the session-open cost (first token
   minus its modelled prefill). Measured before the first run and after
   each; a run's prediction uses the two around it (the load of a shared
   machine drifts over minutes).
   With ``--forwarding on`` (the client's default) a step is k + 1 one-way
   messages, each through the receiver's proxy, each paying half the
   per-hop overhead (the simulator's forwarded model, docs/placement.md);
   with ``off`` the client calls each hop. With them, the cost of a
   batched decode pass: the checkpoint's span timed here, lone steps
   against batched passes of up to four sessions, one thread as the
   servers run; each further session adds a fraction of a lone step, and
   the simulator's servers charge that fraction of their announced tau.
4. ``--runs`` validation runs: Poisson sessions drawn from seed, seed+1...,
   each generating through the client at its arrival time, concurrently;
   and ``libpipe.sim`` fed the same tau, RTTs and constants, the same
   placement, the same routing function and the very same sessions. Its
   servers queue and batch steps as the live executor does (compute
   "queue", libpipe/sim/_compute.py); the same prediction with compute
   unshared (the paper's model: every step as if alone) is printed beside
   it, so each run compares the two on the same live figures.

Prints, per run, the machine's load average before and after, measured and
predicted mean per-token time, decode step and time to first token, and the
prediction error (the paper's own simulator was off by 13% on average);
then the mean absolute error over the runs. ``--json`` prints one JSON
object; ``--quick`` a short run.

    .venv/bin/python bench/sim_vs_live.py [--quick] [--seed 0] [--runs 3] [--forwarding on|off]
        [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import torch
import trio

import libpipe
from libpipe.model import KVCachePool, ModelConfig, load_span, write_random_checkpoint
from libpipe.net import ConnectionPool, DelayProxy, Security
from libpipe.placement import ModelSpec, Network, PlacementProblem, ServerSpec, Workload, route
from libpipe.server import ServerProcess
from libpipe.sim import Scenario, SessionCosts, Simulation, generate_sessions, summarize

NEAR_RTT = 0.010
FAR_RTT = 0.050
# (name, blocks, cluster): a near chain of two, a far replica of the whole
# model, and a near server on the middle blocks the router may splice in.
DEPLOYMENT = (
    ("near-a", (0, 4), "near"),
    ("near-b", (4, 8), "near"),
    ("near-c", (2, 6), "near"),
    ("far", (0, 8), "far"),
)
CHECKPOINT = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
# One compute thread per server: four servers and the client share few
# cores, and oversubscribed thread pools would time each other's spinning.
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PINGS = 20
CALIBRATION_SESSIONS = 5
# Discarded first: a server's first passes (allocator, kernels) are slower.
WARMUP_SESSIONS = 2
# Longer than a run: the client re-probes no RTT mid-run (one noisy ping
# would move its estimate away from the simulator's).
REFRESH_S = 3600.0
# The batched-pass timing: sessions 1..ROW_SESSIONS in one pass (a run
# seldom overlaps more), each size timed ROW_REPEATS times after a prompt of
# ROW_PROMPT tokens.
ROW_SESSIONS = 4
ROW_REPEATS = 25
ROW_PROMPT = 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer, shorter sessions)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson sessions")
    ap.add_argument("--runs", type=int, default=3, help="validation runs (seeds seed, seed+1...)")
    ap.add_argument(
        "--forwarding",
        choices=("on", "off"),
        default="on",
        help="the live client forwards from server to server (its default) or not",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    # Light load: sessions overlap now and then (a few at most at once), as
    # a calibrated swarm's servers see them; the full plan overlaps more.
    plan = {
        "rate": 0.4 if args.quick else 0.5,
        "duration": 20.0 if args.quick else 90.0,
        "l_in": 16,
        "l_max": 24 if args.quick else 48,
    }
    with tempfile.TemporaryDirectory(prefix="sim-vs-live-") as tmp:
        model_dir = write_random_checkpoint(
            Path(tmp) / "model", "llama", seed=3, overrides=CHECKPOINT
        )
        servers = _start_servers(model_dir, Path(tmp) / "cache")
        try:
            report = trio.run(
                _measure_and_predict,
                model_dir,
                servers,
                plan,
                args.seed,
                args.runs,
                args.forwarding == "on",
            )
        finally:
            for server in servers.values():
                server.close()
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _start_servers(model_dir: Path, cache_dir: Path) -> dict[str, ServerProcess]:
    started: dict[str, ServerProcess] = {}
    try:
        for name, blocks, _ in DEPLOYMENT:
            args = ["--cache-dir", str(cache_dir / name), "--log-level", "WARNING", "--no-progress"]
            started[name] = ServerProcess.start(
                model_dir, blocks=blocks, extra_args=args, env=SERVER_ENV
            )
    except BaseException:
        for server in started.values():
            server.close()
        raise
    return started


async def _measure_and_predict(model_dir, servers, plan, seed, runs, forwarded) -> dict:
    names = [name for name, _, _ in DEPLOYMENT]
    delay_rtt = {name: NEAR_RTT if c == "near" else FAR_RTT for name, _, c in DEPLOYMENT}
    async with AsyncExitStack() as stack:
        proxies = {
            name: await stack.enter_async_context(DelayProxy(servers[name].address))
            for name in names
        }
        for name in names:
            proxies[name].set_delay(delay_rtt[name] / 2)
        pings = await _ping_all(proxies)
        async with libpipe.Client(
            model_dir,
            [p.address for p in proxies.values()],
            insecure=True,
            refresh_interval=REFRESH_S,
            # Forwarding is the client's default; only "off" needs the option.
            **({} if forwarded else {"forwarding": False}),
        ) as client:
            rtts = _feed_rtts(client, servers, pings)
            tau = _announced_tau(client, servers)
            tau_forward = _announced_tau(client, servers, forward=True)
            calibrate = functools.partial(
                _calibrate,
                model_dir,
                client,
                proxies,
                plan,
                tau,
                tau_forward,
                delay_rtt,
                forwarded,
            )
            calibrations = [await calibrate()]
            lives = []
            for run in range(runs):
                raw, placement = _scenario(
                    model_dir, tau, tau_forward, delay_rtt, plan, 0.0, 0.0, 0.0
                )
                sessions = generate_sessions(raw, seed + run)
                load_before = os.getloadavg()
                live = await _run_live(client, proxies, sessions)
                lives.append((sessions, live, load_before, os.getloadavg()))
                calibrations.append(await calibrate())

    reports = []
    for run, (sessions, live, load_before, load_after) in enumerate(lives):
        # The constants measured just before and just after this run, averaged:
        # the machine's load drifts over minutes.
        around = calibrations[run : run + 2]
        constants = {
            key: statistics.fmean(c[key] for c in around)
            for key in ("hop_overhead", "session_open", "batch_row_ratio")
        }
        raw, placement = _scenario(model_dir, tau, tau_forward, delay_rtt, plan, 0.0, 0.0, 0.0)
        calibrated, _ = _scenario(model_dir, tau, tau_forward, delay_rtt, plan, **constants)
        unshared = dataclasses.replace(calibrated, compute="unshared")
        measured = {
            "mean_token_s": statistics.fmean(s["per_token"] for s in live),
            "decode_token_s": statistics.fmean(s["decode"] for s in live),
            "ttft_s": statistics.fmean(s["ttft"] for s in live),
        }
        predictions = {
            "measured_inputs": _predict(raw, placement, sessions, plan, rtts, forwarded),
            "calibrated": _predict(calibrated, placement, sessions, plan, rtts, forwarded),
            "unshared": _predict(unshared, placement, sessions, plan, rtts, forwarded),
        }
        rows = {
            key: {
                "measured": measured[key],
                **{f"predicted_{how}": getattr(p, key) for how, p in predictions.items()},
                **{
                    f"error_{how}": getattr(p, key) / measured[key] - 1
                    for how, p in predictions.items()
                },
            }
            for key in measured
        }
        reports.append(
            {
                "seed": seed + run,
                "overlap": {
                    how: _overlap_split(live, scenario, placement, sessions, plan, rtts, forwarded)
                    for how, scenario in (("calibrated", calibrated), ("unshared", unshared))
                },
                "sessions": len(live),
                "load_average_before": load_before,
                "load_average_after": load_after,
                "routes_live": sorted({tuple(s["route"]) for s in live}),
                "hops_predicted": predictions["calibrated"].mean_hops,
                "hop_overhead_ms": 1000 * constants["hop_overhead"],
                "session_open_ms": 1000 * constants["session_open"],
                "batch_row_ratio": constants["batch_row_ratio"],
                "results": rows,
            }
        )

    def mean_abs_error(how: str) -> float:
        return statistics.fmean(abs(r["results"]["mean_token_s"][f"error_{how}"]) for r in reports)

    return {
        "plan": plan,
        "forwarding": forwarded,
        "cpus": os.cpu_count(),
        "tau_decode_ms": {n: 1000 * tau[n] for n in names},
        "ping_rtt_ms": {n: 1000 * rtts[n] for n in names},
        "delay_rtt_ms": {n: 1000 * delay_rtt[n] for n in names},
        "calibrations": calibrations,
        "runs": reports,
        "mean_abs_error_calibrated": mean_abs_error("calibrated"),
        "mean_abs_error_unshared": mean_abs_error("unshared"),
    }


def _overlap_split(live, scenario, placement, sessions, plan, rtts, forwarded) -> dict:
    """Measured and predicted decode step for the sessions that ran alone
    and those that overlapped another: where the prediction goes wrong, and
    whether the compute model is the reason (overlapped sessions wait for
    each other's passes on a server; on a loaded 2-core machine they also
    share its cores, which no model here has)."""
    outcomes = Simulation(scenario, placement, _router(scenario, plan, rtts, forwarded)).run(
        sessions
    )
    predicted = [o.token_time for o in outcomes]  # by position, as ``live``'s index
    out = {}
    for group in ("alone", "overlapped"):
        chosen = [s for s in live if _overlaps(s, live) == (group == "overlapped")]
        if chosen:
            measured = statistics.fmean(s["decode"] for s in chosen)
            guess = statistics.fmean(predicted[s["index"]] for s in chosen)
            out[group] = {
                "sessions": len(chosen),
                "measured_decode_s": measured,
                "predicted_decode_s": guess,
                "error": guess / measured - 1,
            }
    return out


def _overlaps(session: dict, live: list[dict]) -> bool:
    a, b = session["span"]
    return any(o is not session and o["span"][0] < b and a < o["span"][1] for o in live)


def _router(scenario, plan, rtts, forwarded):
    """Routing as the live client routes: the same function over the same
    RTT estimates (the pings), whatever the simulator's timing model adds
    per hop, so that both pick the same routes. The live client routes
    client-centric and then forwards along the route when ``forwarded``:
    the simulator runs that route as forwarded."""
    max_length = plan["l_in"] + plan["l_max"]
    num_blocks = scenario.model.num_blocks

    def router(views, request):
        seen = [dataclasses.replace(v, rtt=rtts[v.peer_id]) for v in views]
        chosen = route(seen, num_blocks, session_tokens=max_length)
        return dataclasses.replace(chosen, forwarded=forwarded)

    return router


def _predict(scenario, placement, sessions, plan, rtts, forwarded):
    """The simulator's summary of the same sessions, routed as the live client routes."""
    outcomes = Simulation(scenario, placement, _router(scenario, plan, rtts, forwarded)).run(
        sessions
    )
    return summarize(outcomes, scenario.duration)


async def _calibrate(
    model_dir, client, proxies, plan, tau, tau_forward, delay_rtt, forwarded
) -> dict[str, float]:
    """The performance model's two constants for this software, as the paper
    calibrated PETALS': a per-hop overhead (a decode step measured, minus the
    proxies' set round trips + k * tau, per hop: the client's and server's
    per-call work, serialisation, the proxy's own relaying, and whatever
    the machine's load adds to them now) and the session-open cost (the
    first token measured, minus its modelled prefill). From sessions run one
    at a time through the same client and delays as the validation, so what
    the validation tests is the rest: concurrent Poisson sessions, waiting
    and routing."""
    rng = random.Random(-1)
    by_address = {p.address: n for n, p in proxies.items()}
    steps, firsts = [], []
    for n in range(WARMUP_SESSIONS + CALIBRATION_SESSIONS):
        prompt = [rng.randrange(3, 256) for _ in range(plan["l_in"])]
        run = await _one_session(client, prompt, plan["l_max"], trio.current_time())
        if n < WARMUP_SESSIONS:
            continue
        hops = [(by_address[address], b - a) for address, a, b in run["route"]]
        compute = sum(k * tau[n] for n, k in hops)
        prefill = sum(k * tau_forward[n] * plan["l_in"] for n, k in hops)
        if forwarded:
            # k + 1 one-way messages, each through the receiver's proxy (the
            # client's to the first, each server's to the next, the last's
            # back), each paying half a hop's overhead, as the simulator has it.
            wire = (sum(delay_rtt[n] for n, _ in hops) + delay_rtt[hops[-1][0]]) / 2
            messages = len(hops) + 1
            overhead = 2 * (run["decode"] - wire - compute) / messages
            first = wire + messages * overhead / 2 + prefill
        else:
            wire = sum(delay_rtt[n] for n, _ in hops)
            overhead = (run["decode"] - wire - compute) / len(hops)
            first = wire + len(hops) * overhead + prefill
        steps.append(overhead)
        firsts.append(run["ttft"] - first)
    return {
        "hop_overhead": max(0.0, statistics.median(steps)),
        "session_open": max(0.0, statistics.median(firsts)),
        "batch_row_ratio": _batch_row_ratio(model_dir),
        "load_average": os.getloadavg()[0],
    }


def _batch_row_ratio(model_dir: Path) -> float:
    """What each further session adds to a batched decode pass, as a
    fraction of a lone step: the whole checkpoint's span timed in this
    process with one thread (as the servers run), lone steps and passes of
    2..ROW_SESSIONS sessions through ``decode_batch``, the executor's
    batched call; the slope of the medians over the lone step's median."""
    config = ModelConfig.from_file(model_dir)
    span = load_span(model_dir, 0, config.num_hidden_layers, progress=False)
    length = ROW_PROMPT + ROW_SESSIONS * ROW_REPEATS + 1
    pool = KVCachePool(
        ROW_SESSIONS
        * KVCachePool.cache_bytes(
            1,
            length,
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            span.dtype,
        ),
        span.device,
    )
    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, 1, config.hidden_size, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ExitStack() as stack, torch.no_grad():
            sessions = [
                stack.enter_context(span.open_session(pool, batch=1, max_length=length))
                for _ in range(ROW_SESSIONS)
            ]
            for session in sessions:
                session.step(torch.randn(1, ROW_PROMPT, config.hidden_size, generator=gen))
            medians = []
            for n in range(1, ROW_SESSIONS + 1):
                times = []
                for _ in range(ROW_REPEATS):
                    began = time.perf_counter()
                    if n == 1:
                        sessions[0].step(one)
                    else:
                        span.decode_batch(sessions[:n], [one] * n)
                    times.append(time.perf_counter() - began)
                medians.append(statistics.median(times))
    finally:
        torch.set_num_threads(threads)
    slope, _ = statistics.linear_regression(range(1, ROW_SESSIONS + 1), medians)
    return max(0.0, slope / medians[0])


async def _ping_all(proxies) -> dict[str, list[float]]:
    """``PINGS`` ping round trips through each proxy (the RPC's own cost included)."""
    samples: dict[str, list[float]] = {}
    async with ConnectionPool(Security.insecure()) as pool:
        for name, proxy in proxies.items():
            connection = await pool.get(proxy.address)
            samples[name] = []
            for _ in range(PINGS):
                began = trio.current_time()
                await connection.call("ping")
                samples[name].append(trio.current_time() - began)
    return samples


def _feed_rtts(client, servers, pings) -> dict[str, float]:
    """Give the client's RTT estimator (an EMA) all the pings, and return
    its estimates: the live router and the simulator then see one RTT each."""
    rtts = {}
    for name, samples in pings.items():
        peer_id = servers[name].peer_id
        for seconds in samples:
            client.view.observe_rtt(peer_id, seconds)
        rtts[name] = client.view.rtt_of(peer_id)
    return rtts


def _announced_tau(client, servers, *, forward: bool = False) -> dict[str, float]:
    """Seconds per block from each server's announced throughput, as the router uses it."""
    by_peer = {s.peer_id: name for name, s in servers.items()}
    out = {}
    for entry in client.view.servers.values():
        name = by_peer[entry.peer_id]
        throughput = entry.throughput_forward if forward else entry.throughput_decode
        out[name] = 1.0 / throughput / entry.blocks
    return out


async def _one_session(client, prompt, new_tokens, arrival) -> dict:
    stamps = []
    route = []
    async for _ in client.stream(prompt, max_new_tokens=new_tokens, stop_tokens=()):
        stamps.append(trio.current_time())
        # Read at once: the client's last_route is this session's only until
        # another session's token comes in.
        route = [(h.server.address, h.start, h.end) for h in client.last_route]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft": stamps[0] - arrival,
        "decode": statistics.fmean(gaps),
        "per_token": (stamps[-1] - arrival) / len(stamps),
        "route": route,
        "span": (arrival, stamps[-1]),
    }


async def _run_live(client, proxies, sessions) -> list[dict]:
    """Every session started at its arrival time, concurrently, as the simulator has them."""
    results: list[dict] = []
    prompt_rng = random.Random(0)
    prompts = [[prompt_rng.randrange(3, 256) for _ in range(s.prompt_tokens)] for s in sessions]
    by_address = {p.address: n for n, p in proxies.items()}
    start = trio.current_time()

    async def one(index: int) -> None:
        request = sessions[index]
        arrival = start + request.arrival
        await trio.sleep_until(arrival)
        run = await _one_session(client, prompts[index], request.new_tokens, arrival)
        run["route"] = [f"{by_address[a]}[{x}:{y})" for a, x, y in run["route"]]
        run["index"] = index
        results.append(run)

    async with trio.open_nursery() as nursery:
        for index in range(len(sessions)):
            nursery.start_soon(one, index)
    return results


def _scenario(
    model_dir, tau, tau_forward, rtts, plan, hop_overhead, session_open, batch_row_ratio
) -> tuple[Scenario, dict[str, tuple[int, int]]]:
    config = ModelConfig.from_file(model_dir)
    block_bytes = 4 * (
        4 * config.hidden_size * config.hidden_size
        + 3 * config.hidden_size * config.intermediate_size
    )
    kv = 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 K and V
    names = [name for name, _, _ in DEPLOYMENT]
    locations = ["client", *names]
    matrix = [[0.0] * len(locations) for _ in locations]
    for i, name in enumerate(names, start=1):
        matrix[0][i] = matrix[i][0] = rtts[name]
        # A server pushes to the next one's proxy address (the client's
        # view): that proxy's delay is the trip.
        for j in range(1, len(locations)):
            if j != i:
                matrix[j][i] = rtts[name]
    specs = tuple(
        ServerSpec(
            name=name,
            memory_bytes=(blocks[1] - blocks[0]) * block_bytes + 2**30,  # the server's 1 GiB cache
            tau_decode=tau[name],
            prefill_per_token=tau_forward[name],
            prefill_fixed=0.0,
            location=name,
        )
        for name, blocks, _ in DEPLOYMENT
    )
    problem = PlacementProblem(
        model=ModelSpec(
            num_blocks=config.num_hidden_layers,
            block_bytes=block_bytes,
            hidden_size=config.hidden_size,
            kv_bytes_per_token_block=kv,
        ),
        servers=specs,
        workload=Workload(plan["l_in"], plan["l_max"], plan["rate"], (("client", 1.0),)),
        network=Network.from_matrix(locations, matrix, hop_overhead=hop_overhead),
    )
    scenario = Scenario(
        name="loopback",
        description="the live loopback swarm, measured",
        problem=problem,
        costs=SessionCosts(
            prefill_overhead=hop_overhead, prefill_per_token=0.0, session_open=session_open
        ),
        min_new_tokens=plan["l_max"],
        duration=plan["duration"],
        server_classes={name: cluster for name, _, cluster in DEPLOYMENT},
        compute="queue",
        batch_row={name: batch_row_ratio * tau[name] for name in names},
    )
    return scenario, {name: blocks for name, blocks, _ in DEPLOYMENT}


def _print(report: dict) -> None:
    plan = report["plan"]
    print(
        f"live loopback swarm vs libpipe.sim: lambda {plan['rate']}/s over"
        f" {plan['duration']:g} s, l_in {plan['l_in']}, l_max {plan['l_max']},"
        f" {len(report['runs'])} run(s), {report['cpus']} CPUs,"
        f" forwarding {'on' if report['forwarding'] else 'off'}"
    )
    print(
        "  tau ms/block (announced) "
        + ", ".join(f"{n} {v:.3f}" for n, v in report["tau_decode_ms"].items())
        + "; proxy RTT ms "
        + ", ".join(f"{n} {v:.0f}" for n, v in report["delay_rtt_ms"].items())
        + "; ping RTT ms "
        + ", ".join(f"{n} {v:.1f}" for n, v in report["ping_rtt_ms"].items())
    )
    labels = {
        "mean_token_s": "mean per-token (s)",
        "decode_token_s": "decode step (s)",
        "ttft_s": "time to first token (s)",
    }
    for run in report["runs"]:
        before, after = run["load_average_before"], run["load_average_after"]
        print()
        print(
            f"seed {run['seed']}: {run['sessions']} sessions; load average (1, 5, 15 min)"
            f" {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} before,"
            f" {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after"
        )
        print(
            f"  live routes: {[list(r) for r in run['routes_live']]};"
            f" predicted mean hops {run['hops_predicted']:.2f}"
        )
        print(
            f"  calibrated one session at a time, before and after: per-hop overhead"
            f" {run['hop_overhead_ms']:.2f} ms, session open {run['session_open_ms']:.1f} ms,"
            f" a batched row {run['batch_row_ratio']:.2f} x tau"
        )
        print(
            f"  {'':24s} {'measured':>9s} {'predicted':>10s} {'error':>7s}"
            f" {'calibrated':>11s} {'error':>7s} {'unshared':>9s} {'error':>7s}"
        )
        for key, row in run["results"].items():
            print(
                f"  {labels[key]:24s} {row['measured']:9.4f}"
                f" {row['predicted_measured_inputs']:10.4f}"
                f" {row['error_measured_inputs']:+7.1%} {row['predicted_calibrated']:11.4f}"
                f" {row['error_calibrated']:+7.1%} {row['predicted_unshared']:9.4f}"
                f" {row['error_unshared']:+7.1%}"
            )
        for how, groups in run["overlap"].items():
            for group, row in groups.items():
                print(
                    f"  decode step, sessions {group} ({row['sessions']}): measured"
                    f" {row['measured_decode_s']:.4f}, {how} {row['predicted_decode_s']:.4f}"
                    f" ({row['error']:+.1%})"
                )
    print()
    print(
        f"mean |error| of the calibrated mean per-token time over the runs:"
        f" {report['mean_abs_error_calibrated']:.1%} (target: within 10%);"
        f" with compute unshared: {report['mean_abs_error_unshared']:.1%}"
    )
    print(
        "(predicted: the simulator fed the announced tau and the proxies' RTTs only;"
        " calibrated: plus the per-hop overhead, session-open cost and batched-pass"
        " cost measured on single sessions just before and after each run, servers"
        " queueing and batching steps; unshared: the same, every step as if alone)"
    )


if __name__ == "__main__":
    sys.exit(main())
