"""A comparison as a table, a JSON object and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._run import Comparison
from ._scenario import describe

# (header, summary field, format) of the table's columns.
_COLUMNS = (
    ("mean tok s", "mean_token_s", "{:.3f}"),
    ("p95 tok s", "p95_token_s", "{:.3f}"),
    ("TTFT s", "ttft_s", "{:.2f}"),
    ("wait s", "wait_s", "{:.2f}"),
    ("waited", "waited_fraction", "{:.0%}"),
    ("decode s", "decode_token_s", "{:.3f}"),
    ("tok/s", "throughput_tokens_s", "{:.1f}"),
    ("hops", "mean_hops", "{:.2f}"),
    ("sessions", "sessions", "{}"),
)


def baseline_name(comparison: Comparison) -> str | None:
    """What the ratio column compares against: petals when it ran, else the first."""
    if "petals" in comparison.results:
        return "petals"
    return next(iter(comparison.results), None)


def comparison_table(comparison: Comparison) -> str:
    lines = list(describe(comparison.scenario))
    lines.append(f"  seed {comparison.seed}")
    base = baseline_name(comparison)
    headers = ["algorithm", *(h for h, _, _ in _COLUMNS), f"vs {base}"]
    rows = []
    for name, result in comparison.results.items():
        values = result.summary.as_dict()
        row = [name, *(fmt.format(values[field]) for _, field, fmt in _COLUMNS)]
        reference = comparison.results[base].summary.mean_token_s if base else 0.0
        change = result.summary.mean_token_s / reference - 1 if reference > 0 else 0.0
        row.append(f"{change:+.1%}")
        rows.append(row)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines.append("")
    for row in [headers, *rows]:
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
    for name, reason in comparison.skipped.items():
        lines.append(f"{name}: skipped: {reason}")
    lines.append(
        "(tok s: arrival to last token over tokens, waiting included; decode s: one decode"
        " step; tok/s: tokens generated during the arrival window)"
    )
    return "\n".join(lines)


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    s = comparison.scenario
    return {
        "scenario": s.name,
        "seed": comparison.seed,
        "workload": {
            "arrival_rate": s.workload.arrival_rate,
            "l_in": s.workload.l_in,
            "l_max": s.workload.l_max,
            "duration_s": s.duration,
        },
        "baseline": baseline_name(comparison),
        "results": {name: r.as_dict() for name, r in comparison.results.items()},
        "skipped": dict(comparison.skipped),
    }


def plot_comparison(comparison: Comparison, path: str | Path) -> None:
    """Bars per algorithm: mean and p95 per-token time, TTFT, waiting."""
    # The object API (a Figure on its own Agg canvas): no global backend
    # switch and no pyplot state, so a caller's own matplotlib is untouched.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'libpipe[sim]'") from exc
    if not comparison.results:
        raise ConfigError("nothing to plot: every algorithm was skipped")
    names = list(comparison.results)
    summaries = [comparison.results[n].summary for n in names]
    panels = (
        (
            "per-token time (s)",
            [s.mean_token_s for s in summaries],
            [s.p95_token_s for s in summaries],
        ),
        (
            "time to first token (s)",
            [s.ttft_s for s in summaries],
            [s.p95_ttft_s for s in summaries],
        ),
        ("waiting for cache (s)", [s.wait_s for s in summaries], [s.p95_wait_s for s in summaries]),
    )
    figure = Figure(figsize=(4.2 * len(panels), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels))
    positions = range(len(names))
    for ax, (title, means, p95s) in zip(axes, panels, strict=True):
        ax.bar(positions, means, color="#4c72b0", label="mean")
        ax.scatter(positions, p95s, color="#c44e52", marker="_", s=400, label="p95", zorder=3)
        ax.set_xticks(list(positions), names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    w = comparison.scenario.workload
    figure.suptitle(
        f"{comparison.scenario.name}: lambda {w.arrival_rate:g}/s, l_in {w.l_in},"
        f" l_max {w.l_max}, {comparison.scenario.duration:g} s, seed {comparison.seed}"
    )
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {path}: {exc.strerror}") from exc
