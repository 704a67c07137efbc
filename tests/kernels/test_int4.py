"""Tests of int4 packing (ConvertWeightToINT4Pack) and the FRACTAL_NZ transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels.int4 import (
    Int4PackDtype,
    WeightFormat,
    convert_weight_to_int4pack,
    int4_storage_shape,
    nd_to_nz,
    nz_to_nd,
    unpack_int4,
)

HYPOTHESIS = settings(max_examples=40, deadline=None)


# --- independent oracles: explicit Python loops on small shapes -----------------------------


def pack_oracle(values: np.ndarray, per: int) -> np.ndarray:
    """Pack the last dim with plain Python integer arithmetic, one word at a time."""
    rows = values.reshape(-1, values.shape[-1])
    words = []
    for row in rows:
        out_row = []
        for j in range(len(row) // per):
            word = 0
            for i in range(per):
                word |= (int(row[per * j + i]) & 0xF) << (4 * i)
            if per == 8 and word >= 2**31:
                word -= 2**32
            out_row.append(word)
        words.append(out_row)
    dtype = np.int32 if per == 8 else np.uint8
    return np.array(words, dtype=dtype).reshape(*values.shape[:-1], values.shape[-1] // per)


def nz_oracle(matrix: np.ndarray, c0: int) -> np.ndarray:
    """Place element (r, c) at [c // c0, r // 16, r % 16, c % c0], zeros elsewhere."""
    rows, cols = matrix.shape
    out = np.zeros((-(-cols // c0), -(-rows // 16), 16, c0), dtype=matrix.dtype)
    for r in range(rows):
        for c in range(cols):
            out[c // c0, r // 16, r % 16, c % c0] = matrix[r, c]
    return out


def random_int4(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, dtype=torch.int32, generator=gen)


# --- known bit patterns ---------------------------------------------------------------------


def test_bit_order_int32_low_nibble_first() -> None:
    w = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int32)
    packed = convert_weight_to_int4pack(w)
    assert packed.dtype == torch.int32
    assert packed.shape == (1, 1)
    assert int(packed) == 0x87654321 - 2**32
    minus_one = convert_weight_to_int4pack(torch.full((1, 8), -1, dtype=torch.int32))
    assert int(minus_one) == -1


def test_bit_order_int4_bytes() -> None:
    w = torch.tensor([[1, -1, -8, 7]], dtype=torch.int32)
    packed = convert_weight_to_int4pack(w, out_dtype="int4")
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xF1, 0x78]]


# --- against the oracles -----------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["int32", "int4"])
@pytest.mark.parametrize("shape", [(3, 16), (17, 72), (2, 5, 24)])
def test_pack_nd_matches_loop_oracle(out_dtype: str, shape: tuple[int, ...]) -> None:
    w = random_int4(shape)
    per = 8 if out_dtype == "int32" else 2
    got = convert_weight_to_int4pack(w, out_dtype=out_dtype)
    assert got.shape == (*shape[:-1], shape[-1] // per)
    np.testing.assert_array_equal(got.numpy(), pack_oracle(w.numpy(), per))


@pytest.mark.parametrize("out_dtype", ["int32", "int4"])
def test_pack_nz_matches_loop_oracle(out_dtype: str) -> None:
    w = random_int4((17, 72), seed=1)
    per = 8 if out_dtype == "int32" else 2
    got = convert_weight_to_int4pack(w, out_dtype=out_dtype, out_format="FRACTAL_NZ")
    expected = nz_oracle(pack_oracle(w.numpy(), per), 64 // per)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_pack_3d_nz_keeps_leading_dim() -> None:
    w = random_int4((3, 20, 130 - 2), seed=2)  # d1 = 128
    got = convert_weight_to_int4pack(w, out_dtype=Int4PackDtype.INT32, out_format="FRACTAL_NZ")
    assert got.shape == (3, 2, 2, 16, 8)
    for b in range(3):
        expected = nz_oracle(pack_oracle(w[b].numpy(), 8), 8)
        np.testing.assert_array_equal(got[b].numpy(), expected)


@pytest.mark.parametrize(
    ("out_dtype", "out_format", "storage"),
    [
        ("int4", "ND", (17, 36)),
        ("int4", "FRACTAL_NZ", (2, 2, 16, 32)),
        ("int32", "ND", (17, 9)),
        ("int32", "FRACTAL_NZ", (2, 2, 16, 8)),
    ],
)
def test_seed_000_storage_shapes(out_dtype: str, out_format: str, storage: tuple[int, ...]) -> None:
    """Seed 000's table for its (n, k) = (17, 72) weight: (ceil(d1/64), ceil(d0/16), 16, ...)."""
    w = random_int4((17, 72), seed=3)
    got = convert_weight_to_int4pack(w, out_dtype=out_dtype, out_format=out_format)
    assert tuple(got.shape) == storage
    assert int4_storage_shape((17, 72), out_dtype, out_format) == storage
    assert torch.equal(
        unpack_int4(got, (17, 72), packed_dtype=out_dtype, packed_format=out_format), w
    )


def test_nz_padding_is_zero() -> None:
    w = torch.full((17, 72), -1, dtype=torch.int32)
    got = convert_weight_to_int4pack(w, out_dtype="int4", out_format="FRACTAL_NZ")
    assert int((got != 0).sum()) == 17 * 72 // 2
    assert int(got[0, 1, 1:].sum()) == 0  # rows 17..31 of the second row block
    assert int(got[1, :, :, 4:].sum()) == 0  # columns 72..127 (bytes 36..63)


def test_transposed_view_packs_the_matrix_it_shows() -> None:
    w = random_int4((72, 17), seed=4)
    got = convert_weight_to_int4pack(w.t(), out_dtype="int4", out_format="FRACTAL_NZ")
    ref = convert_weight_to_int4pack(w.t().contiguous(), out_dtype="int4", out_format="FRACTAL_NZ")
    assert torch.equal(got, ref)


def test_enums_and_strings_are_accepted() -> None:
    w = random_int4((4, 16), seed=5)
    a = convert_weight_to_int4pack(w, out_dtype=Int4PackDtype.INT4, out_format=WeightFormat.ND)
    b = convert_weight_to_int4pack(w, out_dtype="int4", out_format="ND")
    assert torch.equal(a, b)
    assert str(Int4PackDtype.INT32) == "int32"
    assert WeightFormat("FRACTAL_NZ") is WeightFormat.FRACTAL_NZ


# --- property tests --------------------------------------------------------------------------


@HYPOTHESIS
@given(
    batch=st.sampled_from([(), (1,), (3,)]),
    d0=st.integers(1, 40),
    groups=st.integers(1, 20),
    packed_dtype=st.sampled_from(list(Int4PackDtype)),
    packed_format=st.sampled_from(list(WeightFormat)),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(
    batch: tuple[int, ...],
    d0: int,
    groups: int,
    packed_dtype: Int4PackDtype,
    packed_format: WeightFormat,
    seed: int,
) -> None:
    shape = (*batch, d0, groups * packed_dtype.per_element)
    w = random_int4(shape, seed)
    packed = convert_weight_to_int4pack(w, out_dtype=packed_dtype, out_format=packed_format)
    assert tuple(packed.shape) == int4_storage_shape(shape, packed_dtype, packed_format)
    assert packed.dtype == packed_dtype.torch_dtype
    back = unpack_int4(packed, shape, packed_dtype=packed_dtype, packed_format=packed_format)
    assert back.dtype == torch.int32
    assert torch.equal(back, w)


@HYPOTHESIS
@given(
    batch=st.sampled_from([(), (2,), (2, 3)]),
    rows=st.integers(1, 50),
    cols=st.integers(1, 70),
    c0=st.sampled_from([1, 8, 16, 32]),
    dtype=st.sampled_from([torch.int8, torch.int32, torch.float32, torch.bfloat16]),
)
def test_nd_nz_round_trip(
    batch: tuple[int, ...], rows: int, cols: int, c0: int, dtype: torch.dtype
) -> None:
    x = (torch.arange(int(np.prod((*batch, rows, cols)))) % 97 + 1).reshape(*batch, rows, cols)
    x = x.to(dtype)
    nz = nd_to_nz(x, c0)
    assert nz.shape == (*batch, -(-cols // c0), -(-rows // 16), 16, c0)
    assert nz.dtype == dtype
    assert int((nz != 0).sum()) == x.numel()  # every value lands once, the rest is padding
    assert torch.equal(nz_to_nd(nz, (rows, cols)), x)


def test_nd_to_nz_matches_oracle_and_custom_r0() -> None:
    x = torch.arange(1, 5 * 11 + 1, dtype=torch.int32).reshape(5, 11)
    np.testing.assert_array_equal(nd_to_nz(x, 4).numpy(), nz_oracle(x.numpy(), 4))
    assert nd_to_nz(x, 4, r0=2).shape == (3, 3, 2, 4)
    assert torch.equal(nz_to_nd(nd_to_nz(x, 4, r0=2), (5, 11)), x)


# --- errors: one per documented constraint ---------------------------------------------------


def test_weight_none() -> None:
    with pytest.raises(ParamNullptrError) as info:
        convert_weight_to_int4pack(None)  # type: ignore[arg-type]
    assert info.value.code == 161001


@pytest.mark.parametrize(
    ("weight", "kwargs", "param"),
    [
        (torch.zeros(2, 8, dtype=torch.int8), {}, "weight.dtype"),
        (torch.zeros(2, 8, dtype=torch.int64), {}, "weight.dtype"),
        (torch.zeros(8, dtype=torch.int32), {}, "weight.shape"),
        (torch.zeros(1, 2, 2, 8, dtype=torch.int32), {}, "weight.shape"),
        (torch.zeros(0, 8, dtype=torch.int32), {}, "weight.shape"),
        (torch.zeros(2, 12, dtype=torch.int32), {}, "weight.shape"),
        (torch.zeros(2, 3, dtype=torch.int32), {"out_dtype": "int4"}, "weight.shape"),
        (torch.full((2, 8), 8, dtype=torch.int32), {}, "weight"),
        (torch.full((2, 8), -9, dtype=torch.int32), {}, "weight"),
        (torch.zeros(2, 8, dtype=torch.int32), {"out_dtype": "int8"}, "out_dtype"),
        (torch.zeros(2, 8, dtype=torch.int32), {"out_format": "NCHW"}, "out_format"),
    ],
)
def test_pack_invalid(weight: torch.Tensor, kwargs: dict[str, str], param: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        convert_weight_to_int4pack(weight, **kwargs)
    assert info.value.code == 161002
    assert info.value.param == param


def test_unpack_errors() -> None:
    packed = convert_weight_to_int4pack(random_int4((4, 16)))
    with pytest.raises(ParamNullptrError) as nul:
        unpack_int4(None, (4, 16))  # type: ignore[arg-type]
    assert nul.value.code == 161001
    with pytest.raises(ParamInvalidError) as dtype:
        unpack_int4(packed, (4, 16), packed_dtype="int4")
    assert dtype.value.param == "packed.dtype"
    with pytest.raises(ParamInvalidError) as shape:
        unpack_int4(packed, (4, 24))
    assert shape.value.param == "packed.shape"
    with pytest.raises(ParamInvalidError) as fmt:
        unpack_int4(packed, (4, 16), packed_format="NZ")
    assert fmt.value.param == "packed_format"


def test_storage_shape_errors() -> None:
    with pytest.raises(ParamInvalidError) as rank:
        int4_storage_shape((8,))
    assert rank.value.code == 161002
    with pytest.raises(ParamInvalidError) as align:
        int4_storage_shape((2, 4), "int32")
    assert align.value.param == "shape"


def test_nz_transform_errors() -> None:
    with pytest.raises(ParamInvalidError) as c0:
        nd_to_nz(torch.zeros(2, 2), 0)
    assert c0.value.param == "c0"
    with pytest.raises(ParamInvalidError) as r0:
        nd_to_nz(torch.zeros(2, 2), 8, r0=0)
    assert r0.value.param == "r0"
    with pytest.raises(ParamInvalidError) as rank:
        nd_to_nz(torch.zeros(2), 8)
    assert rank.value.param == "x.shape"
    with pytest.raises(ParamNullptrError):
        nd_to_nz(None, 8)  # type: ignore[arg-type]
    nz = nd_to_nz(torch.ones(20, 10), 8)
    with pytest.raises(ParamInvalidError) as mismatch:
        nz_to_nd(nz, (40, 10))
    assert mismatch.value.param == "x.shape"
    with pytest.raises(ParamInvalidError) as bad_shape:
        nz_to_nd(nz, (20,))
    assert bad_shape.value.param == "shape"
    with pytest.raises(ParamInvalidError) as low_rank:
        nz_to_nd(torch.zeros(2, 16, 8), (16, 8))
    assert low_rank.value.param == "x.shape"
    with pytest.raises(ParamNullptrError):
        nz_to_nd(None, (1, 1))  # type: ignore[arg-type]
