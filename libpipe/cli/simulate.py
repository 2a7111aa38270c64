"""`libpipe simulate`: compare placement algorithms on a scenario, CPU only."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_ALGORITHMS = "petals,cg-bp,libpipe,milp"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate placement algorithms on a scenario (discrete-event, CPU only)",
        description=(
            "Run each algorithm's placement and routing on the same Poisson sessions and"
            " print mean and p95 per-token time, time to first token, waiting and"
            " throughput. SCENARIO: clustered, clustered-large, llama70b-clustered,"
            " scattered-<n>, or a scenario .json file."
        ),
    )
    parser.add_argument("scenario", metavar="SCENARIO")
    parser.add_argument(
        "--algorithms",
        default=DEFAULT_ALGORITHMS,
        help=f"comma-separated algorithm names (default {DEFAULT_ALGORITHMS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sessions and of route tie-breaks (default 0)",
    )
    parser.add_argument("--duration", type=float, help="seconds of arrivals (default: scenario's)")
    parser.add_argument(
        "--lambda",
        dest="arrival_rate",
        metavar="LAMBDA",
        type=float,
        help="session arrival rate per second (default: scenario's)",
    )
    parser.add_argument(
        "--l-max", type=int, help="tokens generated per session (default: scenario's)"
    )
    parser.add_argument("--plot", metavar="PNG", help="write a comparison plot here")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..sim import compare, comparison_json, comparison_table, load_scenario, plot_comparison

    algorithms = [name.strip() for name in args.algorithms.split(",") if name.strip()]
    if not algorithms:
        raise ConfigError("--algorithms names no algorithm")
    scenario = load_scenario(args.scenario).with_workload(
        arrival_rate=args.arrival_rate, l_max=args.l_max, duration=args.duration
    )
    comparison = compare(scenario, algorithms, seed=args.seed)
    if args.json:
        print(json.dumps(comparison_json(comparison)))
    else:
        print(comparison_table(comparison))
    if args.plot:
        plot_comparison(comparison, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
