"""Choosing the next token from logits: greedy, or sampled with
temperature, top-k and top-p (nucleus).

Sampling draws from a ``torch.Generator`` owned by the generation, so a
seed reproduces a run exactly, failovers included: the generator is only
advanced when a token is chosen, never when a hop is replayed.

Logits holding NaN or infinity (a faulty server, a broken head) are
refused with ``NonFiniteError``: argmax would silently pick the NaN's
index and ``torch.multinomial`` fails with a bare ``RuntimeError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy (the other fields are then unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """A fresh generator: seeded when ``seed`` is set, else from entropy."""
        gen = torch.Generator(device="cpu")
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def choose_next(logits: Tensor, config: SamplingConfig, generator: torch.Generator) -> Tensor:
    """``logits: [B, V]`` -> next token ids ``[B]`` (int64)."""
    check_finite(logits)
    if config.greedy:
        return logits.argmax(dim=-1)
    # Shifted so the best score is 0 before dividing: a tiny temperature then
    # sends the others to -inf, never the best to +inf (softmax would be NaN).
    scores = logits.float().cpu()  # [B, V]
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / config.temperature
    if config.top_k and config.top_k < scores.shape[-1]:
        kth = scores.topk(config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if config.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p;
        # the most likely token always stays.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def check_finite(logits: Tensor) -> None:
    """Raise ``NonFiniteError`` unless every logit is a finite number."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(logits).sum())
    inf = int((~finite).sum()) - nan
    raise NonFiniteError(
        f"the logits hold {nan} NaN and {inf} infinite values (a faulty server or head); "
        "no token can be chosen from them",
        nan=nan,
        inf=inf,
    )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
