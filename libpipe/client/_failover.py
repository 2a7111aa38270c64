"""How hard the client tries: the retry policy, and the ledger of one
operation's failures that ends in ``RetriesExhaustedError``.

A failure of a hop (connection lost, timeout, an error reply, the server
draining) bans the server in the swarm view and counts against the
operation that met it (one session step, one bulk call); the operation
waits ``backoff(n)`` and routes again. After ``max_failures`` failures it
gives up with an error naming every failure, so the user sees which
servers failed and how, not only the last of them.

An operation that finds no route before anything failed (a new generation
while two servers that shared a span are dead and not yet replaced) waits
too: the gap usually closes within a rebalance period, so it refreshes and
routes again on the same backoff, up to ``max_failures`` times, and only
then gives up with the ``NoRouteError`` naming the missing blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from ..errors import ConfigError, LibpipeError, NoRouteError, RetriesExhaustedError


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of failover. Times are seconds.

    ``step_timeout`` bounds one hop's answer to one request (a decode step,
    a prefill, a bulk forward): a server silent for longer is a failed hop.
    Generous by default because a long prefill on a slow GPU is not a
    failure."""

    max_failures: int = 6
    backoff_base: float = 0.05
    backoff_max: float = 2.0
    step_timeout: float = 60.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int):
            raise ConfigError(f"max_failures must be an integer, got {self.max_failures!r}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        for name in ("backoff_base", "backoff_max", "step_timeout", "connect_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.step_timeout == 0 or self.connect_timeout == 0:
            raise ConfigError("step_timeout and connect_timeout must be positive")

    def backoff(self, failures: int) -> float:
        """Wait before the attempt that follows the ``failures``-th failure."""
        return min(self.backoff_base * 2 ** (failures - 1), self.backoff_max)


@dataclass
class FailureLedger:
    """The failures one operation met so far."""

    policy: RetryPolicy
    what: str
    failures: list[str] = field(default_factory=list)
    # Routes missed while nothing had failed, and since when (trio clock).
    route_waits: int = 0
    _waiting_since: float | None = None

    async def record(self, where: str, error: LibpipeError) -> None:
        """Count a failure; raise ``RetriesExhaustedError`` past the bound,
        else sleep the backoff before the caller tries again."""
        self.failures.append(f"{where}: {type(error).__name__}: {error}")
        if len(self.failures) > self.policy.max_failures:
            raise RetriesExhaustedError(
                f"{self.what} failed {len(self.failures)} times, giving up: "
                + "; ".join(self.failures),
                failures=list(self.failures),
            ) from error
        await trio.sleep(self.policy.backoff(len(self.failures)))

    async def wait_for_route(self, error: NoRouteError) -> None:
        """No route now: sleep the backoff before the caller refreshes and
        routes again. After hop failures this counts as one more failure;
        with none, past ``max_failures`` waits, ``error`` is raised (saying
        how long the blocks stayed missing)."""
        if self.failures:
            await self.record("routing", error)
            return
        now = trio.current_time()
        if self._waiting_since is None:
            self._waiting_since = now
        if self.route_waits >= self.policy.max_failures:
            if not self.route_waits:
                raise error
            waited = now - self._waiting_since
            raise NoRouteError(
                f"{error.message} (still after {self.route_waits} retries over {waited:.1f} s)",
                **error.details,
            ) from None
        self.route_waits += 1
        await trio.sleep(self.policy.backoff(self.route_waits))
