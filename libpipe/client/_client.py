"""``libpipe.Client``: what an application embeds to run a model on a swarm.

The client loads only the embeddings, the final norm and the LM head; the
blocks run on servers it learns from the peers it is given. While open it
refreshes its view of the swarm every ``refresh_interval`` seconds (one
background task, inside the client's own nursery: leaving ``async with``
ends it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import torch
import trio
from torch import Tensor

from ..errors import ConfigError, ConnectionClosedError, InvalidRequestError
from ..model import ClientHead, ModelConfig, load_client_head
from ..net import ConnectionPool, Security, parse_address
from ..swarm import GossipConfig
from ._bulk import forward_span
from ._context import SwarmContext
from ._failover import RetryPolicy
from ._generate import (
    GenerationOptions,
    InferenceSession,
    StopCondition,
    StopEntry,
    as_token_ids,
    check_max_new_tokens,
    generate_batch_tokens,
    generate_tokens,
)
from ._remote_blocks import RemoteBlocks
from ._routing import PlannedHop
from ._sampling import SamplingConfig
from ._session import RemoteSession
from ._tokenizer import TextCodec, require_codec
from ._train_chain import TrainChain
from ._view import KNOWN_DTYPES, SwarmView

# How often an open client learns the swarm again (new servers, new spans,
# throughputs, free cache) and re-measures RTTs.
DEFAULT_REFRESH_INTERVAL = 30.0

Prompt = str | Sequence[int] | Tensor


class Client:
    """``async with Client(model=DIR, peers=["host:port"], identity=..., ca=...) as c:``

    ``model`` is the checkpoint directory (config.json, the head's tensors,
    optionally tokenizer.json). Security: ``identity`` (a directory made by
    ``libpipe ca issue``) and optionally ``ca``, or ``insecure=True`` for
    local development. ``wire_dtype`` is the dtype of activations on the
    wire (default: the head's compute dtype, so fp32 on CPU: exact).
    ``forwarding=False`` makes the client carry every hop's output to the
    next hop itself instead of the servers pushing it to each other (for
    servers that cannot reach each other)."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        peers: Sequence[str],
        *,
        ca: str | os.PathLike[str] | None = None,
        identity: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        security: Security | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        wire_dtype: torch.dtype | None = None,
        server_dtypes: Collection[str] = KNOWN_DTYPES,
        retry: RetryPolicy | None = None,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        gossip: GossipConfig | None = None,
        forwarding: bool = True,
    ) -> None:
        if isinstance(peers, str) or not peers:
            raise ConfigError("peers must be a non-empty list of 'host:port' addresses")
        for address in peers:
            parse_address(address)
        for name, value, cls in (
            ("security", security, Security),
            ("retry", retry, RetryPolicy),
            ("gossip", gossip, GossipConfig),
        ):
            if value is not None and not isinstance(value, cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {value!r}")
        if security is not None and (insecure or identity is not None or ca is not None):
            raise ConfigError("give either security or identity/ca/insecure, not both")
        if not isinstance(forwarding, bool):
            raise ConfigError(f"forwarding must be True or False, got {forwarding!r}")
        if not refresh_interval > 0:
            raise ConfigError(f"refresh_interval must be positive, got {refresh_interval!r}")
        unknown = set(server_dtypes) - set(KNOWN_DTYPES)
        if unknown or not server_dtypes:
            raise ConfigError(
                f"server_dtypes must be among {', '.join(KNOWN_DTYPES)}, got {sorted(server_dtypes)}"
            )
        if wire_dtype is not None and wire_dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
        ):
            raise ConfigError(f"wire_dtype must be float16, bfloat16 or float32, got {wire_dtype}")
        self.model_dir = Path(model)
        self.config = ModelConfig.from_file(self.model_dir)
        self._security = security or Security.from_options(
            identity=identity, ca=ca, insecure=insecure
        )
        self.peers = list(peers)
        self._device, self._dtype, self._wire_dtype = device, dtype, wire_dtype
        self._server_dtypes = tuple(server_dtypes)
        self._policy = retry or RetryPolicy()
        self._refresh_interval = refresh_interval
        self._gossip = gossip or GossipConfig()
        self._forwarding = forwarding
        self.stop_tokens = self.config.eos_token_ids
        self._head: ClientHead | None = None
        self._ctx: SwarmContext | None = None
        self._codec: TextCodec | None = None
        self._exits: Any = None
        self.last_route: list[PlannedHop] = []

    # --- lifetime ------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._exits is not None:
            raise ConfigError("this client is already open")
        exits = self._lifetime()
        await exits.__aenter__()
        self._exits = exits
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        exits, self._exits = self._exits, None
        return await exits.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        head = await trio.to_thread.run_sync(
            lambda: load_client_head(
                self.model_dir, device=self._device, dtype=self._dtype, progress=False
            )
        )
        self._codec = TextCodec.from_checkpoint(self.model_dir, self.config.vocab_size)
        view = SwarmView(
            model_id=self.config.model_id,
            num_blocks=self.config.num_hidden_layers,
            kv_values_per_token_block=2 * self.config.num_key_value_heads * self.config.head_dim,
            dtypes=self._server_dtypes,
            record_ttl=self._gossip.record_ttl,
            max_clock_skew=self._gossip.max_clock_skew,
        )
        async with ConnectionPool(self._security) as pool, trio.open_nursery() as nursery:
            ctx = SwarmContext(
                view=view,
                pool=pool,
                peers=self.peers,
                policy=self._policy,
                wire_dtype=self._wire_dtype or head.dtype,
                num_blocks=self.config.num_hidden_layers,
                hidden_size=self.config.hidden_size,
                forwarding=self._forwarding,
            )
            await ctx.refresh()
            self._head, self._ctx = head, ctx
            nursery.start_soon(self._refresh_forever, ctx)
            try:
                yield
            finally:
                self._head = self._ctx = None
                nursery.cancel_scope.cancel()

    async def _refresh_forever(self, ctx: SwarmContext) -> None:
        while True:
            await trio.sleep(self._refresh_interval)
            await ctx.refresh()

    def _open(self) -> tuple[ClientHead, SwarmContext]:
        if self._head is None or self._ctx is None:
            raise ConnectionClosedError("the client is not open (use `async with Client(...)`)")
        return self._head, self._ctx

    # --- what applications call ------------------------------------------------------

    @property
    def view(self) -> SwarmView:
        """The servers known now, with their RTTs and bans."""
        return self._open()[1].view

    def inference_session(
        self, *, max_length: int, batch: int = 1, adapter: str | None = None
    ) -> InferenceSession:
        """A session that keeps the servers' KV caches between steps::

            async with client.inference_session(max_length=64) as session:
                logits = await session.step(token_ids)  # [batch, t, vocab]

        ``max_length`` bounds the positions it may hold; ``adapter`` names a
        LoRA adapter: only servers that loaded it are routed to."""
        head, ctx = self._open()
        limit = self.config.max_position_embeddings
        if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > limit:
            raise ConfigError(f"max_length {max_length} exceeds the model's {limit} positions")
        remote = RemoteSession(ctx, max_length=max_length, batch=batch, adapter=adapter)
        return InferenceSession(remote, head)

    async def generate(
        self, prompt: Prompt, *, max_new_tokens: int, **options: Unpack[GenerationOptions]
    ) -> list[int]:
        """The new token ids, greedy unless ``temperature > 0``::

            ids = await client.generate("In the beginning", max_new_tokens=32)
            ids = await client.generate([1, 5, 9], max_new_tokens=32, temperature=0.8,
                                        top_p=0.9, seed=1, stop=["The end", [13, 13]])

        The options are ``stream``'s."""
        async with aclosing(
            self.stream(prompt, max_new_tokens=max_new_tokens, **options)
        ) as tokens:
            return [token async for token in tokens]

    async def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_tokens: Collection[int] | None = None,
        stop: str | Sequence[StopEntry] = (),
        adapter: str | None = None,
    ) -> AsyncIterator[int]:
        """The new token ids, each yielded as soon as it is chosen::

            async with aclosing(client.stream(prompt, max_new_tokens=64)) as tokens:
                async for token in tokens:
                    ...

        ``prompt`` is token ids (a list, or a ``[t]`` / ``[1, t]`` tensor), or
        text when the checkpoint has a tokenizer. Greedy unless
        ``temperature > 0``; ``top_k`` (0: off) and ``top_p`` (1: off) cut
        the sampled distribution; ``seed`` makes a sampled run
        reproducible, failovers included. Generation ends after
        ``max_new_tokens``, or after the token that is one of
        ``stop_tokens`` (default: the checkpoint's ``eos_token_id``; ``()``
        for none) or that completes a ``stop`` entry: a token-id list, or a
        string found in the generated text (needs the tokenizer). That
        last token is yielded. ``adapter`` runs the model with that LoRA
        adapter, on the servers that loaded it (``libpipe-server
        --adapters``). Bad arguments raise ``ConfigError`` or
        ``InvalidRequestError`` before any server is asked.

        Leaving the loop early ends the generation and closes the servers'
        sessions; ``aclosing`` makes that happen at once rather than when
        the generator is collected."""
        self._open()
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        ids = as_token_ids(self._prompt_ids(prompt), self.config.vocab_size)
        stop_condition = self._stop_condition(stop_tokens, stop)
        total = ids.shape[1] + max_new_tokens
        async with (
            self.inference_session(max_length=total, adapter=adapter) as session,
            aclosing(
                generate_tokens(
                    session,
                    ids,
                    max_new_tokens=max_new_tokens,
                    sampling=sampling,
                    stop=stop_condition,
                )
            ) as tokens,
        ):
            async for token in tokens:
                self.last_route = session.route
                yield token

    async def generate_batch(
        self,
        prompts: Sequence[Prompt] | Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_tokens: Collection[int] | None = None,
        stop: str | Sequence[StopEntry] = (),
        adapter: str | None = None,
    ) -> list[list[int]]:
        """The new token ids of each prompt, generated in one session whose
        steps carry every prompt at once (each server runs one pass for
        the whole batch)::

            rows = await client.generate_batch([[1, 5, 9], [2, 6, 3]], max_new_tokens=32)

        ``prompts``: a list of prompts as ``stream`` takes them, or a
        ``[batch, t]`` tensor. They must all have the same length in tokens:
        a session holds one position for all its rows and servers take no
        padding mask, so rows of different lengths would attend to padding
        (``InvalidRequestError`` names the lengths; generate those one by
        one, or concurrently). Each row stops on its own (``stream``'s
        ``stop_tokens`` and ``stop``); the others go on. Greedy rows are
        the tokens ``generate`` gives for each prompt alone; sampled rows
        draw from one generator for the batch (``seed`` reproduces the
        batch, not each prompt's own sampled run)."""
        self._open()
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        ids = self._batch_ids(prompts)
        stops = [self._stop_condition(stop_tokens, stop) for _ in range(ids.shape[0])]
        total = ids.shape[1] + max_new_tokens
        async with self.inference_session(
            max_length=total, batch=ids.shape[0], adapter=adapter
        ) as session:
            new = await generate_batch_tokens(
                session, ids, max_new_tokens=max_new_tokens, sampling=sampling, stops=stops
            )
            self.last_route = session.route
        return new

    def _batch_ids(self, prompts: Sequence[Prompt] | Tensor) -> Tensor:
        """``prompts`` as checked ``[batch, t]`` token ids."""
        if isinstance(prompts, Tensor) and prompts.dim() == 2:
            prompts = list(prompts)
        if isinstance(prompts, (str, bytes, Tensor)) or not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                "prompts must be a list of prompts or a [batch, t] tensor of token ids, "
                f"got {type(prompts).__name__}"
            )
        if not prompts:
            raise InvalidRequestError("prompts must hold at least one prompt")
        rows = [as_token_ids(self._prompt_ids(p), self.config.vocab_size) for p in prompts]
        lengths = [row.shape[1] for row in rows]
        if len(set(lengths)) > 1:
            raise InvalidRequestError(
                f"the prompts of a batch must have the same length in tokens, got {lengths}",
                lengths=lengths,
            )
        return torch.cat(rows)  # [batch, t]

    def _stop_condition(
        self, stop_tokens: Collection[int] | None, stop: str | Sequence[StopEntry]
    ) -> StopCondition:
        return StopCondition(
            stop_tokens=self.stop_tokens if stop_tokens is None else stop_tokens,
            stop=stop,
            vocab_size=self.config.vocab_size,
            decode=None if self._codec is None else self._codec.decode,
        )

    async def forward(
        self, hidden: Tensor, *, start: int = 0, end: int | None = None, adapter: str | None = None
    ) -> Tensor:
        """``hidden: [B, T, H]`` through blocks ``[start, end)`` (default:
        all), bulk mode: no cache, spread over replicas, retried on failure;
        ``adapter``: a LoRA adapter, as for ``stream``."""
        _, ctx = self._open()
        return await forward_span(ctx, hidden, start=start, end=end, adapter=adapter)

    def remote_blocks(
        self,
        *,
        start: int = 0,
        end: int | None = None,
        adapter: str | None = None,
        max_request_bytes: int | None = None,
        max_rows: int | None = None,
    ) -> RemoteBlocks:
        """Blocks ``[start, end)`` (default: all) as a frozen torch module for
        training: ``loss.backward()`` calls the servers' ``backward``. Use it
        from another thread than this client's (``trio.to_thread``).
        ``adapter``: a LoRA adapter the servers must have; ``max_request_bytes``
        and ``max_rows`` bound one request (``TrainChain``)."""
        _, ctx = self._open()
        chain = TrainChain(
            ctx,
            start=start,
            end=end,
            adapter=adapter,
            max_request_bytes=max_request_bytes,
            max_rows=max_rows,
        )
        return RemoteBlocks(chain)

    # --- text ----------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        return (self.model_dir / "tokenizer.json").exists()

    def encode(self, text: str) -> list[int]:
        return self._text().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._text().decode(list(ids))

    def _text(self) -> TextCodec:
        if self._codec is None:
            self._codec = TextCodec.from_checkpoint(self.model_dir, self.config.vocab_size)
        return require_codec(self._codec, self.model_dir)

    def _prompt_ids(self, prompt: Prompt) -> Sequence[int] | Tensor:
        if isinstance(prompt, str):
            return self.encode(prompt)
        return prompt
