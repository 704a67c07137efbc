"""Precision standards on hand-made arrays whose verdicts are counted by hand."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
import torch

from mc2sim.compare import (
    GoldenMismatchError,
    Mismatch,
    Standard,
    Verdict,
    check,
    raise_if_failed,
)
from mc2sim.errors import ParamInvalidError

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------- allclose


def test_allclose_counts_by_hand() -> None:
    golden = np.array([0.0, 1.0, 100.0, -2.0])
    # bounds 0.005 + 0.005 * |g|: 0.005, 0.01, 0.505, 0.015
    actual = np.array([0.0049, 1.0101, 100.504, -2.016])
    v = check(actual, golden)
    assert v.standard is Standard.ALLCLOSE
    assert v.dtype == "float64"
    assert (v.numel, v.mismatches, v.mismatch_fraction, v.passed) == (4, 2, 0.5, False)
    assert [w.index for w in v.worst] == [(3,), (1,)]  # errors 0.016, then 0.0101
    assert v.worst[0] == Mismatch(index=(3,), actual=-2.016, golden=-2.0, error=v.worst[0].error)
    assert v.worst[0].error == pytest.approx(0.016)
    assert v.max_abs_error == pytest.approx(0.504)
    assert v.max_rel_error == pytest.approx(0.0101)  # golden 0 left out
    assert v.allowed_fraction == 0.0
    assert v.mean_error is None and v.mean_limit is None


def test_allclose_passes_just_inside_and_fails_just_outside() -> None:
    golden = np.array([[0.0, 1.0], [100.0, -2.0]])
    bound = 0.005 + 0.005 * np.abs(golden)
    inside = check(golden + bound * (1 - 1e-9), golden)
    assert inside.passed and inside.mismatches == 0 and inside.worst == ()
    outside = check(golden - bound * (1 + 1e-9), golden)
    assert not outside.passed and outside.mismatches == 4
    assert {w.index for w in outside.worst} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_allclose_on_half_precision_tensors() -> None:
    golden = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4
    actual = golden.to(torch.bfloat16)  # multiples of 1/4 below 3: exact in bfloat16
    actual[2, 1] = 5.0
    v = check(actual, golden, rank=3)
    assert (v.dtype, v.mismatches, v.rank) == ("bfloat16", 1, 3)
    assert v.worst == (Mismatch(index=(2, 1), actual=5.0, golden=2.25, error=2.75),)


# ---------------------------------------------------------------- double thousandths


@pytest.mark.parametrize(
    ("dtype", "p", "numel"),
    [("float16", 1e-3, 1000), (torch.bfloat16, 4e-3, 1000), (np.float32, 1e-4, 10000)],
)
def test_double_thousandths_thresholds(dtype: Any, p: float, numel: int) -> None:
    golden = np.linspace(-3.0, 5.0, numel)
    golden[golden == 0] = 1.0
    allowed = round(p * numel)  # elements that may exceed relative error p

    def verdict(bad: int, over: float) -> Verdict:
        actual = golden * (1 + p * (1 - 1e-6))  # every element just under p
        actual[:bad] = golden[:bad] * (1 + p * over)
        return check(actual, golden, "double_thousandths", dtype=dtype)

    assert verdict(allowed + 5, 1 - 1e-6).mismatches == 0  # err == p * (1 - 1e-6): fine
    at_limit = verdict(allowed, 1 + 1e-6)
    assert at_limit.passed and at_limit.mismatches == allowed
    assert at_limit.allowed_fraction == p
    over_limit = verdict(allowed + 1, 1 + 1e-6)
    assert not over_limit.passed and over_limit.mismatches == allowed + 1
    assert over_limit.mismatch_fraction == pytest.approx((allowed + 1) / numel)
    assert over_limit.worst[0].error == pytest.approx(p * (1 + 1e-6))


def test_double_thousandths_dtype_comes_from_actual() -> None:
    golden = torch.ones(1000)
    actual = golden.to(torch.bfloat16)
    actual[:3] = 1.0078125  # relative error 2^-7 > 4e-3
    v = check(actual, golden, Standard.DOUBLE_THOUSANDTHS)
    assert (v.dtype, v.allowed_fraction, v.mismatches, v.passed) == ("bfloat16", 4e-3, 3, True)
    v16 = check(actual, golden, "double_thousandths", dtype=torch.float16)
    assert (v16.dtype, v16.passed) == ("float16", False)


def test_double_thousandths_uses_absolute_error_where_golden_is_zero() -> None:
    golden = np.zeros(4)
    actual = np.array([0.0, 5e-4, -9.99e-4, 2e-3])
    v = check(actual, golden, "double_thousandths", dtype="fp16")
    assert v.dtype == "float16"
    assert v.mismatches == 1
    assert v.worst == (Mismatch(index=(3,), actual=2e-3, golden=0.0, error=2e-3),)
    assert v.max_rel_error == 0.0  # no element with a non-zero golden


# ---------------------------------------------------------------- error balance


@pytest.mark.parametrize(
    ("dtype", "element", "element_large_k"),
    [("float16", 2.0**-8, 2.0**-7), ("bfloat16", 2.0**-7, 2.0**-6)],
)
def test_error_balance_element_bound_and_k(
    dtype: str, element: float, element_large_k: float
) -> None:
    golden = np.full(1000, 10.0)
    golden[0] = 0.25  # |g| < 1: the error is absolute
    for bound, k in ((element, None), (element, 2047), (element_large_k, 2048)):
        for index in (0, 7):
            scale = max(abs(golden[index]), 1.0)
            actual = golden.copy()
            actual[index] += bound * scale * (1 - 1e-9)
            assert check(actual, golden, "error_balance", dtype=dtype, k=k).passed
            actual[index] = golden[index] + bound * scale * (1 + 1e-9)
            v = check(actual, golden, "error_balance", dtype=dtype, k=k)
            assert not v.passed and v.mismatches == 1
            assert v.worst[0].index == (index,)
            assert v.worst[0].error == pytest.approx(bound)


@pytest.mark.parametrize(("dtype", "mean_limit"), [("float16", 2.0**-10), ("bfloat16", 2.0**-7)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_error_balance_mean_bound(dtype: str, mean_limit: float, sign: float) -> None:
    golden = np.concatenate([np.full(50, 4.0), np.full(50, -0.5)])
    scale = np.maximum(np.abs(golden), 1.0)
    step = sign * scale * mean_limit
    # k >= 2048 loosens the element bound above the mean bound (they are equal for bfloat16)
    under = check(golden + step * (1 - 1e-9), golden, "error_balance", dtype=dtype, k=4096)
    assert under.passed and under.mismatches == 0
    assert under.mean_error == pytest.approx(sign * mean_limit)
    assert under.mean_limit == mean_limit
    over = check(golden + step * (1 + 1e-9), golden, "error_balance", dtype=dtype, k=4096)
    assert not over.passed and over.mismatches == 0  # only the mean is out of bounds
    assert "mean error" in over.summary()


def test_error_balance_errors_of_both_signs_cancel_in_the_mean() -> None:
    golden = np.full(4, 2.0)
    actual = golden + np.array([3e-3, -3e-3, 3e-3, -3e-3]) * 2  # 3e-3 relative < 2^-8
    v = check(actual, golden, "error_balance", dtype=torch.float16)
    assert v.passed and v.mean_error == pytest.approx(0.0)


# ---------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("standard", list(Standard))
def test_nan_and_inf(standard: Standard) -> None:
    golden = np.array([1.0, NAN, NAN, INF, INF, -INF, 1.0, 2.0, INF])
    actual = np.array([NAN, 1.0, NAN, INF, -INF, -INF, INF, 2.0, 1.0])
    # mismatches: NaN vs 1, 1 vs NaN, -inf vs inf, inf vs 1, 1 vs inf; both NaN or equal inf match
    v = check(actual, golden, standard, dtype="float16")
    assert v.mismatches == 5
    assert not v.passed
    assert [w.index for w in v.worst] == [(0,), (1,), (4,), (6,), (8,)]
    assert all(w.error == INF for w in v.worst)
    assert v.max_abs_error == 0.0  # the finite pairs agree exactly
    if standard is Standard.ERROR_BALANCE:
        assert v.mean_error == 0.0


def test_matching_specials_pass() -> None:
    golden = np.array([NAN, INF, -INF, 1.0])
    v = check(golden.copy(), golden)
    assert v.passed and v.mismatches == 0


def test_overflowing_difference_is_a_mismatch() -> None:
    v = check(np.array([1e308]), np.array([-1e308]))
    assert v.mismatches == 1 and v.worst[0].error == INF


# ---------------------------------------------------------------- worst elements, summary


def test_worst_keeps_five_largest_with_original_indices() -> None:
    golden = np.zeros((3, 4))
    actual = golden.copy()
    errors = {(0, 1): 1.0, (0, 3): 6.0, (1, 0): 3.0, (1, 2): 2.0, (2, 1): 5.0, (2, 3): 4.0}
    for index, err in errors.items():
        actual[index] = err
    v = check(torch.from_numpy(actual), torch.from_numpy(golden), rank=2)
    assert v.mismatches == 6
    assert [w.index for w in v.worst] == [(0, 3), (2, 1), (2, 3), (1, 0), (1, 2)]
    assert [w.error for w in v.worst] == [6.0, 5.0, 4.0, 3.0, 2.0]
    text = v.summary()
    assert "rank 2" in text and "allclose" in text and "FAIL" in text
    assert "6/12" in text and "50.0000%" in text and "(0, 3)" in text


def test_ties_keep_the_lowest_index_first() -> None:
    v = check(np.ones(8), np.zeros(8))
    assert [w.index[0] for w in v.worst] == [0, 1, 2, 3, 4]


def test_summary_of_a_pass() -> None:
    v = check(np.ones((2, 2)), np.ones((2, 2)))
    assert v.summary().startswith("allclose (float64) PASS: 0/4")
    assert "max abs error" in v.summary()


def test_empty_tensors_pass() -> None:
    v = check(torch.empty(0, 3), torch.empty(0, 3), "double_thousandths")
    assert (v.passed, v.numel, v.mismatches, v.mismatch_fraction) == (True, 0, 0, 0.0)


def test_inputs_are_left_alone_and_any_real_dtype_works() -> None:
    actual = torch.tensor([1, 2, 3], dtype=torch.int8)
    golden = torch.tensor([1.0, 2.0, 3.05], requires_grad=True)
    v = check(actual, golden)
    assert (v.dtype, v.mismatches) == ("int8", 1)
    assert actual.dtype == torch.int8 and golden.requires_grad


# ---------------------------------------------------------------- errors


def test_shape_mismatch() -> None:
    with pytest.raises(ParamInvalidError, match=r"\(2, 3\).*\(3, 2\)") as info:
        check(torch.zeros(3, 2), torch.zeros(2, 3))
    assert info.value.code == 161002
    assert info.value.param == "golden.shape"


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda: check(np.ones(2), np.ones(2), "close_enough"), "standard"),
        (lambda: check(np.ones(2), np.ones(2), "double_thousandths"), "dtype"),
        (lambda: check(np.ones(2), np.ones(2), "error_balance", dtype="float32"), "dtype"),
        (lambda: check(np.ones(2), np.ones(2), dtype=cast(Any, object())), "dtype"),
        (lambda: check(cast(Any, [1.0]), np.ones(1)), "actual"),
        (lambda: check(np.ones(1), np.array(["x"])), "golden.dtype"),
        (lambda: check(torch.ones(1, dtype=torch.complex64), torch.ones(1)), "actual.dtype"),
        (lambda: check(np.ones(1), np.ones(1), "error_balance", dtype="fp16", k=0), "k"),
        (lambda: check(np.ones(1), np.ones(1), rank=-1), "rank"),
    ],
)
def test_parameter_errors(call: Callable[[], object], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        call()
    assert info.value.code == 161002
    assert info.value.param == param


# ---------------------------------------------------------------- raising and pickling


def verdicts_with_failures(ranks_failing: set[int], size: int = 4) -> list[Verdict]:
    out = []
    for r in range(size):
        actual = np.zeros((2, 3))
        if r in ranks_failing:
            actual[1, r % 3] = 0.5
        out.append(check(actual, np.zeros((2, 3)), rank=r))
    return out


def test_raise_if_failed_names_the_lowest_failing_rank() -> None:
    verdicts = verdicts_with_failures({3, 1})
    raise_if_failed(verdicts_with_failures(set()))  # all passed: no error
    with pytest.raises(GoldenMismatchError) as info:
        raise_if_failed(list(reversed(verdicts)))
    message = str(info.value)
    assert message.startswith("golden mismatch on ranks 1, 3; first: rank 1: allclose")
    assert "(1, 1)" in message
    assert [v.rank for v in info.value.verdicts] == [1, 3]


def test_verdicts_and_errors_pickle() -> None:
    verdicts = verdicts_with_failures({2})
    assert pickle.loads(pickle.dumps(verdicts)) == verdicts
    error = GoldenMismatchError([verdicts[2]])
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is GoldenMismatchError
    assert str(again) == str(error)
    assert again.verdicts == error.verdicts


def test_error_needs_a_verdict() -> None:
    with pytest.raises(ParamInvalidError):
        GoldenMismatchError([])
