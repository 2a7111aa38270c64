"""check_hidden: the one shape check of hidden states handed to the client;
check_finite_answer: every NaN or infinity in a server's answer is caught,
and large finite values (whose sum would overflow their own dtype) are not."""

import pytest
import torch

from libpipe.client._hidden import check_finite_answer, check_hidden
from libpipe.errors import InvalidRequestError, RemoteError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_valid_hidden_is_returned_unchanged() -> None:
    hidden = torch.zeros(2, 3, 8)
    assert check_hidden(hidden, 8) is hidden
    assert check_hidden(hidden, 8, batch=2) is hidden


@pytest.mark.parametrize(
    ("hidden", "batch", "says"),
    [
        ([[[0.0] * 8]], None, "floating-point tensor"),
        (torch.zeros(1, 2, 8, dtype=torch.long), None, "floating-point tensor"),
        (torch.zeros(2, 8), None, "[B>0, t>0, 8]"),
        (torch.zeros(0, 2, 8), None, "got [0, 2, 8]"),
        (torch.zeros(1, 0, 8), None, "got [1, 0, 8]"),
        (torch.zeros(1, 2, 7), None, "got [1, 2, 7]"),
        (torch.zeros(2, 2, 8), 1, "[1, t>0, 8]"),
    ],
)
def test_bad_hidden_is_refused_with_its_shape(hidden: object, batch: int | None, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"hidden states must be") as caught:
        check_hidden(hidden, 8, batch=batch)
    assert says in str(caught.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_largest_finite_values_are_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    for values in (
        torch.full((4, 64, 512), big, dtype=dtype),  # their sum overflows the dtype itself
        torch.full((4, 64, 512), -big, dtype=dtype),
        torch.tensor([[[big, -big, big, torch.finfo(dtype).tiny]]], dtype=dtype),
    ):
        assert check_finite_answer(values, "s") is values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 777, 2047])
def test_any_nan_or_infinity_is_caught(dtype: torch.dtype, bad: float, where: int) -> None:
    values = torch.randn(2, 2, 512).to(dtype)
    values.view(-1)[where] = bad
    with pytest.raises(RemoteError, match="s answered non-finite hidden states"):
        check_finite_answer(values, "s")


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_of_both_signs_together_are_caught(dtype: torch.dtype) -> None:
    # +inf and -inf add up to NaN, and a NaN among large values stays NaN.
    values = torch.full((1, 3, 8), torch.finfo(dtype).max, dtype=dtype)
    values[0, 0, 0], values[0, 2, 7] = float("inf"), float("-inf")
    with pytest.raises(RemoteError):
        check_finite_answer(values, "s")
    values[0, 0, 0], values[0, 2, 7] = float("nan"), torch.finfo(dtype).max
    with pytest.raises(RemoteError):
        check_finite_answer(values, "s")
