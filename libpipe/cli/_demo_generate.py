"""The client half of `libpipe demo`: stream text through the local swarm,
show the route and per-token latency, kill a server on the route part-way.

Text is printed as it comes. Each line of it (the demo model writes one
verse per line) ends with its token count and mean time per token; the
route is printed when generation starts and whenever it changes. Greedy
decoding, so the run can be checked against the same model run in this
process with no network at all: failover replays the lost server's inputs
on its replacement, and the text must come out the same.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..client import Client, PlannedHop
from ..net import short_peer_id


@dataclass
class Run:
    """What one generation did, for the summary."""

    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds; [0] includes prefill
    routes: list[list[tuple[str, int, int]]] = field(default_factory=list)
    killed: tuple[str, tuple[int, int]] | None = None
    killed_at: int | None = None  # index of the first token generated after the kill


def describe_route(route: Sequence[tuple[str, int, int]]) -> str:
    return " -> ".join(
        f"{short_peer_id(peer)} (blocks {start}:{end})" for peer, start, end in route
    )


def route_key(hops: Sequence[PlannedHop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in hops]


def pick_victim(
    route: Sequence[tuple[str, int, int]], spans: dict[str, tuple[int, int]]
) -> tuple[str, int, int] | None:
    """The hop of ``route``, last first, whose server can die: the other
    servers (``spans``, by peer id) still cover between them every hop that
    server computes (one server may compute two hops while it moves), so a
    way through is left. None if there is no such hop."""
    for peer, start, end in reversed(route):
        others = sorted(span for p, span in spans.items() if p != peer)
        hops = [(lo, hi) for p, lo, hi in route if p == peer]
        if all(_covered(lo, hi, others) for lo, hi in hops):
            return peer, start, end
    return None


def _covered(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether ``spans`` (sorted) cover blocks ``[start, end)`` between them."""
    reach = start
    for lo, hi in spans:
        if lo <= reach < hi:
            reach = hi
    return reach >= end


class LogTap(logging.Handler):
    """Holds libpipe's warnings (a hop that failed) until the demo prints
    them on a line of their own, rather than in the middle of the text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


class Screen:
    """Where the demo writes: dim annotations on a terminal, plain otherwise."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.color = out.isatty()

    def text(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def note(self, s: str) -> None:
        self.text(f"\033[2m{s}\033[0m" if self.color else s)

    def alert(self, s: str) -> None:
        self.text(f"\033[1;31m{s}\033[0m" if self.color else s)


# After an event, the current line is shown again up to this many
# characters: enough to pick up the thread, short enough not to repeat
# a whole verse.
RESUME_CHARS = 48


class Transcript:
    """The text shown so far, annotated: line statistics at each line's end,
    events on lines of their own, after which the current line is shown
    again so the reader does not lose the thread."""

    def __init__(self, screen: Screen, prompt: str) -> None:
        self.screen = screen
        self.shown = prompt
        self.line_start = 0  # index in Run.tokens of the current line's first token
        screen.text(prompt)

    def events(self, lines: list[str], *, alert: bool = False) -> None:
        if not lines:
            return
        block = "\n" + "\n".join(lines) + "\n"
        self.screen.alert(block) if alert else self.screen.note(block)
        line = self.shown.rsplit("\n", 1)[-1]
        self.screen.text(line if len(line) <= RESUME_CHARS else "..." + line[-RESUME_CHARS:])

    def extend(self, text: str, run: Run) -> None:
        new, self.shown = text[len(self.shown) :], text
        while "\n" in new:
            head, new = new.split("\n", 1)
            self.screen.text(head)
            count = len(run.tokens) - self.line_start
            ms = 1e3 * statistics.fmean(run.latencies[self.line_start :])
            self.screen.note(f"   ({count} tokens, {ms:.1f} ms/token)\n")
            self.line_start = len(run.tokens)
        self.screen.text(new)


async def generate(
    client: Client,
    prompt: str,
    max_new_tokens: int,
    kill_after: int | None,
    kill: Callable[[str], object],
    screen: Screen,
) -> Run:
    """Stream ``max_new_tokens`` greedily; after ``kill_after`` tokens call
    ``kill(peer_id)`` on a server of the route that has a replica."""
    run = Run(prompt_ids=client.encode(prompt))
    screen.note(f"prompt ({len(run.prompt_ids)} tokens): {prompt!r}\n\n")
    transcript = Transcript(screen, prompt)
    tap = LogTap()
    libpipe_logger = logging.getLogger("libpipe")
    libpipe_logger.addHandler(tap)
    try:
        known_spans = {peer: entry.span for peer, entry in client.view.servers.items()}
        last = time.perf_counter()
        async for token in client.stream(prompt, max_new_tokens=max_new_tokens):
            run.latencies.append(time.perf_counter() - last)
            run.tokens.append(token)
            events = [f"  [{message}]" for message in tap.take()]
            spans = {peer: entry.span for peer, entry in client.view.servers.items()}
            events += [
                f"  [server {short_peer_id(peer)} moved to blocks {span[0]}:{span[1]} "
                "(rebalanced by gossip)]"
                for peer, span in spans.items()
                if peer in known_spans and known_spans[peer] != span
            ]
            known_spans = spans
            route = route_key(client.last_route)
            if not run.routes or route != run.routes[-1]:
                label = "new route" if run.routes else "route"
                events.append(f"  [{label}: {describe_route(route)}]")
                run.routes.append(route)
            transcript.events(events)
            transcript.extend(prompt + client.decode(run.tokens), run)
            if kill_after is not None and len(run.tokens) == kill_after:
                victim = pick_victim(route, spans)
                if victim is None:
                    transcript.events(["  [no server on the route has a replica: none killed]"])
                else:
                    peer, start, end = victim
                    kill(peer)
                    run.killed, run.killed_at = (peer, (start, end)), len(run.tokens)
                    transcript.events(
                        [
                            f"  [killing server {short_peer_id(peer)} (blocks {start}:{end}) "
                            "with SIGKILL, mid-generation]"
                        ],
                        alert=True,
                    )
            last = time.perf_counter()
    finally:
        libpipe_logger.removeHandler(tap)
    screen.text("\n")
    return run


def local_greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The same greedy generation in this process, no swarm: the yardstick
    the swarm's output is compared with."""
    import torch

    from ..model import KVCachePool, load_client_head, load_span

    head = load_client_head(model_dir, progress=False)
    span = load_span(model_dir, 0, head.config.num_hidden_layers, progress=False)
    # The pool is only a cap; the session allocates what it needs (a few MB).
    pool = KVCachePool(1 << 30)
    out: list[int] = []
    with (
        torch.no_grad(),
        span.open_session(pool, batch=1, max_length=len(prompt_ids) + new_tokens) as session,
    ):
        step = torch.tensor([prompt_ids])
        for _ in range(new_tokens):
            token = int(head.logits(session.step(head.embed(step)))[0, -1].argmax())
            out.append(token)
            step = torch.tensor([[token]])
    return out


def summary(run: Run) -> list[str]:
    lines = [f"{len(run.tokens)} tokens generated"]
    if not run.latencies:
        return lines
    lines.append(
        f"  first token (prefill of {len(run.prompt_ids)} prompt tokens + route): "
        f"{run.latencies[0] * 1e3:.0f} ms"
    )
    cut = run.killed_at if run.killed_at is not None else len(run.latencies)
    before = run.latencies[1:cut]
    if before:
        when = "decode before the kill" if run.killed is not None else "decode"
        lines.append(f"  {when}: median {statistics.median(before) * 1e3:.1f} ms/token")
    if run.killed is not None and run.killed_at is not None and run.killed_at < len(run.latencies):
        lines.append(
            f"  the token after the kill (detect, re-route, replay {len(run.prompt_ids) + run.killed_at}"
            f" positions): {run.latencies[run.killed_at] * 1e3:.0f} ms"
        )
        after = run.latencies[run.killed_at + 1 :]
        if after:
            lines.append(
                f"  decode after failover: median {statistics.median(after) * 1e3:.1f} ms/token"
            )
    return lines
