"""How fast this server's span runs, measured once and remembered on disk.

Clients route by these numbers (DESIGN.md, 'The performance model'), so
they are measured on the real span, device and dtype rather than guessed:
decode steps/s over the whole span (one sequence, one position per step,
with a KV cache, as a generating client sees it) and forward tokens/s (one
bulk pass). Measuring takes a few seconds on a real model, so results are
cached in ``throughput.json`` under the cache directory, keyed by model id,
span, dtype and device; a corrupt cache file is measured over, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..model import BlockSpan, KVCachePool

logger = logging.getLogger("libpipe.server")

CACHE_FILE = "throughput.json"
# Bump when the measurement changes meaning, so old numbers are not reused.
METHOD_VERSION = 1
# Context the decode steps run at: a short prompt, as most generation starts.
DECODE_CONTEXT = 32
# Tokens per forward pass: one prefill chunk's worth of bulk work.
FORWARD_TOKENS = 256


@dataclass(frozen=True)
class Throughput:
    decode: float  # single-token steps/s over the whole span
    forward: float  # tokens/s of bulk forward over the whole span


def cache_key(span: BlockSpan) -> str:
    dtype = str(span.dtype).removeprefix("torch.")
    return f"v{METHOD_VERSION}|{span.config.model_id}|{span.start}:{span.end}|{dtype}|{span.device}"


def measure(span: BlockSpan, *, seconds: float = 2.0, progress: bool = True) -> Throughput:
    """Time decode steps and forward passes for about ``seconds`` each (sync, blocking)."""
    d = span.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=span.device, dtype=span.dtype)

    # Steps are capped so the session fits the model's context.
    steps_cap = max(3, min(1000, span.config.max_position_embeddings - DECODE_CONTEXT - 1))
    pool = KVCachePool(
        KVCachePool.cache_bytes(
            1,
            DECODE_CONTEXT + steps_cap + 1,
            span.end - span.start,
            span.config.num_key_value_heads,
            span.config.head_dim,
            span.dtype,
        ),
        span.device,
    )
    x = randn(1, DECODE_CONTEXT, d)
    one = randn(1, 1, d)
    bulk = randn(1, FORWARD_TOKENS, d)
    with (
        tqdm(
            desc="measuring throughput", unit="pass", file=sys.stderr, disable=not progress
        ) as bar,
        span.open_session(pool, batch=1, max_length=DECODE_CONTEXT + steps_cap + 1) as session,
        torch.no_grad(),
    ):
        session.step(x)
        session.step(one)  # warm-up
        steps, t0 = 0, time.perf_counter()
        while steps < steps_cap and (steps < 3 or time.perf_counter() - t0 < seconds):
            session.step(one)
            steps += 1
            bar.update(1)
        _sync(span.device)
        decode = steps / (time.perf_counter() - t0)
        span(bulk)  # warm-up
        passes, t0 = 0, time.perf_counter()
        while passes < 3 or (time.perf_counter() - t0 < seconds and passes < 100):
            span(bulk)
            passes += 1
            bar.update(1)
        _sync(span.device)
        forward = passes * FORWARD_TOKENS / (time.perf_counter() - t0)
    return Throughput(decode=decode, forward=forward)


def load_or_measure(
    span: BlockSpan, cache_dir: Path, *, seconds: float = 2.0, progress: bool = True
) -> Throughput:
    """The cached figures for this span, or fresh ones (then cached)."""
    path = cache_dir / CACHE_FILE
    key = cache_key(span)
    entries = _read(path)
    cached = entries.get(key)
    if isinstance(cached, dict):
        try:
            found = Throughput(decode=float(cached["decode"]), forward=float(cached["forward"]))
        except (KeyError, TypeError, ValueError):
            logger.warning("throughput cache entry %s is malformed; measuring again", key)
        else:
            if found.decode > 0 and found.forward > 0:
                logger.info("throughput from cache %s: %s", path, _describe(found))
                return found
    logger.info("measuring throughput of blocks %d:%d", span.start, span.end)
    result = measure(span, seconds=seconds, progress=progress)
    logger.info("measured throughput: %s", _describe(result))
    entries[key] = {"decode": result.decode, "forward": result.forward, "measured_at": time.time()}
    _write(path, entries)
    return result


def _describe(t: Throughput) -> str:
    return f"decode {t.decode:.1f} steps/s, forward {t.forward:.0f} tokens/s"


def _read(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("ignoring unreadable throughput cache %s: %s", path, exc)
        return {}
    if not isinstance(raw, dict):
        logger.warning("ignoring throughput cache %s: not a JSON object", path)
        return {}
    return raw


def _write(path: Path, entries: dict[str, object]) -> None:
    """Atomically (write then rename): servers starting together share the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".throughput-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        # A read-only home must not stop a server: it measures again next time.
        logger.warning("cannot write throughput cache %s: %s", path, exc)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
