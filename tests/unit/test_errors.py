import pickle

import pytest
import torch

from mc2sim.errors import (
    AclnnError,
    AclnnRuntimeError,
    ParamInvalidError,
    ParamNullptrError,
    error_for_code,
)


@pytest.mark.parametrize(
    ("cls", "code", "also"),
    [
        (ParamNullptrError, 161001, None),
        (ParamInvalidError, 161002, ValueError),
        (AclnnRuntimeError, 361001, RuntimeError),
    ],
)
def test_codes_and_bases(cls: type[AclnnError], code: int, also: type[Exception] | None) -> None:
    err = cls("x1", 3, "must be even")
    assert err.code == code
    assert isinstance(err, AclnnError)
    if also is not None:
        assert isinstance(err, also)
    assert str(err) == "x1=3: must be even"
    assert (err.param, err.value, err.rule) == ("x1", 3, "must be even")
    assert error_for_code(code) is cls


def test_unknown_code() -> None:
    with pytest.raises(ParamInvalidError, match="code=7") as info:
        error_for_code(7)
    assert info.value.code == 161002


def test_long_values_are_shortened_in_the_message() -> None:
    err = ParamInvalidError("weight", torch.zeros(1000), "must not be empty")
    assert len(str(err)) < 260
    assert str(err).startswith("weight=tensor(") and "..." in str(err)


@pytest.mark.parametrize("value", [5, "BSH", (1, 2), [3, 4], None, torch.ones(2)])
def test_pickle_keeps_class_code_and_message(value: object) -> None:
    err = ParamInvalidError("p", value, "rule")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ParamInvalidError
    assert back.code == 161002
    assert str(back) == str(err)
    assert back.param == "p" and back.rule == "rule"
    assert repr(back) == f"ParamInvalidError(code=161002, {str(err)!r})"
