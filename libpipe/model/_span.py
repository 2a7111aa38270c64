"""A contiguous span of blocks and the three ways a server runs it.

1. ``span(hidden, start, end)``: a whole sequence through blocks
   ``[start, end)``, no cache. Differentiable w.r.t. ``hidden`` (weights are
   frozen), which is what bulk forward/backward and fine-tuning need.
2. ``InferenceSession.step(hidden)``: a session's next tokens, keys and
   values kept in the session's cache. Long inputs go through in chunks of
   ``prefill_chunk`` positions so attention scratch (``[B, H, chunk, L]``)
   stays bounded however long the prompt. ``rollback(p)`` forgets positions
   ``>= p`` (speculative decoding, replay after a failed hop).
3. ``span.decode_batch(sessions, hiddens)``: one decode step of many
   independent sessions in one pass (continuous batching). Rows of all
   sessions are stacked, so the projections and the MLP, which dominate
   decode time, run once for all of them as one matmul. Attention runs per
   session straight on its cache prefix. Measured with bench/model.py
   (hidden 1024, 8 blocks, 16 sessions at 2048 context, 2 CPU threads):
   copying every prefix into one padded, masked buffer for a single SDPA
   call gave 77 tok/s, per-session calls 134 tok/s; the loop costs
   microseconds per session.

LoRA adapters (``_lora.py``) are registered by name with ``add_adapter``
and chosen per call (``adapter=``) or per session; the base weights never
change, so requests with different adapters (or none) share one span, even
in one batched decode step. Deep prompts (``prompts=``, fine-tuning) are
added to the first positions of the hidden states before each block.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InvalidRequestError, SessionError
from ._config import ModelConfig
from ._kv_cache import KVCache, KVCachePool
from ._llama import Block, BlockAdapter, Rotary, attend
from ._lora import LoraAdapter, RowsLora

# Positions per prefill chunk: [B, H, 512, 8192] fp32 scores are 512 MiB per
# sequence for 32 heads in the math backend; smaller chunks cost more passes.
DEFAULT_PREFILL_CHUNK = 512


class BlockSpan(nn.Module):
    """Blocks ``[start, end)`` of a model, frozen, on one device and dtype.

    Build with ``load_span``; block indices in every method are absolute
    (those of the whole model), so a server and its clients speak the same
    numbers.
    """

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise InvalidRequestError(
                f"span [{start}, {end}) is not within the model's {config.num_hidden_layers} blocks"
            )
        if prefill_chunk <= 0:
            raise InvalidRequestError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.config = config
        self.start, self.end = start, end
        self.device, self.dtype = device, dtype
        self.prefill_chunk = prefill_chunk
        self.layers = nn.ModuleList(Block(config, i) for i in range(end - start))
        self.rotary = Rotary(config, device)
        self.adapters: dict[str, LoraAdapter] = {}

    # --- adapters ----------------------------------------------------------------

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Make ``adapter`` available to requests that name it."""
        if not adapter.name or adapter.name in self.adapters:
            raise ConfigError(f"adapter name {adapter.name!r} is empty or already loaded")
        if (adapter.start, adapter.end) != (self.start, self.end):
            raise ConfigError(
                f"adapter {adapter.name!r} was loaded for blocks [{adapter.start}, {adapter.end}), "
                f"this span is [{self.start}, {self.end})"
            )
        self.adapters[adapter.name] = adapter

    def _adapter(self, name: str | None) -> LoraAdapter | None:
        if name is None or name == "":
            return None
        if not isinstance(name, str) or name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise InvalidRequestError(f"unknown adapter {name!r} (loaded: {known})")
        return self.adapters[name]

    # --- 1. full sequence, no cache ------------------------------------------

    def forward(
        self,
        hidden: Tensor,
        start: int | None = None,
        end: int | None = None,
        *,
        adapter: str | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        """``hidden: [B, T, D]`` through blocks ``[start, end)`` (default: all).

        ``prompts: [end - start, B, P, D]``: before block ``start + i``,
        ``prompts[i]`` is added to the first ``P`` positions."""
        start, end = self._sub_span(start, end)
        self._check_hidden(hidden)
        lora = self._adapter(adapter)
        bsz, t, _ = hidden.shape
        if prompts is not None:
            self._check_prompts(prompts, end - start, bsz, t)
        positions = torch.arange(t, device=self.device).expand(bsz, t)  # [B, T]
        cos, sin = self.rotary(positions, self.dtype)
        for i, block in enumerate(self.layers[start - self.start : end - self.start]):
            if prompts is not None:
                p = prompts.shape[2]
                hidden = torch.cat([hidden[:, :p] + prompts[i], hidden[:, p:]], dim=1)
            hidden = block(hidden, cos, sin, None, _block_lora(lora, start + i))
        return hidden

    def backward(
        self,
        hidden: Tensor,
        grad_output: Tensor,
        start: int | None = None,
        end: int | None = None,
        *,
        adapter: str | None = None,
        prompts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients of the loss w.r.t. ``hidden`` (and ``prompts``) given its
        gradient w.r.t. ``forward``'s output; recomputes the forward, so
        nothing is kept between a bulk forward and its backward."""
        self._check_hidden(hidden)
        self._check_hidden(grad_output)
        if grad_output.shape != hidden.shape:
            raise InvalidRequestError(
                f"gradient has shape {list(grad_output.shape)}, inputs {list(hidden.shape)}"
            )
        with torch.enable_grad():
            x = hidden.detach().requires_grad_(True)
            p = None if prompts is None else prompts.detach().requires_grad_(True)
            out = self.forward(x, start, end, adapter=adapter, prompts=p)
            wrt = [x] if p is None else [x, p]
            grads = torch.autograd.grad(out, wrt, grad_output)
        return grads[0], (grads[1] if p is not None else None)

    # --- 2. sessions with a KV cache -------------------------------------------

    def open_session(
        self,
        pool: KVCachePool,
        *,
        batch: int,
        max_length: int,
        start: int | None = None,
        end: int | None = None,
        adapter: str | None = None,
    ) -> InferenceSession:
        """Reserve a cache for ``max_length`` positions of blocks ``[start, end)``.

        Raises ``CacheFullError`` if the pool cannot hold it."""
        start, end = self._sub_span(start, end)
        lora = self._adapter(adapter)
        limit = self.config.max_position_embeddings
        if (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or not 0 < max_length <= limit
        ):
            raise InvalidRequestError(f"max_length must be in [1, {limit}], got {max_length!r}")
        if pool.device != self.device:
            raise InvalidRequestError(f"cache pool is on {pool.device}, span on {self.device}")
        cache = pool.allocate(
            batch,
            max_length,
            end - start,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.dtype,
        )
        return InferenceSession(self, cache, start, end, lora)

    @torch.no_grad()
    def step(self, session: InferenceSession, hidden: Tensor) -> Tensor:
        """Run ``hidden: [B, T, D]`` at the session's position; advance it by T."""
        if session.span is not self:
            raise InvalidRequestError("session belongs to another span")
        cache = session.cache
        self._check_hidden(hidden, batch=cache.batch)
        t = hidden.shape[1]
        if session.position + t > cache.max_length:
            raise SessionError(
                f"{t} more positions would pass the session's max_length {cache.max_length} "
                f"(at {session.position})"
            )
        begin = session.position
        outputs = []
        try:
            for c in range(0, t, self.prefill_chunk):
                chunk = hidden[:, c : c + self.prefill_chunk]  # [B, Tc, D]
                outputs.append(self._run_chunk(session, chunk))
        except BaseException:
            # All or nothing: a step that fails half-way (cancelled, out of
            # memory) leaves the session where it was, so the client can retry.
            session.cache.length = begin
            raise
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _run_chunk(self, session: InferenceSession, x: Tensor) -> Tensor:
        bsz, t, _ = x.shape
        pos = session.position
        positions = torch.arange(pos, pos + t, device=self.device).expand(bsz, t)  # [B, Tc]
        cos, sin = self.rotary(positions, self.dtype)
        view = _SessionView(session.cache.tensor, session.start - self.start, pos, t)
        for i, block in enumerate(
            self.layers[session.start - self.start : session.end - self.start]
        ):
            x = block(x, cos, sin, view, _block_lora(session.adapter, session.start + i))
        session.cache.length = pos + t
        return x

    # --- 3. one decode step of many sessions -------------------------------------

    @torch.no_grad()
    def decode_batch(
        self, sessions: Sequence[InferenceSession], hiddens: Sequence[Tensor]
    ) -> list[Tensor]:
        """One position for each session (``hiddens[i]: [B_i, 1, D]``), in one pass.

        All sessions must be of this span and cover the same sub-span. Returns
        the outputs in the order given, equal to ``step`` on each alone."""
        if len(sessions) != len(hiddens) or not sessions:
            raise InvalidRequestError(f"{len(sessions)} sessions but {len(hiddens)} inputs")
        if len({id(s) for s in sessions}) != len(sessions):
            raise InvalidRequestError("a session appears twice in one batch")
        first = sessions[0]
        for s, h in zip(sessions, hiddens, strict=True):
            if s.span is not self or (s.start, s.end) != (first.start, first.end):
                raise InvalidRequestError(
                    f"batched sessions must share span [{first.start}, {first.end}); "
                    f"one has [{s.start}, {s.end})"
                )
            self._check_hidden(h, batch=s.cache.batch, t=1)
            if s.position >= s.cache.max_length:
                raise SessionError(f"session is full at its max_length {s.cache.max_length}")
        x = torch.cat(list(hiddens), dim=0)  # [R, 1, D]
        row_pos = torch.cat(
            [torch.full((s.cache.batch,), s.position, device=self.device) for s in sessions]
        )  # [R]
        cos, sin = self.rotary(row_pos[:, None], self.dtype)  # [R, 1, Dh]
        view = _BatchView(sessions, first.start - self.start)
        for i, block in enumerate(self.layers[first.start - self.start : first.end - self.start]):
            x = block(x, cos, sin, view, _rows_lora(sessions, first.start + i))
        for s in sessions:
            s.cache.length += 1
        return list(x.split([s.cache.batch for s in sessions], dim=0))

    # --- checks --------------------------------------------------------------------

    def _sub_span(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise InvalidRequestError(
                f"blocks [{start}, {end}) are not within this span [{self.start}, {self.end})"
            )
        return start, end

    def _check_prompts(self, prompts: Tensor, blocks: int, batch: int, t: int) -> None:
        if not isinstance(prompts, Tensor):
            raise InvalidRequestError(f"prompts must be a tensor, got {type(prompts).__name__}")
        shape = list(prompts.shape)
        d = self.config.hidden_size
        if (
            prompts.dim() != 4
            or shape[0] != blocks
            or shape[1] != batch
            or not 0 < shape[2] <= t
            or shape[3] != d
        ):
            raise InvalidRequestError(
                f"deep prompts have shape {shape}, expected [{blocks}, {batch}, P, {d}] "
                f"with 0 < P <= {t}"
            )
        if prompts.dtype != self.dtype or prompts.device != self.device:
            raise InvalidRequestError(
                f"deep prompts are {prompts.dtype} on {prompts.device}, "
                f"this span computes in {self.dtype} on {self.device}"
            )

    def _check_hidden(
        self, hidden: Tensor, *, batch: int | None = None, t: int | None = None
    ) -> None:
        if not isinstance(hidden, Tensor):
            raise InvalidRequestError(
                f"hidden states must be a tensor, got {type(hidden).__name__}"
            )
        d = self.config.hidden_size
        shape = tuple(hidden.shape)
        if (
            hidden.dim() != 3
            or shape[2] != d
            or shape[1] == 0
            or (batch is not None and shape[0] != batch)
            or (t is not None and shape[1] != t)
        ):
            want = f"[{batch if batch is not None else 'B'}, {t if t is not None else 'T>0'}, {d}]"
            raise InvalidRequestError(f"hidden states have shape {list(shape)}, expected {want}")
        if hidden.dtype != self.dtype:
            raise InvalidRequestError(
                f"hidden states are {hidden.dtype}, this span computes in {self.dtype}"
            )
        if hidden.device != self.device:
            raise InvalidRequestError(
                f"hidden states are on {hidden.device}, this span on {self.device}"
            )


class InferenceSession:
    """One client's generation state on one span: its cache and position."""

    def __init__(
        self,
        span: BlockSpan,
        cache: KVCache,
        start: int,
        end: int,
        adapter: LoraAdapter | None = None,
    ) -> None:
        self.span = span
        self.cache = cache
        self.start, self.end = start, end
        self.adapter = adapter

    @property
    def position(self) -> int:
        """How many positions the cache holds (the next token's position)."""
        return self.cache.length

    @property
    def max_length(self) -> int:
        return self.cache.max_length

    @property
    def closed(self) -> bool:
        return self.cache.closed

    def step(self, hidden: Tensor) -> Tensor:
        return self.span.step(self, hidden)

    def rollback(self, position: int) -> None:
        """Forget every position ``>= position``; the next step starts there."""
        if self.cache.closed:
            raise SessionError("session used after it was closed")
        if (
            isinstance(position, bool)
            or not isinstance(position, int)
            or not 0 <= position <= self.position
        ):
            raise InvalidRequestError(
                f"cannot roll back to {position!r}: session is at {self.position}"
            )
        self.cache.length = position

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _block_lora(adapter: LoraAdapter | None, index: int) -> BlockAdapter | None:
    return None if adapter is None else adapter.for_block(index)


def _rows_lora(sessions: Sequence[InferenceSession], index: int) -> BlockAdapter | None:
    """One adapter per session's rows, or None when no session has one."""
    if all(s.adapter is None for s in sessions):
        return None
    return RowsLora([(s.cache.batch, _block_lora(s.adapter, index)) for s in sessions])


class _SessionView:
    """KV access for one session: write the new positions, read the prefix."""

    def __init__(self, cache: Tensor, block_offset: int, pos: int, t: int) -> None:
        self.cache = cache  # [n_blocks, 2, B, Hkv, T_max, Dh]
        self.block_offset = block_offset
        self.pos, self.t = pos, t
        # With no earlier positions, attention over the chunk is plainly causal.
        self.causal = t > 1 and pos == 0
        self.mask: Tensor | None = None
        if t > 1 and pos > 0:
            # New query i sits at pos + i and may see keys 0 ..= pos + i.
            q_pos = torch.arange(pos, pos + t, device=cache.device)[:, None]  # [T, 1]
            self.mask = torch.arange(pos + t, device=cache.device)[None, :] <= q_pos  # [T, L]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kv = self.cache[layer - self.block_offset]  # [2, B, Hkv, T_max, Dh]
        end = self.pos + self.t
        kv[0, :, :, self.pos : end] = k
        kv[1, :, :, self.pos : end] = v
        return attend(q, kv[0, :, :, :end], kv[1, :, :, :end], self.mask, self.causal)


class _BatchView:
    """KV access for one decode step of many sessions (see module docstring)."""

    def __init__(self, sessions: Sequence[InferenceSession], block_offset: int) -> None:
        self.sessions = sessions
        self.block_offset = block_offset
        self.positions = [s.position for s in sessions]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [R, H, 1, Dh]; k, v: [R, Hkv, 1, Dh]; R = rows of all sessions
        out = []
        r = 0
        for s, pos in zip(self.sessions, self.positions, strict=True):
            b = s.cache.batch
            kv = s.cache.tensor[layer - self.block_offset]  # [2, B, Hkv, T_max, Dh]
            kv[0, :, :, pos] = k[r : r + b, :, 0]
            kv[1, :, :, pos] = v[r : r + b, :, 0]
            out.append(attend(q[r : r + b], kv[0, :, :, : pos + 1], kv[1, :, :, : pos + 1]))
            r += b
        return torch.cat(out, dim=0)  # [R, H, 1, Dh]
