"""What every RPC handler of one running server shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import BusyError, DrainingError, InvalidRequestError
from ..model import BlockSpan, KVCachePool
from ..swarm import RecordState
from . import _validate
from ._config import ServerConfig
from ._executor import Executor
from ._sessions import SessionTable
from ._throughput import Throughput


@dataclass(eq=False)
class Serving:
    """Everything the handlers share: one per running server."""

    config: ServerConfig
    span: BlockSpan
    pool: KVCachePool
    executor: Executor
    sessions: SessionTable
    peer_id: str
    throughput: Throughput
    max_length: int
    state: RecordState = RecordState.JOINING
    # Spans this server held before it moved (server/_rebalance.py).
    retired: list[tuple[int, int]] = field(default_factory=list)
    # Bytes of the inputs of forward/backward calls held now (``bulk_call``).
    bulk_bytes: int = 0

    @property
    def blocks(self) -> tuple[int, int]:
        return (self.span.start, self.span.end)

    def sub_span(self, meta: dict[str, Any]) -> tuple[int, int]:
        """The blocks a request asks for, within our span. A request that
        touches any block we moved away from, wholly or in part, is
        ``DrainingError`` (RPC.md): the client's view is older than the move,
        and it re-routes instead of taking the request for a bad one."""
        try:
            return _validate.sub_span(meta, self.blocks)
        except InvalidRequestError as exc:
            start, end = exc.details.get("start"), exc.details.get("end")
            if (
                start is not None
                and start < end
                and any(start < b and a < end for a, b in self.retired)
            ):
                raise DrainingError(
                    f"this server moved from blocks {start}:{end} to {self.blocks[0]}:{self.blocks[1]}",
                    start=start,
                    end=end,
                    span=list(self.blocks),
                ) from None
            raise

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        return self.span.config.hidden_size

    def admit(self, what: str) -> None:
        if self.state is RecordState.DRAINING:
            raise DrainingError(f"this server is draining and takes no new {what}")

    @contextmanager
    def bulk_call(self, tensors: tuple[Tensor, ...]) -> Iterator[None]:
        """Hold a forward/backward call's inputs while it queues and computes.

        Every call waiting for the device keeps its inputs in memory (up to
        the frame limit, 512 MiB, each), so past ``config.bulk_bytes`` of
        them new calls are ``BusyError`` (the client tries another server)
        instead of growing the daemon until the OS kills it. A call alone is
        always taken, however big, so every size the wire allows can run."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.bulk_bytes and self.bulk_bytes + nbytes > self.config.bulk_bytes:
            raise BusyError(
                f"this server holds {self.bulk_bytes} bytes of forward/backward inputs; "
                f"{nbytes} more would pass its limit of {self.config.bulk_bytes}",
                held=self.bulk_bytes,
                requested=nbytes,
                limit=self.config.bulk_bytes,
            )
        self.bulk_bytes += nbytes
        try:
            with self.sessions.call():
                yield
        finally:
            self.bulk_bytes -= nbytes

    def adapter(self, meta: dict[str, Any]) -> str | None:
        """The LoRA adapter a request names, checked against those loaded."""
        _validate.check_adapter(meta, tuple(self.span.adapters))
        return meta.get("adapter") or None
