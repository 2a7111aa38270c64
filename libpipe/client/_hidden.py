"""The checks of hidden states at the client's edges.

``check_hidden``: what a caller hands the client (a session step, a bulk
forward) is a floating-point ``[B, T, hidden_size]`` tensor, both ``B``
and ``T`` non-zero, and ``B`` the session's batch when there is one.
Refusing them here gives a clear ``InvalidRequestError`` before any server
is asked, rather than an error some hop sends back.

``check_finite_answer``: what a server sends back holds no NaN or inf.
Servers refuse non-finite inputs, so a non-finite answer is that server's
own fault (broken weights, bad hardware): a ``RemoteError``, which makes
it a failed hop that another replica takes over. It runs on every hop's
answer to every step, so it is one reduction: the sum in float64 is
finite exactly when every value is (a NaN or an infinity makes it NaN or
infinite, and finite fp16, bf16 or fp32 values cannot add up past
float64's range, ~1.8e308, in any tensor that fits in memory), where
``isfinite(x).all()`` is two passes and a temporary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InvalidRequestError, RemoteError


def check_hidden(hidden: object, hidden_size: int, batch: int | None = None) -> Tensor:
    """``hidden`` itself once it is a valid ``[batch, t>0, hidden_size]``
    float tensor (any ``B > 0`` when ``batch`` is None)."""
    if not isinstance(hidden, Tensor) or not hidden.dtype.is_floating_point:
        raise InvalidRequestError("hidden states must be a floating-point tensor")
    rows = "B>0" if batch is None else str(batch)
    expected = f"[{rows}, t>0, {hidden_size}]"
    if (
        hidden.dim() != 3
        or hidden.shape[0] == 0
        or hidden.shape[1] == 0
        or (batch is not None and hidden.shape[0] != batch)
        or hidden.shape[2] != hidden_size
    ):
        raise InvalidRequestError(
            f"hidden states must be {expected}, got {list(hidden.shape)}",
            shape=list(hidden.shape),
        )
    return hidden


def check_finite_answer(answer: Tensor, where: str) -> Tensor:
    """``answer`` itself when every value is finite."""
    if not math.isfinite(answer.sum(dtype=torch.float64).item()):
        raise RemoteError(f"{where} answered non-finite hidden states")
    return answer
