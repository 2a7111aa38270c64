"""``libpipe.SyncClient``: the client for programs that are not trio.

Most applications (scripts, notebooks, web handlers in other frameworks)
cannot ``async with``. ``SyncClient`` runs ``trio.run`` in a daemon thread
of its own, opens a ``Client`` there and hands each call to that thread
with ``trio.from_thread.run``, blocking the caller until it is done.
Errors come back as they were raised, typed. A notebook with its own
running asyncio loop is no obstacle: trio runs in the other thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import trio
from torch import Tensor

from ..errors import ConnectionClosedError
from ..model import ModelConfig
from ._client import Client, Prompt
from ._generate import GenerationOptions, InferenceSession
from ._remote_blocks import RemoteBlocks
from ._routing import PlannedHop

T = TypeVar("T")


class SyncClient:
    """``with SyncClient(model=DIR, peers=[...], insecure=True) as c: c.generate(ids, max_new_tokens=8)``

    Takes the same arguments as ``Client``; its methods are the same, blocking."""

    def __init__(self, model: str | os.PathLike[str], peers: Sequence[str], **options: Any) -> None:
        self._client = Client(model, peers, **options)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="libpipe-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # handed to the constructor's caller
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with self._client:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``await fn(*args, **kwargs)`` in the client's thread. Should the
        caller stop waiting (Ctrl-C in a notebook: ``KeyboardInterrupt``),
        the call is cancelled there and finished before the caller moves
        on, so a generation does not run on and its sessions close."""
        token = self._token
        if token is None or not self._thread.is_alive():
            raise ConnectionClosedError("the client is closed")
        scope = trio.CancelScope()
        finished = threading.Event()

        async def call() -> Any:
            try:
                with scope:
                    return await fn(*args, **kwargs)
            finally:
                finished.set()

        try:
            return trio.from_thread.run(call, trio_token=token)
        except BaseException:
            if not finished.is_set():
                try:
                    trio.from_thread.run_sync(scope.cancel, trio_token=token)
                except trio.RunFinishedError:
                    pass  # the client's thread has ended: nothing runs any more
                else:
                    finished.wait()
            raise

    def close(self) -> None:
        """Close the client and stop its thread (idempotent)."""
        token, self._token = self._token, None
        if token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=token)
            except trio.RunFinishedError:
                pass
            self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The async client underneath (its attributes are safe to read)."""
        return self._client

    @property
    def config(self) -> ModelConfig:
        return self._client.config

    @property
    def has_tokenizer(self) -> bool:
        return self._client.has_tokenizer

    @property
    def stop_tokens(self) -> Collection[int]:
        """The default stop tokens: the checkpoint's ``eos_token_id``."""
        return self._client.stop_tokens

    @property
    def last_route(self) -> list[PlannedHop]:
        """The hops the last generation went through."""
        return self._client.last_route

    def generate(
        self, prompt: Prompt, *, max_new_tokens: int, **options: Unpack[GenerationOptions]
    ) -> list[int]:
        """``Client.generate``, blocking: ``ids = c.generate("Once", max_new_tokens=16)``."""
        return self._run(self._client.generate, prompt, max_new_tokens=max_new_tokens, **options)

    def generate_batch(
        self,
        prompts: Sequence[Prompt] | Tensor,
        *,
        max_new_tokens: int,
        **options: Unpack[GenerationOptions],
    ) -> list[list[int]]:
        """``Client.generate_batch``, blocking: ``rows = c.generate_batch([a, b], max_new_tokens=16)``."""
        return self._run(
            self._client.generate_batch, prompts, max_new_tokens=max_new_tokens, **options
        )

    def stream(
        self, prompt: Prompt, *, max_new_tokens: int, **options: Unpack[GenerationOptions]
    ) -> Iterator[int]:
        """``Client.stream``, blocking: ``for token in c.stream(ids, max_new_tokens=16):``.

        Leaving the ``for`` loop early (``break``, an exception) closes the
        remote sessions at once; a caller that keeps the iterator in a
        variable ends it with ``.close()``."""
        tokens = self._client.stream(prompt, max_new_tokens=max_new_tokens, **options)
        try:
            while True:
                try:
                    yield self._run(tokens.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            if self._token is not None:
                self._run(tokens.aclose)

    def forward(
        self, hidden: Tensor, *, start: int = 0, end: int | None = None, adapter: str | None = None
    ) -> Tensor:
        """``Client.forward``, blocking."""
        return self._run(self._client.forward, hidden, start=start, end=end, adapter=adapter)

    def inference_session(
        self, *, max_length: int, batch: int = 1, adapter: str | None = None
    ) -> SyncInferenceSession:
        """``with c.inference_session(max_length=64) as s: logits = s.step(ids)``."""
        session = self._run(_make_session, self._client, max_length, batch, adapter)
        return SyncInferenceSession(self, session)

    def remote_blocks(self, **options: Any) -> RemoteBlocks:
        """``Client.remote_blocks``; the module works from any thread."""
        return self._run(_remote_blocks, self._client, **options)

    def encode(self, text: str) -> list[int]:
        return self._client.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._client.decode(ids)


async def _remote_blocks(client: Client, **options: Any) -> RemoteBlocks:
    return client.remote_blocks(**options)


async def _make_session(
    client: Client, max_length: int, batch: int, adapter: str | None
) -> InferenceSession:
    session = client.inference_session(max_length=max_length, batch=batch, adapter=adapter)
    return await session.__aenter__()


class SyncInferenceSession:
    """A blocking ``InferenceSession``; ``with client.inference_session(...) as s:``."""

    def __init__(self, owner: SyncClient, session: InferenceSession) -> None:
        self._owner = owner
        self._session = session

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def max_length(self) -> int:
        return self._session.max_length

    @property
    def batch(self) -> int:
        return self._session.batch

    @property
    def route(self) -> list[PlannedHop]:
        return self._session.route

    @property
    def failovers(self) -> int:
        return self._session.failovers

    def step(self, token_ids: Sequence[int] | Tensor) -> Tensor:
        return self._owner._run(self._session.step, token_ids)

    def step_hidden(self, hidden: Tensor) -> Tensor:
        return self._owner._run(self._session.step_hidden, hidden)

    def rollback(self, position: int) -> None:
        self._owner._run(_call_sync, self._session.rollback, position)

    def close(self) -> None:
        self._owner._run(self._session.__aexit__, None, None, None)

    def __enter__(self) -> SyncInferenceSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _call_sync(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)
