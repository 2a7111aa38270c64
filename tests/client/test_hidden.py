"""check_hidden: the one shape check of hidden states handed to the client."""

import pytest
import torch

from libpipe.client._hidden import check_hidden
from libpipe.errors import InvalidRequestError


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
