"""Tokens in, logits out, and the generation loop on top.

The client holds the embeddings and the LM head (``ClientHead``); the
blocks are remote (``RemoteSession``). Generation is the usual loop: one
step with the whole prompt (prefill), then one step per new token, each
token chosen by ``choose_next`` from the last position's logits, until
``max_new_tokens`` or a ``StopCondition``.

Stops are checked on what was generated, never on the prompt, and the
token that completes a stop is yielded: a stream cannot take back tokens
it has already handed out, so ``generate`` keeps them too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from types import TracebackType
from typing import TypedDict

import torch
from torch import Tensor

from ..errors import ConfigError, InvalidRequestError
from ..model import ClientHead
from ._routing import PlannedHop
from ._sampling import SamplingConfig, choose_next
from ._session import RemoteSession
from ._tokenizer import TextStream


class InferenceSession:
    """A session over the whole model: ``step(token_ids)`` returns logits
    and keeps the servers' caches between steps (``Client.inference_session``)."""

    def __init__(self, remote: RemoteSession, head: ClientHead) -> None:
        self._remote = remote
        self._head = head
        self._device = head.device  # asked twice a step; the head stays where it is

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
        return await self._logits(ids)

    async def _logits(self, ids: Tensor) -> Tensor:
        """``step`` for ids known to be an int64 ``[batch, t]`` tensor
        (the generation loop's: a checked prompt, then its own choices),
        without checking them again on every token."""
        hidden = self._head.embed(ids.to(self._device))  # [B, t, D]
        out = await self._remote.step(hidden)
        return self._head.logits(out.to(self._device))

    async def step_hidden(self, hidden: Tensor) -> Tensor:
        """Hidden states in and out, for callers that embed themselves
        (prompt tuning): ``[batch, t, hidden_size]``."""
        return await self._remote.step(hidden)

    def rollback(self, position: int) -> None:
        """Forget positions ``>= position`` (speculative decoding, retries)."""
        self._remote.rollback(position)


StopEntry = str | Sequence[int]


class GenerationOptions(TypedDict, total=False):
    """The keyword arguments of ``Client.stream`` besides ``max_new_tokens``,
    so that ``generate`` and ``SyncClient`` pass them on with their types."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_tokens: Collection[int] | None
    stop: str | Sequence[StopEntry]
    adapter: str | None


class StopCondition:
    """What ends a generation before ``max_new_tokens``: one of
    ``stop_tokens``, the token-id sequences of ``stop`` or, when ``decode``
    is given, its strings appearing in the generated text. One per
    generation: it remembers the tokens seen (``update``)."""

    def __init__(
        self,
        *,
        stop_tokens: Collection[int],
        stop: Sequence[StopEntry],
        vocab_size: int,
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        self._tokens = check_stop_tokens(stop_tokens, vocab_size)
        self._sequences, self._texts = _split_stop(stop, vocab_size)
        self._longest = max((len(q) for q in self._sequences), default=0)
        self._recent: list[int] = []
        self._text: TextStream | None = None
        if self._texts:
            if decode is None:
                raise ConfigError("stop strings need the checkpoint's tokenizer.json")
            self._text = TextStream(decode)
        # Text already generated that a stop string could still begin in.
        self._tail = ""

    def update(self, token: int) -> bool:
        """Whether the generation ends with ``token`` (the next token generated)."""
        if token in self._tokens:
            return True
        if self._sequences:
            self._recent = [*self._recent, token][-self._longest :]
            if any(self._recent[-len(q) :] == list(q) for q in self._sequences):
                return True
        if self._text is not None:
            text = self._tail + self._text.push(token)
            if any(stop in text for stop in self._texts):
                return True
            keep = max(len(stop) for stop in self._texts) - 1
            self._tail = text[-keep:] if keep else ""
        return False


def check_stop_tokens(stop_tokens: object, vocab_size: int) -> frozenset[int]:
    """``stop_tokens`` as a set of token ids, each in ``[0, vocab_size)``."""
    if isinstance(stop_tokens, (str, bytes, Tensor)) or not isinstance(stop_tokens, Collection):
        raise ConfigError(f"stop_tokens must be a collection of token ids, got {stop_tokens!r}")
    for token in stop_tokens:
        _check_token(token, vocab_size, "stop_tokens")
    return frozenset(stop_tokens)


def _split_stop(
    stop: object, vocab_size: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """``stop`` (a string, or a list of strings and token-id lists) as its
    token-id sequences and its strings."""
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, (bytes, Tensor)) or not isinstance(stop, Sequence):
        raise ConfigError(
            f"stop must be a string or a list of strings and token-id lists, got {stop!r}"
        )
    sequences: list[tuple[int, ...]] = []
    texts: list[str] = []
    for entry in stop:
        if isinstance(entry, str):
            if not entry:
                raise ConfigError("a stop string must not be empty")
            texts.append(entry)
        elif isinstance(entry, Sequence) and not isinstance(entry, bytes):
            if not entry:
                raise ConfigError("a stop token sequence must not be empty")
            sequences.append(tuple(_check_token(t, vocab_size, "stop") for t in entry))
        else:
            raise ConfigError(
                f"each stop entry must be a string or a list of token ids, got {entry!r} "
                "(single stop tokens go in stop_tokens)"
            )
    return tuple(sequences), tuple(texts)


def _check_token(token: object, vocab_size: int, name: str) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ConfigError(f"{name} holds {token!r}, not a token id in [0, {vocab_size})")
    return token


async def generate_tokens(
    session: InferenceSession,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop: StopCondition,
) -> AsyncIterator[int]:
    """The new tokens of a batch-1 generation, one at a time. Stops after
    ``max_new_tokens`` or when ``stop`` says so (that token is yielded).
    ``prompt``: checked token ids (``as_token_ids``)."""
    generator = sampling.generator()
    logits = await session._logits(prompt)  # prefill: [1, T, V]
    for n in range(max_new_tokens):
        token = int(choose_next(logits[:, -1], sampling, generator)[0])
        yield token
        if stop.update(token) or n == max_new_tokens - 1:
            return
        logits = await session._logits(torch.tensor([[token]]))


async def generate_batch_tokens(
    session: InferenceSession,
    prompts: Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stops: Sequence[StopCondition],
) -> list[list[int]]:
    """The new tokens of each row of ``prompts`` (checked ``[batch, T]``
    token ids, one ``StopCondition`` per row), generated together: every
    step sends one token per row. A row that has stopped is fed its last
    token again (a session's batch is fixed) and what comes back for it is
    dropped, until every row has stopped or ``max_new_tokens`` are made."""
    generator = sampling.generator()
    new: list[list[int]] = [[] for _ in stops]
    done = [False] * len(stops)
    logits = await session._logits(prompts)  # prefill: [B, T, V]
    for n in range(max_new_tokens):
        chosen = choose_next(logits[:, -1], sampling, generator).tolist()
        for row, token in enumerate(chosen):
            if not done[row]:
                new[row].append(token)
                done[row] = stops[row].update(token)
        if all(done) or n == max_new_tokens - 1:
            return new
        fed = [new[row][-1] for row in range(len(stops))]
        logits = await session._logits(torch.tensor(fed)[:, None])  # [B, 1]
    return new


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
    low, high = (int(v) for v in torch.aminmax(tensor))  # one pass, not two
    if low < 0 or high >= vocab_size:
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}), got {low}..{high}")
    return tensor


def check_max_new_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return value
