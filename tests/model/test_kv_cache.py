import threading

import pytest
import torch

from libpipe.errors import CacheFullError, DrainingError, InvalidRequestError, SessionError
from libpipe.model import KVCachePool


def test_budget_is_kept_and_freed():
    per = KVCachePool.cache_bytes(2, 100, 3, 2, 16, torch.float32)
    assert per == 3 * 2 * 2 * 2 * 100 * 16 * 4
    pool = KVCachePool(2 * per + 10)
    a = pool.allocate(2, 100, 3, 2, 16, torch.float32)
    assert a.tensor.shape == (3, 2, 2, 2, 100, 16) and a.nbytes == per
    with pool.allocate(2, 100, 3, 2, 16, torch.float32):
        assert pool.free_bytes == 10
        with pytest.raises(CacheFullError) as info:
            pool.allocate(1, 1, 1, 1, 8, torch.float32)
        assert info.value.details == {"requested": 64, "free": 10}
        assert info.value.kind == "cache_full"
    assert pool.used_bytes == per
    a.close()
    a.close()  # idempotent: bytes are returned once
    assert (pool.used_bytes, pool.free_bytes) == (0, 2 * per + 10)
    with pytest.raises(SessionError):
        _ = a.tensor


def test_half_precision_caches_cost_half():
    assert KVCachePool.cache_bytes(1, 8, 1, 1, 8, torch.bfloat16) == 2 * 8 * 8 * 2


@pytest.mark.parametrize(
    "args", [(0, 8, 1, 1, 8), (1, -1, 1, 1, 8), (1, 8, 1, 1, 2.5), (True, 8, 1, 1, 8)]
)
def test_bad_shapes_are_refused(args):
    pool = KVCachePool(1 << 20)
    with pytest.raises(InvalidRequestError, match="positive int"):
        pool.allocate(*args, torch.float32)
    assert pool.used_bytes == 0


def test_negative_budget_is_refused():
    with pytest.raises(InvalidRequestError):
        KVCachePool(-1)


def test_allocator_failure_becomes_cache_full(monkeypatch):
    pool = KVCachePool(1 << 20)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "empty", oom)
    with pytest.raises(CacheFullError, match="out of memory") as info:
        pool.allocate(1, 8, 1, 1, 8, torch.float32)
    assert info.value.details["requested"] == 2 * 8 * 8 * 4
    assert pool.used_bytes == 0


def test_concurrent_allocation_never_oversubscribes():
    per = KVCachePool.cache_bytes(1, 16, 1, 1, 8, torch.float32)
    pool = KVCachePool(10 * per)
    got, full = [], []

    def worker():
        for _ in range(5):
            try:
                got.append(pool.allocate(1, 16, 1, 1, 8, torch.float32))
            except CacheFullError:
                full.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(got), len(full)) == (10, 10)
    assert pool.free_bytes == 0


def test_closing_the_pool_frees_every_open_cache():
    with KVCachePool(1 << 20) as pool:
        a = pool.allocate(1, 8, 1, 1, 8, torch.float32)
        b = pool.allocate(1, 8, 1, 1, 8, torch.float32)
        b.close()
        assert pool.used_bytes == 512
    assert a.closed and pool.used_bytes == 0
    with pytest.raises(DrainingError, match="pool is closed"):
        pool.allocate(1, 8, 1, 1, 8, torch.float32)
