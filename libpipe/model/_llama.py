"""Llama-family decoder blocks (Llama 1-3, Mistral, Qwen2), gpt-fast style.

Read top to bottom: norm, rotary, attention, MLP, block, then the client's
head (embeddings, final norm, LM head). Module and parameter names are the
Hugging Face ones, so a checkpoint's tensors load by name with no mapping
beyond the layer index. The numerics follow transformers' eager code on
purpose (norm in fp32, rotate-half rotary, cos/sin in fp32 then cast) so
outputs agree with it to fp32 rounding.

Attention reaches its keys and values through a ``KVView`` (``_span.py``):
none for a full-sequence forward, one session's cache for prefill and
decode, or the caches of many sessions for a batched decode step. The block
does not need to know which. Likewise a LoRA adapter (``_lora.py``) reaches
the projections through a ``BlockAdapter``: none for the base model.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidRequestError
from ._config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 variance loses
        # too much, and transformers does the same (we must match it).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# --- rotary ------------------------------------------------------------------


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies ``[Dh / 2]`` (fp32), with Llama 3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed down by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    old_ctx = s.original_max_position_embeddings
    low_freq_wavelen = old_ctx / s.low_freq_factor
    high_freq_wavelen = old_ctx / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """Computes cos/sin for arbitrary positions (sessions sit at different ones)."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(config, device)  # [Dh/2]

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, T] (int) -> cos, sin: [B, T, Dh]
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, Dh]; cos, sin: [B, T, Dh] -> broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


# --- attention -----------------------------------------------------------------


class KVView(Protocol):
    """Where attention keeps keys/values and how it reads them back."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the new ``k, v: [B, H_kv, T, Dh]`` of ``layer`` and return the
        attention of ``q: [B, H, T, Dh]`` over everything it may see, ``[B, H, T, Dh]``."""
        ...


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """Scaled dot-product attention with grouped kv heads, without copying the cache.

    ``q: [B, H, T, Dh]``, ``k, v: [B, H_kv, L, Dh]``; ``mask`` (True = may
    attend) broadcasts to ``[B, H, T, L]``. For one query position, the g
    query heads of a group become g "positions" of their kv head: the same
    result as repeating the cache g times, with no copy of it (measured
    ~2-3x faster than ``enable_gqa`` at 2k context on CPU)."""
    b, h, t, dh = q.shape
    hkv = k.shape[1]
    if t == 1 and h != hkv and mask is None:
        # Query head i reads kv head i // g (transformers' repeat_kv order).
        y = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, dh), k, v)  # [B, Hkv, g, Dh]
        return y.reshape(b, h, 1, dh)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=h != hkv
    )


class BlockAdapter(Protocol):
    """Per-request low-rank updates of a block's projections (``_lora.py``)."""

    def project(self, name: str, linear: nn.Linear, x: Tensor) -> Tensor:
        """``linear(x)`` plus this adapter's update of projection ``name``."""
        ...


def _project(name: str, linear: nn.Linear, x: Tensor, adapter: BlockAdapter | None) -> Tensor:
    return linear(x) if adapter is None else adapter.project(name, linear, x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, hkv, dh, d = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.hidden_size,
        )
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, dh
        self.q_proj = nn.Linear(d, h * dh, bias=config.q_bias)
        self.k_proj = nn.Linear(d, hkv * dh, bias=config.q_bias)
        self.v_proj = nn.Linear(d, hkv * dh, bias=config.q_bias)
        self.o_proj = nn.Linear(h * dh, d, bias=config.attention_bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: KVView | None,
        layer: int,
        adapter: BlockAdapter | None = None,
    ) -> Tensor:
        bsz, t, _ = x.shape  # x: [B, T, D]
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = _project("q_proj", self.q_proj, x, adapter).view(bsz, t, h, dh).transpose(1, 2)
        k = _project("k_proj", self.k_proj, x, adapter).view(bsz, t, hkv, dh).transpose(1, 2)
        v = _project("v_proj", self.v_proj, x, adapter).view(bsz, t, hkv, dh).transpose(1, 2)
        # q: [B, H, T, Dh]; k, v: [B, Hkv, T, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            y = attend(q, k, v, causal=t > 1)
        else:
            y = kv.attend(layer, q, k, v)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(bsz, t, h * dh)  # [B, T, H*Dh]
        return _project("o_proj", self.o_proj, y, adapter)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x: Tensor, adapter: BlockAdapter | None = None) -> Tensor:
        gate = F.silu(_project("gate_proj", self.gate_proj, x, adapter))
        up = _project("up_proj", self.up_proj, x, adapter)
        return _project("down_proj", self.down_proj, gate * up, adapter)


class Block(nn.Module):
    """One decoder layer; ``layer`` is its index within the owning span."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: KVView | None = None,
        adapter: BlockAdapter | None = None,
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, self.layer, adapter)
        return h + self.mlp(self.post_attention_layernorm(h), adapter)


# Short name of each linear projection of a block -> its path inside the
# block (the Hugging Face names).
PROJECTION_PATHS: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each linear projection of one block, by short name."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }


def block_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of one block, by its name inside the block (HF names)."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    shapes |= {f"{PROJECTION_PATHS[n]}.weight": s for n, s in projection_shapes(config).items()}
    if config.q_bias:
        shapes |= {
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
        }
    if config.attention_bias:
        shapes["self_attn.o_proj.bias"] = (d,)
    if config.mlp_bias:
        shapes |= {"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)}
    return shapes


def block_weight_bytes(config: ModelConfig, element_size: int) -> int:
    """One block's weights in bytes at ``element_size`` bytes per value: what a
    server sizes its span by (s_m in server/_rebalance.py)."""
    return element_size * sum(math.prod(shape) for shape in block_tensor_shapes(config).values())


def head_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The client's tensors by checkpoint name (no ``lm_head`` when tied)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


class ClientHead(nn.Module):
    """What a client holds: token embeddings, final norm and LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: Tensor) -> Tensor:
        # input_ids: [B, T] -> [B, T, D]
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype != torch.long
        ):
            raise InvalidRequestError("input_ids must be an int64 tensor of shape [B, T]")
        if (
            input_ids.numel()
            and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size
        ):
            raise InvalidRequestError(f"token ids must be in [0, {self.config.vocab_size})")
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        # hidden: [B, T, D] (output of the last block) -> [B, T, V]
        if (
            not isinstance(hidden, Tensor)
            or hidden.dim() != 3
            or hidden.shape[2] != self.config.hidden_size
        ):
            raise InvalidRequestError(f"hidden states must be [B, T, {self.config.hidden_size}]")
        return self.lm_head(self.norm(hidden.to(self.dtype)))
