"""KV caches under a byte budget.

Theory of operation: a server promises the swarm an amount of cache memory
(gossiped as "free cache") and must never go past it, because running out
of GPU memory in the middle of a step would kill every session on the
device. So each session's cache is allocated whole, up front, for its
``max_length``: the pool first reserves the bytes against its budget (under
a lock: the event loop admits sessions while the compute thread frees
them), and only then allocates the tensor. A reservation that does not fit
raises ``CacheFullError`` with what was asked and what is free; an
allocator failure is turned into the same error and the reservation is
returned.

Layout per session: ``[n_blocks, 2, B, H_kv, T_max, Dh]`` (index 0 of the
second axis is K, 1 is V). One tensor per session keeps a session's memory
contiguous and its release trivial; batched decode across sessions gathers
the live prefixes per step (see ``BlockSpan.decode_batch``).
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType

import torch

from ..errors import CacheFullError, DrainingError, InvalidRequestError, SessionError
from ._device import canonical_device


class KVCachePool:
    """Hands out KV caches while their total size stays within ``budget_bytes``."""

    def __init__(self, budget_bytes: int, device: str | torch.device = "cpu") -> None:
        if budget_bytes < 0:
            raise InvalidRequestError(f"cache budget must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = canonical_device(device)
        self._used = 0
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[KVCache] = weakref.WeakSet()
        self._closed = False

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self._used

    @staticmethod
    def cache_bytes(
        batch: int,
        max_length: int,
        n_blocks: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """Bytes a cache of this shape takes (what ``allocate`` reserves)."""
        return n_blocks * 2 * batch * n_kv_heads * max_length * head_dim * dtype.itemsize

    def allocate(
        self,
        batch: int,
        max_length: int,
        n_blocks: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> KVCache:
        """A zero-length cache of room ``max_length``; raises ``CacheFullError`` if it won't fit."""
        for name, value in (
            ("batch", batch),
            ("max_length", max_length),
            ("n_blocks", n_blocks),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequestError(f"cache {name} must be a positive int, got {value!r}")
        requested = self.cache_bytes(batch, max_length, n_blocks, n_kv_heads, head_dim, dtype)
        self._reserve(requested)
        try:
            # Every element is written before it is read (positions < length
            # only), so uninitialised memory is fine and saves a memset.
            tensor = torch.empty(
                (n_blocks, 2, batch, n_kv_heads, max_length, head_dim),
                dtype=dtype,
                device=self.device,
            )
        except torch.OutOfMemoryError:
            self._release(requested)
            raise CacheFullError(
                f"device out of memory allocating a {requested}-byte KV cache",
                requested=requested,
                free=self.free_bytes,
            ) from None
        cache = KVCache(self, tensor, requested)
        self._live.add(cache)
        return cache

    def close(self) -> None:
        """Free every cache still open (server shutdown); later allocations fail."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for cache in live:
            cache.close()

    def __enter__(self) -> KVCachePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            if self._closed:
                raise DrainingError("KV cache pool is closed: no new sessions")
            free = self.budget_bytes - self._used
            if nbytes > free:
                raise CacheFullError(
                    f"KV cache of {nbytes} bytes asked for, {free} of {self.budget_bytes} free",
                    requested=nbytes,
                    free=free,
                )
            self._used += nbytes

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes


class KVCache:
    """One session's keys and values; ``length`` positions of them are valid."""

    def __init__(self, pool: KVCachePool, tensor: torch.Tensor, nbytes: int) -> None:
        self._pool = pool
        self._tensor: torch.Tensor | None = tensor
        self.nbytes = nbytes
        self.length = 0

    @property
    def tensor(self) -> torch.Tensor:
        """``[n_blocks, 2, B, H_kv, T_max, Dh]``; raises ``SessionError`` once closed."""
        if self._tensor is None:
            raise SessionError("KV cache used after it was closed")
        return self._tensor

    @property
    def closed(self) -> bool:
        return self._tensor is None

    @property
    def batch(self) -> int:
        return self.tensor.shape[2]

    @property
    def max_length(self) -> int:
        return self.tensor.shape[4]

    def close(self) -> None:
        """Give the bytes back to the pool; idempotent, and safe against the
        pool closing it from another thread at the same time."""
        with self._pool._lock:
            if self._tensor is None:
                return
            self._tensor = None
            self._pool._used -= self.nbytes

    def __enter__(self) -> KVCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
