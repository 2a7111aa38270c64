"""Remote blocks as a torch module: ``loss.backward()`` reaches through the swarm.

Theory of operation. Autograd is synchronous and the client lives in a trio
loop, so ``RemoteBlocks`` runs its passes in that loop with
``trio.from_thread.run`` and must be called from another thread: the
blocking client's caller, or a ``trio.to_thread.run_sync`` worker of an
async program. (Calling it on the loop's own thread would wait for the loop
it blocks; that is refused with a clear error.) ``RemoteSpanFunction``
keeps the forward's ``Piece`` records (inputs of every hop, client-side)
for its backward, which is all the servers need: they keep nothing.

Only the inputs get gradients: the servers' weights are frozen, so
trainable parameters live on the client (prompts, a head) or in the
adapter the server applies unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch
import trio
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from ..errors import ConnectionClosedError, InvalidRequestError
from ._train_chain import Piece, TrainChain

T = TypeVar("T")


class RemoteBlocks(nn.Module):
    """Blocks ``[chain.start, chain.end)`` of the swarm as a frozen module.

    ``forward(hidden, prompts=None)``: ``hidden: [B, T, H]``, deep prompts
    ``[end - start, B, P, H]``; returns the last block's outputs in the
    dtype of ``hidden``. ``trio_token`` is the client loop's (defaults to
    the current one when built inside it)."""

    def __init__(
        self, chain: TrainChain, trio_token: trio.lowlevel.TrioToken | None = None
    ) -> None:
        super().__init__()
        self.chain = chain
        self._token = trio_token if trio_token is not None else trio.lowlevel.current_trio_token()

    @property
    def start(self) -> int:
        return self.chain.start

    @property
    def end(self) -> int:
        return self.chain.end

    @property
    def bytes_sent(self) -> int:
        """Payload bytes of every request so far (forward and backward)."""
        return self.chain.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Payload bytes of every reply so far."""
        return self.chain.bytes_received

    def forward(self, hidden: Tensor, prompts: Tensor | None = None) -> Tensor:
        out: Tensor = RemoteSpanFunction.apply(self, hidden, prompts)
        return out

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in the client's loop and wait for it."""
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        if here is self._token:
            raise InvalidRequestError(
                "remote blocks block while the swarm works, so they cannot run on the client's "
                "own trio thread: call them from trio.to_thread.run_sync or the blocking client"
            )
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise ConnectionClosedError("the client of these remote blocks is closed") from None

    def extra_repr(self) -> str:
        adapter = f", adapter={self.chain.adapter!r}" if self.chain.adapter else ""
        return f"blocks=[{self.start}, {self.end}){adapter}"


class RemoteSpanFunction(torch.autograd.Function):
    """Autograd of one pass through remote blocks (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, blocks: RemoteBlocks, hidden: Tensor, prompts: Tensor | None
    ) -> Tensor:
        output, pieces = blocks.run(blocks.chain.forward, hidden, prompts)
        ctx.blocks = blocks  # type: ignore[attr-defined]
        ctx.pieces = pieces  # type: ignore[attr-defined]
        ctx.prompts = None if prompts is None else prompts.detach()  # type: ignore[attr-defined]
        return output

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_output: Tensor
    ) -> tuple[None, Tensor, Tensor | None]:
        blocks: RemoteBlocks = ctx.blocks  # type: ignore[attr-defined]
        pieces: tuple[Piece, ...] = ctx.pieces  # type: ignore[attr-defined]
        grad_in, grad_prompts = blocks.run(
            blocks.chain.backward,
            pieces,
            grad_output,
            ctx.prompts,  # type: ignore[attr-defined]
        )
        return None, grad_in, grad_prompts
