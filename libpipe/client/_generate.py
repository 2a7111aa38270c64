"""Tokens in, logits out, and the generation loop on top.

The client holds the embeddings and the LM head (``ClientHead``); the
blocks are remote (``RemoteSession``). Generation is the usual loop: one
step with the whole prompt (prefill), then one step per new token, each
token chosen by ``choose_next`` from the last position's logits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from types import TracebackType

import torch
from torch import Tensor

from ..errors import ConfigError, InvalidRequestError
from ..model import ClientHead
from ._routing import PlannedHop
from ._sampling import SamplingConfig, choose_next
from ._session import RemoteSession


class InferenceSession:
    """A session over the whole model: ``step(token_ids)`` returns logits
    and keeps the servers' caches between steps (``Client.inference_session``)."""

    def __init__(self, remote: RemoteSession, head: ClientHead) -> None:
        self._remote = remote
        self._head = head

    @property
    def position(self) -> int:
        return self._remote.position

    @property
    def max_length(self) -> int:
        return self._remote.max_length

    @property
    def batch(self) -> int:
        return self._remote.batch

    @property
    def route(self) -> list[PlannedHop]:
        """The hops in use now (they change after a failover)."""
        return self._remote.route

    @property
    def failovers(self) -> int:
        """Hop failures survived so far."""
        return self._remote.failovers

    async def __aenter__(self) -> InferenceSession:
        await self._remote.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._remote.aclose()

    async def step(self, token_ids: Sequence[int] | Tensor) -> Tensor:
        """``token_ids: [batch, t]`` (or ``[t]`` with batch 1) at ``position``;
        returns the logits ``[batch, t, vocab]``."""
        ids = as_token_ids(token_ids, self._head.config.vocab_size, batch=self.batch)
        hidden = self._head.embed(ids.to(self._head.device))  # [B, t, D]
        out = await self._remote.step(hidden)
        return self._head.logits(out.to(self._head.device))

    async def step_hidden(self, hidden: Tensor) -> Tensor:
        """Hidden states in and out, for callers that embed themselves
        (prompt tuning): ``[batch, t, hidden_size]``."""
        return await self._remote.step(hidden)

    def rollback(self, position: int) -> None:
        """Forget positions ``>= position`` (speculative decoding, retries)."""
        self._remote.rollback(position)


async def generate_tokens(
    session: InferenceSession,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop_tokens: Collection[int],
) -> AsyncIterator[int]:
    """The new tokens of a batch-1 generation, one at a time. Stops after
    ``max_new_tokens`` or at a stop token (which is yielded)."""
    generator = sampling.generator()
    logits = await session.step(prompt)  # prefill: [1, T, V]
    for n in range(max_new_tokens):
        token = int(choose_next(logits[:, -1], sampling, generator)[0])
        yield token
        if token in stop_tokens or n == max_new_tokens - 1:
            return
        logits = await session.step(torch.tensor([[token]]))


def as_token_ids(ids: Sequence[int] | Tensor, vocab_size: int, *, batch: int = 1) -> Tensor:
    """Validated token ids as an int64 ``[batch, t]`` tensor."""
    if isinstance(ids, Tensor):
        tensor = ids
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
            raise InvalidRequestError(f"token ids must be integers, got a {tensor.dtype} tensor")
        if tensor.dim() == 1:
            tensor = tensor[None]
        tensor = tensor.to(torch.long).cpu()
    else:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidRequestError(
                f"token ids must be a sequence of ints or a tensor, got {type(ids).__name__}"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InvalidRequestError("token ids must all be integers")
        tensor = torch.tensor([list(ids)], dtype=torch.long)
    if tensor.dim() != 2 or tensor.shape[0] != batch or tensor.shape[1] == 0:
        raise InvalidRequestError(
            f"token ids must have shape [{batch}, t>0], got {list(tensor.shape)}"
        )
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or high >= vocab_size:
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}), got {low}..{high}")
    return tensor


def check_max_new_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return value
