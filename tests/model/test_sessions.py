"""Inference sessions: chunked prefill, rollback, batched decode, limits."""

from __future__ import annotations

import pytest
import torch

from libpipe.errors import CacheFullError, InvalidRequestError, SessionError
from libpipe.model import KVCachePool, load_span

EXACT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def span(checkpoints):
    return load_span(checkpoints["llama-gqa"], 2, 6, progress=False)


@pytest.fixture
def pool():
    pool = KVCachePool(1 << 26)
    yield pool
    assert pool.used_bytes == 0, "a test leaked a cache"


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_prefill_in_chunks_equals_one_pass_and_no_cache(span, pool):
    x = _x(2, 45, 64)
    reference = span(x)
    for chunk in (512, 7, 1):
        span.prefill_chunk = chunk
        try:
            with span.open_session(pool, batch=2, max_length=64) as s:
                out = torch.cat([s.step(x[:, :10]), s.step(x[:, 10:])], dim=1)
                assert s.position == 45
        finally:
            span.prefill_chunk = 512
        torch.testing.assert_close(out, reference, **EXACT)


def test_sub_span_session_matches_sub_span_forward(span, pool):
    x = _x(1, 12, 64, seed=1)
    with span.open_session(pool, batch=1, max_length=16, start=3, end=5) as s:
        assert s.cache.tensor.shape[0] == 2
        torch.testing.assert_close(s.step(x), span(x, 3, 5), **EXACT)
    with pytest.raises(InvalidRequestError, match=r"\[1, 4\)"):
        span.open_session(pool, batch=1, max_length=16, start=1, end=4)


def test_rollback_then_redecode_equals_fresh(span, pool):
    x = _x(1, 20, 64, seed=2)
    other = _x(1, 6, 64, seed=3)
    with (
        span.open_session(pool, batch=1, max_length=32) as s,
        span.open_session(pool, batch=1, max_length=32) as fresh,
    ):
        s.step(x[:, :14])
        s.step(other)  # a speculative guess that is rejected
        s.rollback(14)
        assert s.position == 14
        fresh.step(x[:, :14])
        for t in range(14, 20):
            torch.testing.assert_close(
                s.step(x[:, t : t + 1]), fresh.step(x[:, t : t + 1]), **EXACT
            )
        with pytest.raises(InvalidRequestError, match="roll back to 21"):
            s.rollback(21)
        with pytest.raises(InvalidRequestError):
            s.rollback(-1)


def test_batched_decode_equals_each_session_alone(span, pool):
    prompts = [
        _x(1, 5, 64, seed=10),
        _x(2, 13, 64, seed=11),
        _x(1, 1, 64, seed=12),
        _x(3, 30, 64, seed=13),
    ]
    batched = [span.open_session(pool, batch=p.shape[0], max_length=40) for p in prompts]
    alone = [span.open_session(pool, batch=p.shape[0], max_length=40) for p in prompts]
    try:
        for a, b, p in zip(batched, alone, prompts, strict=True):
            a.step(p)
            b.step(p)
        for step in range(4):
            xs = [_x(p.shape[0], 1, 64, seed=100 * step + i) for i, p in enumerate(prompts)]
            outs = span.decode_batch(batched, xs)
            for out, b, x in zip(outs, alone, xs, strict=True):
                torch.testing.assert_close(out, b.step(x), **EXACT)
        assert [s.position for s in batched] == [9, 17, 5, 34]
        # Rolled back sessions batch at their new positions too.
        batched[3].rollback(31)
        alone[3].rollback(31)
        xs = [_x(p.shape[0], 1, 64, seed=999) for p in prompts]
        for out, b, x in zip(span.decode_batch(batched, xs), alone, xs, strict=True):
            torch.testing.assert_close(out, b.step(x), **EXACT)
    finally:
        for s in batched + alone:
            s.close()


def test_batched_decode_refuses_mismatched_sessions(span, pool):
    with (
        span.open_session(pool, batch=1, max_length=2) as a,
        span.open_session(pool, batch=1, max_length=8, start=3) as b,
    ):
        one = _x(1, 1, 64)
        with pytest.raises(InvalidRequestError, match="share span"):
            span.decode_batch([a, b], [one, one])
        with pytest.raises(InvalidRequestError, match="twice"):
            span.decode_batch([a, a], [one, one])
        with pytest.raises(InvalidRequestError, match="2 sessions but 1"):
            span.decode_batch([a, b], [one])
        with pytest.raises(InvalidRequestError, match=r"expected \[1, 1, 64\]"):
            span.decode_batch([a], [_x(1, 2, 64)])
        span.decode_batch([a], [one])
        span.decode_batch([a], [one])
        with pytest.raises(SessionError, match="max_length 2"):
            span.decode_batch([a], [one])


def test_step_errors_leave_the_session_usable(span, pool):
    with span.open_session(pool, batch=2, max_length=8) as s:
        with pytest.raises(InvalidRequestError, match=r"shape \[1, 3, 64\]"):
            s.step(_x(1, 3, 64))
        with pytest.raises(InvalidRequestError, match=r"shape \[2, 3\]"):
            s.step(_x(2, 3))
        with pytest.raises(InvalidRequestError, match="T>0"):
            s.step(_x(2, 0, 64))
        with pytest.raises(InvalidRequestError, match="float64"):
            s.step(_x(2, 3, 64).double())
        with pytest.raises(InvalidRequestError, match="must be a tensor"):
            s.step([[0.0]])
        s.step(_x(2, 6, 64))
        with pytest.raises(SessionError, match="max_length 8"):
            s.step(_x(2, 3, 64))
        assert s.position == 6
        s.step(_x(2, 2, 64))
    assert s.closed
    with pytest.raises(SessionError, match="closed"):
        s.step(_x(2, 1, 64))
    with pytest.raises(SessionError, match="closed"):
        s.rollback(0)


def test_open_session_limits(span, checkpoints):
    small = KVCachePool(10_000)
    with pytest.raises(CacheFullError) as info:
        span.open_session(small, batch=1, max_length=100)
    # 4 blocks x (K, V) x 2 kv heads x 100 positions x 16 dims x 4 bytes
    assert info.value.details == {"requested": 4 * 2 * 2 * 100 * 16 * 4, "free": 10_000}
    assert small.used_bytes == 0
    with pytest.raises(InvalidRequestError, match="max_length"):
        span.open_session(small, batch=1, max_length=8193)
    with pytest.raises(InvalidRequestError, match="max_length"):
        span.open_session(small, batch=1, max_length=0)
    other = load_span(checkpoints["llama-gqa"], 0, 1, progress=False)
    with KVCachePool(1 << 20).allocate(1, 4, 1, 2, 16, torch.float32) as cache:
        assert cache.length == 0
    with span.open_session(KVCachePool(1 << 20), batch=1, max_length=4) as s:
        with pytest.raises(InvalidRequestError, match="another span"):
            other.step(s, _x(1, 1, 64))


def test_8192_token_session_on_gqa(checkpoints, pool):
    span = load_span(checkpoints["llama-gqa"], 0, 2, progress=False)
    x = _x(1, 8192, 64, seed=5)
    with span.open_session(pool, batch=1, max_length=8192) as s:
        prefill = s.step(x[:, :8190])
        last = torch.cat([s.step(x[:, 8190:8191]), span.decode_batch([s], [x[:, 8191:]])[0]], dim=1)
        assert s.position == 8192
    with torch.no_grad():
        reference = span(x)
    torch.testing.assert_close(prefill[:, -64:], reference[:, 8126:8190], **EXACT)
    torch.testing.assert_close(last, reference[:, 8190:], **EXACT)


def test_a_step_failing_half_way_leaves_the_session_where_it_was(span, pool, monkeypatch):
    x = _x(1, 20, 64, seed=6)
    with (
        span.open_session(pool, batch=1, max_length=32) as s,
        span.open_session(pool, batch=1, max_length=32) as fresh,
    ):
        s.step(x[:, :4])
        fresh.step(x[:, :4])
        span.prefill_chunk = 5
        real = span._run_chunk
        calls = []

        def failing_second_chunk(session, chunk):
            calls.append(chunk.shape[1])
            if len(calls) == 2:
                raise MemoryError("simulated")
            return real(session, chunk)

        monkeypatch.setattr(span, "_run_chunk", failing_second_chunk)
        try:
            with pytest.raises(MemoryError):
                s.step(x[:, 4:16])
        finally:
            monkeypatch.undo()
            span.prefill_chunk = 512
        assert calls == [5, 5] and s.position == 4
        torch.testing.assert_close(s.step(x[:, 4:]), fresh.step(x[:, 4:]), **EXACT)


def test_bf16_sessions_stay_near_fp32(checkpoints, pool):
    fp32 = load_span(checkpoints["llama-gqa"], 0, 8, progress=False)
    bf16 = load_span(checkpoints["llama-gqa"], 0, 8, dtype="bf16", progress=False)
    x = _x(1, 20, 64, seed=8)
    reference = fp32(x)
    with (
        bf16.open_session(pool, batch=1, max_length=32) as a,
        bf16.open_session(pool, batch=1, max_length=32) as b,
    ):
        assert a.cache.tensor.dtype == torch.bfloat16
        a.step(x[:, :10].bfloat16())
        b.step(x[:, :15].bfloat16())
        out_a, out_b = bf16.decode_batch([a, b], [x[:, 10:11].bfloat16(), x[:, 15:16].bfloat16()])
    # bf16 keeps 8 bits of mantissa; through 8 blocks a few percent is expected.
    torch.testing.assert_close(out_a.float(), reference[:, 10:11], atol=0.3, rtol=0.05)
    torch.testing.assert_close(out_b.float(), reference[:, 15:16], atol=0.3, rtol=0.05)
