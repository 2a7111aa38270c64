"""What changed between two looks at the swarm, as events a person can read.

The view lists live servers only, so a server that vanishes is reported as
``left`` when its last record said it was draining (a graceful exit or a
move finishing) and ``dead`` otherwise (declared dead by gossip, or its
record expired). A server that stops answering pings from here is
``unreachable`` before gossip has made up its mind, which is often the
first sign of a crash. Coverage changes are events too: that a block lost
its last server is what an operator most needs to see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..net import short_peer_id
from ..swarm import (
    ModelCoverage,
    RecordState,
    ServerStatus,
    SwarmSnapshot,
    block_ranges,
    format_blocks,
)


@dataclass(frozen=True)
class SwarmEvent:
    at: float  # Unix time of the snapshot that showed it
    kind: str  # join, dead, left, move, state, unreachable, reachable, uncovered, covered
    message: str
    peer_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "message": self.message, "peer_id": self.peer_id}


def diff(old: SwarmSnapshot | None, new: SwarmSnapshot) -> list[SwarmEvent]:
    """Events that turn ``old`` into ``new`` (a first look lists every server as joined)."""
    before = {s.record.peer_id: s for s in old.servers} if old is not None else {}
    after = {s.record.peer_id: s for s in new.servers}
    at = new.taken_at
    events = []
    for peer_id, s in after.items():
        if peer_id not in before:
            events.append(_event(at, "join", s, f"joined with blocks {_span(s)} ({_state(s)})"))
            continue
        events += _changes(at, before[peer_id], s)
    for peer_id, s in before.items():
        if peer_id not in after:
            left = s.record.state is RecordState.DRAINING
            kind = "left" if left else "dead"
            what = "left the swarm" if left else "is gone from the view (dead or expired)"
            events.append(_event(at, kind, s, f"{what}; held blocks {_span(s)}"))
    old_models = {m.model_id: m for m in old.models} if old is not None else {}
    for model in new.models:
        events += _coverage_changes(at, old_models.get(model.model_id), model)
    # A model whose last server went is gone from the view: all its blocks lost cover.
    gone = old_models.keys() - {m.model_id for m in new.models}
    for model_id in sorted(gone):
        was = old_models[model_id]
        nothing = ModelCoverage(
            model_id, was.num_blocks, (0,) * was.num_blocks, (0.0,) * was.num_blocks
        )
        events += _coverage_changes(at, was, nothing)
    return events


def _changes(at: float, was: ServerStatus, now: ServerStatus) -> list[SwarmEvent]:
    events = []
    if was.record.span != now.record.span:
        events.append(_event(at, "move", now, f"moved from blocks {_span(was)} to {_span(now)}"))
    if was.record.state is not now.record.state:
        events.append(_event(at, "state", now, f"is {_state(now)} (was {_state(was)})"))
    if was.rtt is not None and now.rtt is None:
        events.append(_event(at, "unreachable", now, "stopped answering pings from here"))
    if was.rtt is None and now.rtt is not None:
        events.append(_event(at, "reachable", now, "answers pings again"))
    return events


def _coverage_changes(at: float, was: ModelCoverage | None, now: ModelCoverage) -> list[SwarmEvent]:
    lost = now.uncovered() - (was.uncovered() if was is not None else set())
    regained = (was.uncovered() - now.uncovered()) if was is not None else set()
    events = []
    if lost:
        events.append(
            SwarmEvent(at, "uncovered", f"{now.model_id}: blocks {_blocks(lost)} have no server")
        )
    if regained:
        events.append(
            SwarmEvent(at, "covered", f"{now.model_id}: blocks {_blocks(regained)} covered again")
        )
    return events


def _event(at: float, kind: str, s: ServerStatus, what: str) -> SwarmEvent:
    return SwarmEvent(at, kind, f"{short_peer_id(s.record.peer_id)} {what}", s.record.peer_id)


def _span(s: ServerStatus) -> str:
    return f"{s.record.span[0]}:{s.record.span[1]}"


def _state(s: ServerStatus) -> str:
    return s.record.state.value


def _blocks(blocks: set[int]) -> str:
    """``{0, 1, 2, 7}`` -> ``"0-2, 7"``."""
    return ", ".join(format_blocks(r) for r in block_ranges(blocks))
