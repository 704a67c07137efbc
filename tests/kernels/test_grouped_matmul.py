"""Tests of grouped_matmul against a per-row float64 numpy oracle."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels.grouped_matmul import grouped_matmul

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def oracle(x: torch.Tensor, weight: torch.Tensor, counts: list[int], trans: bool) -> np.ndarray:
    """Row r uses the weight of the expert whose cumulative range holds r (float64 einsum)."""
    w = weight.to(torch.float64).numpy()
    if trans:
        w = w.transpose(0, 2, 1)
    expert_of_row = np.searchsorted(np.cumsum(counts), np.arange(x.shape[0]), side="right")
    per_row = w[expert_of_row]  # (A, H, N)
    return np.asarray(np.einsum("ah,ahn->an", x.to(torch.float64).numpy(), per_row))


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close_to(out: torch.Tensor, expected: np.ndarray) -> None:
    """Output rounding (float16/bfloat16) or float32 accumulation error (float32)."""
    ref = torch.from_numpy(expected)
    if out.dtype == F32:
        rtol, atol = 1e-5, 1e-5 * float(ref.abs().max())
    else:
        rtol = {F16: 2.0**-10, BF16: 2.0**-7}[out.dtype]
        atol = rtol * 1e-1
    torch.testing.assert_close(out.to(torch.float64), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize(
    "counts", [[5, 0, 7, 4], [0, 0, 16, 0], [16], [3, 3, 3, 3, 4]], ids=["mixed", "one", "e1", "e5"]
)
def test_against_oracle(dtype: torch.dtype, trans: bool, counts: list[int]) -> None:
    h, n, e = 24, 10, len(counts)
    x = rand((sum(counts), h), dtype, 1)
    weight = rand((e, n, h) if trans else (e, h, n), dtype, 2)
    out = grouped_matmul(x, weight, counts, trans_weight=trans)
    assert out.dtype == dtype and out.shape == (sum(counts), n)
    assert_close_to(out, oracle(x, weight, counts, trans))


@pytest.mark.parametrize("tensor_dtype", [torch.int32, torch.int64])
def test_group_list_as_tensor_and_strided_x(tensor_dtype: torch.dtype) -> None:
    counts = [2, 0, 6]
    x = rand((32, 8), BF16, 3).t()  # (8, 32), not contiguous
    weight = rand((3, 32, 5), BF16, 4)
    out = grouped_matmul(x, weight, torch.tensor(counts, dtype=tensor_dtype))
    assert_close_to(out, oracle(x, weight, counts, False))


def test_no_rows() -> None:
    out = grouped_matmul(torch.zeros(0, 4, dtype=F16), torch.ones(2, 4, 3, dtype=F16), [0, 0])
    assert out.shape == (0, 3) and out.dtype == F16


def test_counts_are_not_cumulative() -> None:
    """[2, 2] means two rows each; read as cumulative offsets it would be invalid."""
    x = torch.ones(4, 1, dtype=F32)
    weight = torch.tensor([[[1.0]], [[10.0]]])
    assert grouped_matmul(x, weight, [2, 2]).flatten().tolist() == [1.0, 1.0, 10.0, 10.0]


# --- errors: one per documented constraint ---------------------------------------------------

X = torch.zeros(6, 8, dtype=BF16)
W = torch.zeros(2, 8, 4, dtype=BF16)


@pytest.mark.parametrize("missing", ["x", "weight", "group_list"])
def test_required_inputs(missing: str) -> None:
    args: dict[str, object] = {"x": X, "weight": W, "group_list": [3, 3]}
    args[missing] = None
    with pytest.raises(ParamNullptrError) as info:
        grouped_matmul(args["x"], args["weight"], args["group_list"])  # type: ignore[arg-type]
    assert info.value.code == 161001
    assert info.value.param == missing


@pytest.mark.parametrize(
    ("x", "weight", "group_list", "kwargs", "param"),
    [
        (X.to(torch.int8), W, [3, 3], {}, "x.dtype"),
        (X, W.to(F16), [3, 3], {}, "weight.dtype"),
        (X.reshape(1, 6, 8), W, [3, 3], {}, "x.shape"),
        (X, W[0], [3, 3], {}, "weight.shape"),
        (X, W, [3, 3], {"trans_weight": 1}, "trans_weight"),
        (X, torch.zeros(2, 7, 4, dtype=BF16), [3, 3], {}, "weight.shape"),
        (X, W, [3, 3], {"trans_weight": True}, "weight.shape"),
        (
            torch.zeros(0, 65536, dtype=BF16),
            torch.zeros(1, 65536, 1, dtype=BF16),
            [0],
            {},
            "x.shape",
        ),
        (
            torch.zeros(0, 1, dtype=BF16),
            torch.zeros(1, 1, 65536, dtype=BF16),
            [0],
            {},
            "weight.shape",
        ),
        (X, torch.zeros(0, 8, 4, dtype=BF16), [], {}, "weight.shape"),
        (X, W, [6], {}, "group_list"),
        (X, W, [7, -1], {}, "group_list"),
        (X, W, [3, 2], {}, "group_list"),
        (X, W, [3, 6], {}, "group_list"),
        (X, W, torch.tensor([3.0, 3.0]), {}, "group_list.dtype"),
        (X, W, torch.tensor([[3, 3]]), {}, "group_list.shape"),
        (X, W, [3.0, 3.0], {}, "group_list"),
        (X, W, [True, 5], {}, "group_list"),
    ],
)
def test_invalid(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_list: object,
    kwargs: dict[str, object],
    param: str,
) -> None:
    with pytest.raises(ParamInvalidError) as info:
        grouped_matmul(x, weight, group_list, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == 161002
    assert info.value.param == param


@pytest.mark.parametrize("trans", [False, True])
def test_weight_converted_in_column_panels(monkeypatch: pytest.MonkeyPatch, trans: bool) -> None:
    """Output columns in panels of PANEL, the last one narrower (10 = 4 + 4 + 2)."""
    gmm_module = importlib.import_module("mc2sim.kernels.grouped_matmul")
    monkeypatch.setattr(gmm_module, "PANEL", 4)
    counts = [3, 0, 5]
    x = rand((8, 6), F32, 5)
    weight = rand((3, 10, 6) if trans else (3, 6, 10), F32, 6)
    out = grouped_matmul(x, weight, counts, trans_weight=trans)
    assert_close_to(out, oracle(x, weight, counts, trans))


@pytest.mark.parametrize("trans", [False, True])
def test_panel_products_in_row_blocks(monkeypatch: pytest.MonkeyPatch, trans: bool) -> None:
    """A panel's product made a few rows at a time, the last block shorter, same bits.

    7 = 3 + 3 + 1 rows of a 4-column panel (48 bytes of float32 a block; H = 2 rows fewer).
    """
    gmm_module = importlib.import_module("mc2sim.kernels.grouped_matmul")
    counts = [7, 0, 2]
    x = rand((9, 2), BF16, 7)
    weight = rand((3, 10, 2) if trans else (3, 2, 10), BF16, 8)
    monkeypatch.setattr(gmm_module, "PANEL", 4)
    whole = grouped_matmul(x, weight, counts, trans_weight=trans)
    monkeypatch.setattr(gmm_module, "ROW_BLOCK_BYTES", 3 * 4 * 4)
    out = grouped_matmul(x, weight, counts, trans_weight=trans)
    assert out.dtype == BF16 and out.shape == (9, 10)
    assert torch.equal(out, whole)
    assert_close_to(out, oracle(x, weight, counts, trans))
