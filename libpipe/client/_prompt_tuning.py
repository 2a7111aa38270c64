"""Prompt tuning through frozen blocks: the only trainable tensors are prompts.

Two kinds, as in PETALS: a soft prompt (Lester et al., 2021) of ``prefix``
embeddings put before every sequence's token embeddings, and, with
``deep=True``, deep prompts (P-tuning v2, Liu et al., 2021): for every
block one ``[prefix, hidden]`` tensor added to the first ``prefix``
positions before the block runs, sent with each request (proto/RPC.md).
The blocks (remote, or a local ``BlockSpan`` for comparison) and the head
stay frozen; gradients reach the prompts through the servers' ``backward``.

The soft prompt starts as the embeddings of random vocabulary tokens
(Lester et al. found that better than random vectors: it starts on the
scale the blocks expect); deep prompts start at zero, so an untrained
helper computes exactly the model with a prefix.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidRequestError
from ..model import ClientHead


class PromptedBlocks(Protocol):
    """Blocks that take deep prompts: ``RemoteBlocks`` or a ``BlockSpan``."""

    start: int
    end: int

    def __call__(self, hidden: Tensor, *, prompts: Tensor | None = None) -> Tensor: ...


class PromptTuning(nn.Module):
    """Trainable ``prompt: [prefix, H]`` (and ``deep_prompts: [L, prefix, H]``)
    around frozen ``blocks`` covering the whole model and a frozen ``head``."""

    # Label of a position that is not to be learned (PyTorch's and HF's value).
    IGNORE_INDEX = -100

    def __init__(
        self,
        blocks: PromptedBlocks,
        head: ClientHead,
        *,
        prefix: int,
        deep: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        config = head.config
        if (blocks.start, blocks.end) != (0, config.num_hidden_layers):
            raise InvalidRequestError(
                f"prompt tuning needs every block [0, {config.num_hidden_layers}), "
                f"got [{blocks.start}, {blocks.end})"
            )
        if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix <= 0:
            raise InvalidRequestError(f"prefix must be a positive int, got {prefix!r}")
        self.blocks = blocks
        self.head = head
        self.prefix = prefix
        with torch.no_grad():
            ids = torch.randint(0, config.vocab_size, (prefix,), generator=generator)
            start = head.embed_tokens.weight[ids.to(head.device)].clone()  # [P, H]
        self.prompt = nn.Parameter(start)
        self.deep_prompts: nn.Parameter | None = None
        if deep:
            self.deep_prompts = nn.Parameter(
                torch.zeros(
                    config.num_hidden_layers,
                    prefix,
                    config.hidden_size,
                    dtype=head.dtype,
                    device=head.device,
                )
            )

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` for the positions of ``input_ids: [B, T]``."""
        embeds = self.head.embed(input_ids)  # [B, T, H]
        b = embeds.shape[0]
        x = torch.cat([self.prompt.expand(b, -1, -1), embeds], dim=1)  # [B, P + T, H]
        deep = None
        if self.deep_prompts is not None:
            deep = self.deep_prompts[:, None].expand(-1, b, -1, -1)  # [L, B, P, H]
        out = self.blocks(x, prompts=deep)
        return self.head.logits(out[:, self.prefix :])

    def loss(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy: ``labels[:, t]`` is what position ``t - 1``
        should predict (``IGNORE_INDEX`` where nothing is to be learned);
        defaults to ``input_ids`` (language modelling)."""
        labels = input_ids if labels is None else labels
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise InvalidRequestError("labels must be a tensor shaped like input_ids")
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            # One position predicts nothing: the mean over no targets is NaN.
            raise InvalidRequestError(
                f"the loss needs input_ids [B, T >= 2], got {list(input_ids.shape)}"
            )
        logits = self(input_ids)[:, :-1]  # [B, T - 1, V]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1).to(logits.device),
            ignore_index=self.IGNORE_INDEX,
        )
