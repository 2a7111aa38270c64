"""Small checks every placement module shares: typed numbers, and which
blocks a set of spans holds (with the one ``NoRouteError`` for a gap)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import ConfigError, NoRouteError


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_seconds(what: str, value: object) -> None:
    """``ConfigError`` unless ``value`` is a finite number >= 0."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")


def uncovered_ranges(spans: Iterable[tuple[int, int]], start: int, end: int) -> list[list[int]]:
    """The maximal block ranges [a, b) within [start, end) that no span holds."""
    held = [False] * (end - start)
    for s, e in spans:
        for b in range(max(s, start), min(e, end)):
            held[b - start] = True
    missing: list[list[int]] = []
    for b, ok in enumerate(held, start):
        if ok:
            continue
        if missing and missing[-1][1] == b:
            missing[-1][1] = b + 1
        else:
            missing.append([b, b + 1])
    return missing


def covers(spans: Iterable[tuple[int, int]], num_blocks: int) -> bool:
    """Whether the spans together hold every block of the model."""
    return not uncovered_ranges(spans, 0, num_blocks)


def check_covered(spans: Iterable[tuple[int, int]], start: int, end: int, what: str) -> None:
    """``NoRouteError`` naming the uncovered ranges (``details["missing_blocks"]``,
    a list of [a, b)) as "``what`` blocks [a, b), ..."."""
    missing = uncovered_ranges(spans, start, end)
    if missing:
        text = ", ".join(f"[{a}, {b})" for a, b in missing)
        raise NoRouteError(f"{what} {text}", missing_blocks=missing)
