import pickle

import pytest

from libpipe import errors


def test_every_kind_maps_back_to_its_class():
    for kind, cls in errors.error_kinds().items():
        err = errors.error_from_remote(kind, "boom", {"x": 1})
        assert type(err) is cls
        assert err.remote and err.message == "boom" and err.details == {"x": 1}


def test_unknown_kind_becomes_remote_error_that_names_it():
    err = errors.error_from_remote("martian", "no such thing")
    assert isinstance(err, errors.RemoteError)
    assert "martian" in str(err)
    assert err.details["remote_kind"] == "martian"


def test_kinds_are_unique():
    with pytest.raises(TypeError, match="already taken"):

        class Clash(errors.LibpipeError):
            kind = "cache_full"


def test_details_survive_pickling():
    err = errors.CacheFullError("no room", requested=10, free=3)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.CacheFullError
    assert back.details == {"requested": 10, "free": 3}


def test_input_errors_are_value_errors():
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.InvalidRequestError, ValueError)
    assert issubclass(errors.DeadlineExceededError, TimeoutError)


def test_sole_error_unwraps_nested_groups_of_one_only():
    inner = errors.ConnectionBrokenError("gone")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
    assert errors.sole_error(nested) is inner
    two = ExceptionGroup("two", [ValueError("a"), ValueError("b")])
    assert errors.sole_error(two) is two
    plain = KeyError("k")
    assert errors.sole_error(plain) is plain


def test_non_finite_error_carries_its_counts_across_the_wire():
    err = errors.error_from_remote("non_finite", "NaN logits", {"nan": 2, "inf": 0})
    assert type(err) is errors.NonFiniteError
    assert err.details == {"nan": 2, "inf": 0}
