"""Tests of weight_quant_batchmatmul against a float64 numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels.int4 import convert_weight_to_int4pack, nd_to_nz
from mc2sim.kernels.quant_matmul import trans_quant_param
from mc2sim.kernels.weight_quant import weight_quant_batchmatmul

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# --- oracle: float64 numpy with an explicit per-row group index ------------------------------


def stored(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """A float32 result stored in ``dtype``: float32 rounding, then ``dtype``'s.

    As numpy's ``astype(float32).astype(inter_dtype)`` in the public kernel goldens.
    """
    return torch.from_numpy(values.astype(np.float32)).to(dtype).to(torch.float64).numpy()


def oracle(
    x: torch.Tensor,
    w: np.ndarray,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
    *,
    device_rounding: bool = True,
) -> np.ndarray:
    """``x @ ((w + offset) * scale) + bias`` in float64; ``w`` is the (k, n) integer matrix.

    With ``device_rounding`` the dequantized weight is rounded where the device rounds it:
    ``w + offset`` and then ``* scale`` each stored in x's dtype (hicann/ops-nn
    weight_quant_batch_matmul_v2 kernel golden); without, it stays exact.
    """
    k, n = w.shape
    s = scale.to(torch.float64).numpy()
    o = None if offset is None else offset.to(torch.float64).numpy()
    if group_size:
        rows = np.arange(k) // group_size  # row kk uses group kk // g
        s_full = s[rows]
        o_full = None if o is None else o[rows]
    else:
        s_full = np.broadcast_to(s.reshape(1, -1), (k, n))
        o_full = None if o is None else np.broadcast_to(o.reshape(1, -1), (k, n))
    if device_rounding:
        shifted = w.astype(np.float64)
        if o_full is not None:
            shifted = stored(shifted + o_full, x.dtype)
        deq = stored(shifted * s_full, x.dtype)
    else:
        deq = (w.astype(np.float64) + (0.0 if o_full is None else o_full)) * s_full
    y = np.einsum("mk,kn->mn", x.to(torch.float64).reshape(-1, k).numpy(), deq)
    if bias is not None:
        y = y + bias.to(torch.float64).numpy().reshape(-1)
    return np.asarray(y.reshape(*x.shape[:-1], n))


def assert_close_to(out: torch.Tensor, expected: np.ndarray) -> None:
    """Within the output dtype's rounding of a float32 computation."""
    eps = {F16: 2.0**-10, BF16: 2.0**-7}[out.dtype]
    ref = torch.from_numpy(expected)
    scale = float(ref.abs().max()) + 1e-6
    torch.testing.assert_close(out.to(torch.float64), ref, rtol=eps, atol=eps * scale * 1e-2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)).to(dtype)


def rand_w(shape: tuple[int, ...], lo: int, hi: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen(seed))


def rand_p(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, positive: bool = False
) -> torch.Tensor:
    t = torch.randn(shape, generator=gen(seed))
    return (t.abs() * 0.1 + 0.01 if positive else t).to(dtype)


# --- seed 000's example ----------------------------------------------------------------------


@pytest.mark.parametrize("pack_dtype", ["int4", "int32"])
def test_seed_000_transposed_nz_int4_weight(pack_dtype: str) -> None:
    """Seed 000's example: every output is k = 72.

    A (n, k) = (17, 72) weight packed to int4 FRACTAL_NZ, then used as the
    transposed (k, n) weight of WeightQuantBatchMatmulV2 with per-channel fp16 scale;
    x and the weight are all ones, so every output is k = 72.
    """
    m, k, n = 16, 72, 17
    weight = torch.ones(n, k, dtype=torch.int32)
    packed = convert_weight_to_int4pack(weight, out_dtype=pack_dtype, out_format="FRACTAL_NZ")
    x = torch.ones(m, k, dtype=F16)
    scale = torch.ones(n, dtype=F16)
    y = weight_quant_batchmatmul(x, packed, scale, weight_shape=(k, n), weight_transposed=True)
    assert y.shape == (m, n) and y.dtype == F16
    assert torch.equal(y, torch.full((m, n), 72.0, dtype=F16))


@pytest.mark.parametrize("pack_dtype", ["int4", "int32"])
def test_seed_000_shapes_random_values(pack_dtype: str) -> None:
    m, k, n = 16, 72, 17
    weight = rand_w((n, k), -8, 8, torch.int32, 1)
    packed = convert_weight_to_int4pack(weight, out_dtype=pack_dtype, out_format="FRACTAL_NZ")
    x = rand_x((m, k), F16, 2)
    scale = rand_p((n,), F16, 3, positive=True)
    y = weight_quant_batchmatmul(
        x, packed, scale, weight_format="FRACTAL_NZ", weight_shape=(k, n), weight_transposed=True
    )
    assert_close_to(y, oracle(x, weight.t().numpy(), scale))


# --- int8 ND: quantization modes ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(
    ("scale_shape", "group"),
    [((1,), 0), ((40,), 0), ((1, 40), 0), ((4, 40), 32), ((2, 40), 64)],
)
@pytest.mark.parametrize("with_offset", [False, True])
def test_int8_modes(
    dtype: torch.dtype, scale_shape: tuple[int, ...], group: int, with_offset: bool
) -> None:
    m, k, n = 24, 100, 40
    x = rand_x((m, k), dtype, 4)
    w = rand_w((k, n), -128, 128, torch.int8, 5)
    scale = rand_p(scale_shape, dtype, 6, positive=True)
    offset = rand_p(scale_shape, dtype, 7) if with_offset else None
    y = weight_quant_batchmatmul(x, w, scale, offset, antiquant_group_size=group)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_to(y, oracle(x, w.numpy(), scale, offset, group_size=group))


def test_bias_dtypes_3d_x_and_transposed_weight_view() -> None:
    x = rand_x((2, 5, 64), BF16, 8)
    w_nk = rand_w((48, 64), -128, 128, torch.int8, 9)
    scale = rand_p((48,), BF16, 10, positive=True)
    for bias in (rand_p((48,), BF16, 11), rand_p((1, 48), F32, 12)):
        y = weight_quant_batchmatmul(x, w_nk.t(), scale, bias=bias)
        assert y.shape == (2, 5, 48)
        assert_close_to(y, oracle(x, w_nk.t().numpy(), scale, bias=bias))
    x16 = x.to(F16)
    b16 = rand_p((48,), F16, 13)
    y16 = weight_quant_batchmatmul(x16, w_nk.t(), scale.to(F16), bias=b16)
    assert_close_to(y16, oracle(x16, w_nk.t().numpy(), scale.to(F16), bias=b16))


# --- where the device rounds -----------------------------------------------------------------


def as_dtype(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(values).to(dtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
def test_dequantized_weight_is_rounded_to_x_dtype_before_the_matmul(
    dtype: torch.dtype, mode: str, bits: int, with_offset: bool
) -> None:
    """``w + offset`` and ``* scale`` are stored in x's dtype before the matmul.

    The device's matrix unit takes 16-bit operands (hicann/ops-nn wqbmmv2 kernel golden,
    op-plugin's test golden).

    The output equals the device-rounded float64 oracle rounded once (but for the rare
    element where float32 accumulation order crosses a rounding boundary); with the weight
    dequantized in float32 throughout, 30% to 55% of the outputs differ from it, so this
    test fails if the rounding points are dropped.
    """
    m, k, n = 8, 128, 64
    shape, group = {
        "per_tensor": ((1,), 0),
        "per_channel": ((n,), 0),
        "per_group": ((k // 32, n), 32),
    }[mode]
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    values = rand_w((k, n), lo, hi, torch.int32, 40)
    weight = values.to(torch.int8) if bits == 8 else convert_weight_to_int4pack(values)
    x = rand_x((m, k), dtype, 41)
    scale = rand_p(shape, dtype, 42, positive=True)
    offset = rand_p(shape, dtype, 43) * 3 if with_offset else None
    y = weight_quant_batchmatmul(x, weight, scale, offset, antiquant_group_size=group)
    device = as_dtype(oracle(x, values.numpy(), scale, offset, group_size=group), dtype)
    float32_throughout = as_dtype(
        oracle(x, values.numpy(), scale, offset, group_size=group, device_rounding=False), dtype
    )
    assert (y == device).double().mean() >= 0.99
    assert (y != float32_throughout).double().mean() >= 0.25


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_distance_from_the_exact_golden_is_the_rounding_bound(dtype: torch.dtype) -> None:
    """Against the exact golden the output errs by no more than its rounding points allow.

    Each weight element by two roundings to x's dtype, the sum by one more.
    """
    m, k, n = 16, 256, 64
    u = torch.finfo(dtype).eps / 2  # unit roundoff
    x = rand_x((m, k), dtype, 44)
    w = rand_w((k, n), -128, 128, torch.int8, 45)
    scale = rand_p((n,), dtype, 46, positive=True)
    offset = rand_p((n,), dtype, 47) * 3
    y = weight_quant_batchmatmul(x, w, scale, offset).double().numpy()
    exact = oracle(x, w.numpy(), scale, offset, device_rounding=False)
    shifted = np.abs(w.numpy().astype(np.float64) + offset.double().numpy())
    per_weight = (u * shifted + u * (1 + u) * shifted) * scale.double().numpy()  # 2 roundings
    magnitude = np.abs(x.double().numpy()) @ (shifted * scale.double().numpy())
    accumulation = k * 2.0**-24 * magnitude  # float32 sums of exact products
    bound = np.abs(x.double().numpy()) @ per_weight + u * np.abs(exact) * 1.01 + accumulation
    error = np.abs(y - exact)
    assert (error <= bound).all()
    assert error.max() > u * np.abs(exact).max() / 4  # the weight's rounding is visible


# --- int4 ND and the NZ layouts -------------------------------------------------------------


@pytest.mark.parametrize("pack_dtype", ["int32", "int4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_int4_nd(pack_dtype: str, transposed: bool) -> None:
    m, k, n = 8, 64, 32
    values = rand_w((k, n), -8, 8, torch.int32, 14)
    if transposed:  # (k/8, n) view of a contiguous (n, k/8)
        weight = convert_weight_to_int4pack(values.t().contiguous(), out_dtype=pack_dtype).t()
    else:
        weight = convert_weight_to_int4pack(values, out_dtype=pack_dtype)
    x = rand_x((m, k), F16, 15)
    scale = rand_p((2, n), F16, 16, positive=True)
    offset = rand_p((2, n), F16, 17)
    y = weight_quant_batchmatmul(x, weight, scale, offset, antiquant_group_size=32)
    assert_close_to(y, oracle(x, values.numpy(), scale, offset, group_size=32))


@pytest.mark.parametrize("pack_dtype", ["int32", "int4", "int8"])
@pytest.mark.parametrize("transposed", [False, True])
def test_nz_layouts(pack_dtype: str, transposed: bool) -> None:
    m, k, n = 7, 80, 40
    lo, hi = (-128, 128) if pack_dtype == "int8" else (-8, 8)
    values = rand_w((k, n), lo, hi, torch.int32, 18)
    stored = values.t().contiguous() if transposed else values
    if pack_dtype == "int8":
        weight = nd_to_nz(stored.to(torch.int8), 32)
    else:
        weight = convert_weight_to_int4pack(stored, out_dtype=pack_dtype, out_format="FRACTAL_NZ")
    x = rand_x((m, k), BF16, 19)
    scale = rand_p((1,), BF16, 20, positive=True)
    y = weight_quant_batchmatmul(
        x, weight, scale, weight_shape=[k, n], weight_transposed=transposed
    )
    assert_close_to(y, oracle(x, values.numpy(), scale))


# --- int8 output quantization ---------------------------------------------------------------


def quant_oracle(y: np.ndarray, qs: np.ndarray, qo: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(np.round(y * qs + qo), -128, 127).astype(np.int8))


def truncate(scale: np.ndarray) -> np.ndarray:
    bits = scale.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return np.asarray(bits.view(np.float32))


@pytest.mark.parametrize("kind", ["float32", "int64", "int64+offset"])
def test_quant_output(kind: str) -> None:
    m, k, n = 6, 32, 8
    x = (torch.arange(m * k) % 5 - 2).reshape(m, k).to(F16)  # small integers: exact float32 math
    w = rand_w((k, n), -4, 4, torch.int8, 21)
    ascale = torch.ones(1, dtype=F16)
    qs = torch.full((1, n), 0.37, dtype=F32)
    qo = torch.arange(n, dtype=F32).reshape(1, n) - 3.5
    if kind == "float32":
        y = weight_quant_batchmatmul(x, w, ascale, quant_scale=qs, quant_offset=qo)
        eff_o = np.clip(np.round(qo.numpy()), -256, 255)
    elif kind == "int64":
        y = weight_quant_batchmatmul(x, w, ascale, None, trans_quant_param(qs, qo))
        eff_o = np.clip(np.round(qo.numpy()), -256, 255)
    else:
        packed = trans_quant_param(qs, torch.full((1, n), 9.0))
        y = weight_quant_batchmatmul(x, w, ascale, quant_scale=packed, quant_offset=qo)
        eff_o = np.clip(np.round(qo.numpy()), -256, 255)
    assert y.dtype == torch.int8 and y.shape == (m, n)
    acc = x.numpy().astype(np.float32) @ w.numpy().astype(np.float32)
    expected = quant_oracle(acc, truncate(qs.numpy()), eff_o.astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), expected)


# --- errors: one per documented constraint ---------------------------------------------------

X = torch.zeros(4, 64, dtype=F16)
W = torch.zeros(64, 16, dtype=torch.int8)
S = torch.ones(16, dtype=F16)


@pytest.mark.parametrize("missing", ["x", "weight", "antiquant_scale"])
def test_required_inputs(missing: str) -> None:
    args: dict[str, torch.Tensor | None] = {"x": X, "weight": W, "antiquant_scale": S}
    args[missing] = None
    with pytest.raises(ParamNullptrError) as info:
        weight_quant_batchmatmul(args["x"], args["weight"], args["antiquant_scale"])  # type: ignore[arg-type]
    assert info.value.code == 161001
    assert info.value.param == missing


def test_nz_needs_weight_shape() -> None:
    nz = nd_to_nz(W, 32)
    with pytest.raises(ParamNullptrError) as info:
        weight_quant_batchmatmul(X, nz, S)
    assert info.value.param == "weight_shape"


def _packed_nd() -> torch.Tensor:
    return torch.zeros(64, 2, dtype=torch.int32)  # (k, n/8) with n = 16


@pytest.mark.parametrize(
    ("x", "weight", "scale", "kwargs", "param"),
    [
        (X.float(), W, S, {}, "x.dtype"),
        (torch.zeros(64, dtype=F16), W, S, {}, "x.shape"),
        (torch.zeros(1, 1, 4, 64, dtype=F16), W, S, {}, "x.shape"),
        (torch.zeros(0, 64, dtype=F16), W, S, {}, "x.shape"),
        (X, W.float(), S, {}, "weight.dtype"),
        (X, W.float(), S, {"weight_format": "ND"}, "weight.dtype"),
        (X, torch.zeros(1, 64, 16, dtype=torch.int8), S, {}, "weight.shape"),
        (X, W, S, {"weight_format": "NCHW"}, "weight_format"),
        (X, W, S, {"weight_format": "FRACTAL_NZ", "weight_shape": (64, 16)}, "weight.shape"),
        (X, nd_to_nz(W, 32), S, {"weight_format": "ND"}, "weight.shape"),
        (X, W, S, {"weight_transposed": True}, "weight_transposed"),
        (X, W, S, {"weight_transposed": 1}, "weight_transposed"),
        (X, W, S, {"weight_shape": (64, 8)}, "weight_shape"),
        (X, torch.zeros(64, 4, dtype=torch.int32)[:, ::2], S, {}, "weight"),
        (X, nd_to_nz(W, 32), S, {"weight_shape": (64, 16, 1)}, "weight_shape"),
        (X, nd_to_nz(W, 32), S, {"weight_shape": (64, 0)}, "weight_shape"),
        (X, nd_to_nz(W, 32), S, {"weight_shape": (64, 48)}, "weight.shape"),
        (X, nd_to_nz(_packed_nd(), 8), S, {"weight_shape": (64, 12)}, "weight_shape"),
        (torch.zeros(4, 32, dtype=F16), W, S, {}, "weight"),
        (
            torch.zeros(1, 65536, dtype=F16),
            torch.zeros(65536, 1, dtype=torch.int8),
            torch.ones(1, dtype=F16),
            {},
            "x.shape",
        ),
        (
            torch.zeros(1, 1, dtype=F16),
            torch.zeros(1, 65536, dtype=torch.int8),
            torch.ones(1, dtype=F16),
            {},
            "weight",
        ),
        (
            torch.zeros(1, 1, dtype=F16).expand(2**31, 1),
            torch.zeros(1, 1, dtype=torch.int8),
            torch.ones(1, dtype=F16),
            {},
            "x.shape",
        ),
        (X, W, S, {"antiquant_group_size": 16}, "antiquant_group_size"),
        (X, W, S, {"antiquant_group_size": 48}, "antiquant_group_size"),
        (X, W, S, {"antiquant_group_size": 64}, "antiquant_group_size"),
        (X, W, S, {"antiquant_group_size": True}, "antiquant_group_size"),
        (X, W, S.to(BF16), {}, "antiquant_scale.dtype"),
        (X, W, torch.ones(2, 16, dtype=F16), {}, "antiquant_scale.shape"),
        (X, W, S, {"antiquant_group_size": 32}, "antiquant_scale.shape"),
        (X, W, S, {"antiquant_offset": S.to(F32)}, "antiquant_offset.dtype"),
        (X, W, S, {"antiquant_offset": torch.ones(1, 16, dtype=F16)}, "antiquant_offset.shape"),
        (X, W, S, {"quant_scale": torch.ones(16, dtype=F16)}, "quant_scale.dtype"),
        (X, W, S, {"quant_scale": torch.ones(2, 16)}, "quant_scale.shape"),
        (X, W, S, {"quant_offset": torch.ones(16)}, "quant_offset"),
        (
            X,
            W,
            S,
            {"quant_scale": torch.ones(16), "quant_offset": torch.ones(16, dtype=F16)},
            "quant_offset.dtype",
        ),
        (
            X,
            W,
            S,
            {"quant_scale": torch.ones(16), "quant_offset": torch.ones(1)},
            "quant_offset.shape",
        ),
        (X, W, S, {"bias": torch.ones(16)}, "bias.dtype"),
        (X, W, S, {"bias": torch.ones(2, 16, dtype=F16)}, "bias.shape"),
    ],
)
def test_invalid(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    kwargs: dict[str, object],
    param: str,
) -> None:
    with pytest.raises(ParamInvalidError) as info:
        weight_quant_batchmatmul(x, weight, scale, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == 161002
    assert info.value.param == param


@pytest.mark.parametrize(("pack_dtype", "per"), [("int32", 8), ("int4", 2)])
def test_one_by_one_packed_weight_reads_by_x_k(pack_dtype: str, per: int) -> None:
    """A (1, 1) packed ND weight is (k, n/per) with k = 1, or (k/per, n) with k = per."""
    values = torch.arange(1, per + 1, dtype=torch.int32) - per // 2
    one_row = convert_weight_to_int4pack(values.reshape(1, per), out_dtype=pack_dtype)
    assert one_row.shape == (1, 1)
    scale = torch.ones(1, dtype=F16)
    y_row = weight_quant_batchmatmul(torch.full((3, 1), 2.0, dtype=F16), one_row, scale)
    assert y_row.shape == (3, per)
    assert y_row[0].tolist() == (2 * values).tolist()
    y_col = weight_quant_batchmatmul(torch.ones(3, per, dtype=F16), one_row, scale)
    assert y_col.shape == (3, 1)
    assert y_col.flatten().tolist() == [float(values.sum())] * 3
