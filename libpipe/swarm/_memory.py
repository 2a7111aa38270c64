"""An in-memory network for gossip tests and benchmarks.

Every message is really encoded (msgpack) and decoded, so nodes share no
objects and byte counts are the real ones. Latency and loss are drawn from
one seeded ``random.Random``; run it under ``trio.testing.MockClock`` and a
swarm of hundreds of nodes lives through minutes in a second of CPU.

A *killed* address behaves like a machine that lost power: whatever is sent
to or from it vanishes, and a request to it never returns (the caller's
timeout decides). An address nobody ever served refuses at once, like a
closed port.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import msgpack
import trio

from ..errors import ConfigError, ConnectionBrokenError, LibpipeError
from ._transport import Handler, Transport


class MemoryNetwork:
    """Links between ``MemoryTransport`` endpoints, with latency and loss.

    ``latency`` is a (low, high) range of one-way delays in seconds, drawn
    uniformly; ``loss`` is the probability that any one message is lost.
    """

    def __init__(
        self, *, seed: int = 0, latency: tuple[float, float] = (0.001, 0.005), loss: float = 0.0
    ) -> None:
        low, high = latency
        if not 0 <= low <= high:
            raise ConfigError("latency must be a range 0 <= low <= high", latency=list(latency))
        self.latency = (low, high)
        self.loss = _probability(loss)
        self.rng = random.Random(seed)
        self._served: dict[str, tuple[Handler, trio.Nursery]] = {}
        self._known: set[str] = set()
        self._down: set[str] = set()
        self._loss_at: dict[str, float] = {}
        self._cut: set[frozenset[str]] = set()
        # Per sending address: bytes and messages put on the wire.
        self.bytes_sent: Counter[str] = Counter()
        self.messages_sent: Counter[str] = Counter()

    def endpoint(self, address: str) -> MemoryTransport:
        self._known.add(address)
        return MemoryTransport(self, address)

    def kill(self, address: str) -> None:
        """Silence ``address`` from now on, in both directions."""
        self._down.add(address)

    def set_loss(self, address: str, loss: float) -> None:
        """Lose messages to and from ``address`` with this probability (one bad link)."""
        self._loss_at[address] = _probability(loss)

    def cut(self, a: str, b: str, *, restore: bool = False) -> None:
        """Lose everything between ``a`` and ``b`` (or heal the link again)."""
        link = frozenset((a, b))
        if restore:
            self._cut.discard(link)
        else:
            self._cut.add(link)

    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    # --- delivery ----------------------------------------------------------------

    def _transmit(self, src: str, dst: str, body: dict[str, Any]) -> bytes | None:
        """Encode and account for one message; None when it is lost on the way."""
        data = msgpack.packb(body, use_bin_type=True)
        self.bytes_sent[src] += len(data)
        self.messages_sent[src] += 1
        if self._cut and frozenset((src, dst)) in self._cut:
            return None
        loss = max(self.loss, self._loss_at.get(src, 0.0), self._loss_at.get(dst, 0.0))
        if loss and self.rng.random() < loss:
            return None
        return data

    def _delay(self) -> float:
        low, high = self.latency
        return low if low == high else self.rng.uniform(low, high)

    def _reachable(self, src: str, dst: str) -> bool:
        return src not in self._down and dst not in self._down and dst in self._served

    async def _request(
        self, src: str, dst: str, method: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if dst not in self._known:
            raise ConnectionBrokenError(f"connection to {dst} refused", address=dst)
        data = self._transmit(src, dst, body)
        await trio.sleep(self._delay())
        if data is None or not self._reachable(src, dst):
            await trio.sleep_forever()
        handler = self._served[dst][0]
        reply = await handler(method, msgpack.unpackb(data, raw=False))
        back = self._transmit(dst, src, reply or {})
        await trio.sleep(self._delay())
        if back is None or src in self._down or dst in self._down:
            await trio.sleep_forever()
        return msgpack.unpackb(back, raw=False)

    def _notify(self, src: str, dst: str, method: str, body: dict[str, Any]) -> None:
        if dst not in self._known:
            raise ConnectionBrokenError(f"connection to {dst} refused", address=dst)
        data = self._transmit(src, dst, body)
        served = self._served.get(dst)
        if data is None or served is None:
            return
        served[1].start_soon(self._deliver, src, dst, method, data)

    async def _deliver(self, src: str, dst: str, method: str, data: bytes) -> None:
        await trio.sleep(self._delay())
        if not self._reachable(src, dst):
            return
        try:
            await self._served[dst][0](method, msgpack.unpackb(data, raw=False))
        except LibpipeError:
            # A notification has nobody to report to: the receiver drops it.
            return


class MemoryTransport(Transport):
    def __init__(self, network: MemoryNetwork, address: str) -> None:
        self._network = network
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def request(self, address: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._network._request(self._address, address, method, body)

    async def notify(self, address: str, method: str, body: dict[str, Any]) -> None:
        self._network._notify(self._address, address, method, body)

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._network._served[self._address] = (handler, nursery)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                del self._network._served[self._address]


def _probability(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError("a loss probability must lie in [0, 1]", loss=value)
    return value
