"""Tests of quant_matmul (npu_quant_matmul) and trans_quant_param against numpy oracles."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels.quant_matmul import (
    broadcast_shapes,
    decode_quant_param,
    exact_int_matmul,
    quant_matmul,
    trans_quant_param,
)

# The package re-exports the function under the module's name; fetch the module itself.
qm_module = importlib.import_module("mc2sim.kernels.quant_matmul")

I8, I32, I64 = torch.int8, torch.int32, torch.int64
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# --- independent oracles (numpy, int64 and IEEE float32 arithmetic) --------------------------


def np_acc(x1: torch.Tensor, x2: torch.Tensor) -> np.ndarray:
    """Exact integer product in int64 numpy (batch dims broadcast by numpy)."""
    return np.asarray(np.matmul(x1.numpy().astype(np.int64), x2.numpy().astype(np.int64)))


def np_truncate(scale: np.ndarray) -> np.ndarray:
    """Float32 scale with its low 13 mantissa bits cleared."""
    bits = scale.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return np.asarray(bits.view(np.float32))


def np_offset(offset: np.ndarray) -> np.ndarray:
    return np.clip(np.round(offset.astype(np.float64)), -256, 255).astype(np.float32)


def np_requant(y: np.ndarray, offset: np.ndarray | float = 0.0) -> np.ndarray:
    """The device's int8 requantization: round, saturate to 9 bits, add the offset, to int8.

    hicann/ops-nn quant_batch_matmul_v3 kernel golden (``compute_requant``):
    ``clip(clip(round(acc * scale), -256, 255) + offset, -128, 127)``.
    """
    s9 = np.clip(np.round(y.astype(np.float64)), -256, 255)
    return np.clip(s9 + np.asarray(offset, dtype=np.float64), -128, 127).astype(np.int8)


def np_pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack the last dim, 8 values per int32, low nibble first (numpy bit arithmetic)."""
    nib = (values.astype(np.int64) & 0xF).reshape(*values.shape[:-1], -1, 8)
    words = np.zeros(nib.shape[:-1], dtype=np.int64)
    for i in range(8):
        words |= nib[..., i] << (4 * i)
    return words.astype(np.uint32).view(np.int32)


def rand_i8(shape: tuple[int, ...], seed: int, lo: int = -128, hi: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, dtype=I8, generator=gen)


def rand_f(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


# --- seed 004 example ----------------------------------------------------------------------


def test_seed_004_example_both_methods() -> None:
    """Seed 004's int8 example gives the same result by both of its methods.

    (1, 256, 768) x (31, 768, 16), per-channel scale and offset, (31, 1, 16) int32 bias,
    int8 output; method 1 (float32 scale + offset) and method 2 (trans_quant_param) agree.
    """
    x1 = rand_i8((1, 256, 768), 0, -5, 5)
    x2 = rand_i8((31, 768, 16), 1, -5, 5)
    scale = rand_f((16,), 2)
    offset = rand_f((16,), 3)
    bias = torch.randint(-5, 5, (31, 1, 16), dtype=I32, generator=torch.Generator().manual_seed(4))
    out1 = quant_matmul(x1, x2, scale, offset=offset, bias=bias)
    out2 = quant_matmul(x1, x2, trans_quant_param(scale, offset), bias=bias)
    assert out1.dtype == I8
    assert out1.shape == (31, 256, 16)
    assert torch.equal(out1, out2)
    acc = (np_acc(x1, x2) + bias.numpy()).astype(np.float32)
    y = acc * np_truncate(scale.numpy())
    np.testing.assert_array_equal(out1.numpy(), np_requant(y, np_offset(offset.numpy())))
    # Some values saturate, some do not: the example exercises both.
    assert int((out1 == 127).sum()) > 0 and int((out1.abs() < 100).sum()) > 0


# --- where the device rounds: INT8 output --------------------------------------------------


@pytest.mark.parametrize("how", ["float32", "int64"])
def test_int8_output_saturates_to_9_bits_before_the_offset(how: str) -> None:
    """``round(acc * scale)`` saturates to [-256, 255] before the offset is added.

    hicann/ops-nn qbmmv3 kernel golden, ``compute_requant`` with ``f32_2_s9``.

    Row r of x1 times the ones column of x2 gives acc = 100 * r; with scale 1 and
    offset -200 / +200 the device gives ``clip(clip(acc, -256, 255) +- 200, -128, 127)``.
    Adding the offset first (float32 throughout) gives other values wherever |acc| > 255.
    """
    acc = torch.arange(-5, 6, dtype=torch.int64) * 100  # -500 .. 500
    x1 = torch.zeros(acc.numel(), 100, dtype=I8)
    x1[:, :5] = (acc // 5).reshape(-1, 1).to(I8)  # five entries summing to acc
    x2 = torch.ones(100, 2, dtype=I8)
    scale = torch.ones(2)
    offset = torch.tensor([-200.0, 200.0])
    if how == "float32":
        out = quant_matmul(x1, x2, scale, offset=offset)
    else:
        out = quant_matmul(x1, x2, trans_quant_param(scale, offset))
    a = acc.numpy().reshape(-1, 1).astype(np.float64)
    device = np.clip(np.clip(a, -256, 255) + np.array([-200.0, 200.0]), -128, 127)
    offset_first = np.clip(a + np.array([-200.0, 200.0]), -128, 127)
    np.testing.assert_array_equal(out.numpy(), device.astype(np.int8))
    assert out.numpy()[-1, 0] == 55 and out.numpy()[0, 1] == -56  # 500 - 200, -500 + 200
    assert (out.numpy() != offset_first.astype(np.int8)).sum() == 6


# --- each supported combination against the oracle ------------------------------------------


@pytest.mark.parametrize("scale_kind", ["float32", "int64"])
def test_int8_to_fp16_per_channel(scale_kind: str) -> None:
    x1, x2 = rand_i8((2, 40, 300), 5), rand_i8((300, 24), 6)
    scale = rand_f((24,), 7).abs() * 1e-3
    bias = torch.randint(-1000, 1000, (24,), dtype=I32)
    s_arg = trans_quant_param(scale) if scale_kind == "int64" else scale
    out = quant_matmul(x1, x2, s_arg, bias=bias, output_dtype=F16)
    assert out.dtype == F16 and out.shape == (2, 40, 24)
    y = (np_acc(x1, x2) + bias.numpy()).astype(np.float32) * np_truncate(scale.numpy())
    np.testing.assert_array_equal(out.numpy(), y.astype(np.float16))


def test_int8_to_int8_per_tensor_int64_offset_field() -> None:
    x1, x2 = rand_i8((33, 64), 8), rand_i8((64, 9), 9)
    scale = torch.tensor([0.0123], dtype=F32)
    offset = torch.tensor([-3.5], dtype=F32)  # rounds half to even: -4
    out = quant_matmul(x1, x2, trans_quant_param(scale, offset))
    y = np_acc(x1, x2).astype(np.float32) * np_truncate(scale.numpy())
    np.testing.assert_array_equal(out.numpy(), np_requant(y, -4.0))


def test_float_offset_replaces_int64_offset_field() -> None:
    x1, x2 = rand_i8((8, 32), 10), rand_i8((32, 4), 11)
    scale = torch.full((4,), 0.01, dtype=F32)
    packed = trans_quant_param(scale, torch.full((4,), 100.0))
    offset = torch.tensor([2.5, -1.2, 0.0, 300.0], dtype=F32)
    out = quant_matmul(x1, x2, packed, offset=offset)
    y = np_acc(x1, x2).astype(np.float32) * np_truncate(scale.numpy())
    np.testing.assert_array_equal(out.numpy(), np_requant(y, np_offset(offset.numpy())))


@pytest.mark.parametrize("bias_dtype", [None, I32, BF16, F32])
@pytest.mark.parametrize("scale_dtype", [F32, BF16])
def test_int8_to_bf16_with_pertoken(
    bias_dtype: torch.dtype | None, scale_dtype: torch.dtype
) -> None:
    x1, x2 = rand_i8((3, 17, 200), 12), rand_i8((3, 200, 40), 13)
    scale = (rand_f((40,), 14).abs() * 1e-2).to(scale_dtype)
    pertoken = rand_f((17,), 15).abs()
    bias = None
    if bias_dtype == I32:
        bias = torch.randint(-500, 500, (40,), dtype=I32)
    elif bias_dtype is not None:
        bias = rand_f((3, 1, 40), 16, bias_dtype)
    out = quant_matmul(x1, x2, scale, pertoken_scale=pertoken, bias=bias, output_dtype=BF16)
    assert out.dtype == BF16
    acc = np_acc(x1, x2)
    if bias_dtype == I32:
        assert bias is not None
        acc = acc + bias.numpy()
    y = acc.astype(np.float32) * scale.to(F32).numpy()  # bf16/fp32 scales are not truncated
    y = y * pertoken.numpy()[:, None]
    if bias is not None and bias_dtype != I32:
        y = y + bias.to(F32).numpy()
    assert torch.equal(out, torch.from_numpy(y).to(BF16))


@pytest.mark.parametrize("bias_dtype", [F16, F32, I32])
def test_int8_to_fp16_with_pertoken(bias_dtype: torch.dtype) -> None:
    x1, x2 = rand_i8((20, 100), 17), rand_i8((100, 12), 18)
    scale = rand_f((12,), 19).abs() * 1e-2
    pertoken = rand_f((20,), 20).abs()
    if bias_dtype == I32:
        bias = torch.randint(-500, 500, (12,), dtype=I32)
    else:
        bias = rand_f((12,), 21, bias_dtype)
    out = quant_matmul(x1, x2, scale, pertoken_scale=pertoken, bias=bias, output_dtype=F16)
    acc = np_acc(x1, x2)
    if bias_dtype == I32:
        acc = acc + bias.numpy()
    y = acc.astype(np.float32) * scale.numpy() * pertoken.numpy()[:, None]  # fp32, untruncated
    if bias_dtype != I32:
        y = y + bias.to(F32).numpy()
    np.testing.assert_array_equal(out.numpy(), y.astype(np.float16))


def test_int8_to_int32_raw_accumulator_with_wraparound() -> None:
    x1 = torch.full((2, 4), 100, dtype=I8)
    x2 = torch.full((4, 3), 100, dtype=I8)  # acc = 40000
    bias = torch.tensor([0, 2**31 - 1, -(2**31)], dtype=I32)
    out = quant_matmul(x1, x2, torch.ones(3, dtype=BF16), bias=bias, output_dtype=I32)
    assert out.dtype == I32
    expected = (np.int64(40000) + bias.numpy().astype(np.int64) + 2**31) % 2**32 - 2**31
    np.testing.assert_array_equal(out.numpy(), np.broadcast_to(expected, (2, 3)))
    assert int(out[0, 1]) < 0  # wrapped past int32 max


def test_int32_output_is_exact_for_large_k() -> None:
    """Partial sums far beyond 2**24 stay exact (float32 alone would round them)."""
    x1 = torch.full((3, 65535), -128, dtype=I8)
    x2 = torch.full((65535, 2), -128, dtype=I8)
    out = quant_matmul(x1, x2, torch.ones(1), output_dtype=I32)
    assert out.tolist() == [[65535 * 16384] * 2] * 3
    a, b = rand_i8((16, 5000), 22), rand_i8((5000, 20), 23)
    out = quant_matmul(a, b, torch.ones(20), output_dtype=I32)
    np.testing.assert_array_equal(out.numpy(), np_acc(a, b))


def test_float64_fallback_when_float32_matmul_is_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = rand_i8((7, 3000), 24), rand_i8((3000, 5), 25)
    monkeypatch.setattr(qm_module, "_float32_matmul_is_exact", lambda: False)
    np.testing.assert_array_equal(exact_int_matmul(a, b).numpy(), np_acc(a, b))


def test_float32_precision_setting_is_detected() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert qm_module._float32_matmul_is_exact()
        torch.set_float32_matmul_precision("medium")
        assert not qm_module._float32_matmul_is_exact()
    finally:
        torch.set_float32_matmul_precision(before)


def test_exact_int_matmul_refuses_possible_int32_overflow() -> None:
    a = torch.full((1, 2), 2**20, dtype=I32)
    b = torch.full((2, 1), 2**11, dtype=I32)
    with pytest.raises(ParamInvalidError) as info:
        exact_int_matmul(a, b)
    assert info.value.param == "k"


# --- int4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("x2_transposed", [False, True])
@pytest.mark.parametrize("scale_kind", ["float32", "int64"])
def test_int4_both_x2_layouts(x2_transposed: bool, scale_kind: str) -> None:
    gen = torch.Generator().manual_seed(26)
    m, k, n = 5, 64, 24
    v1 = torch.randint(-8, 8, (2, m, k), dtype=I32, generator=gen)
    v2 = torch.randint(-8, 8, (k, n), dtype=I32, generator=gen)
    x1 = torch.from_numpy(np_pack_int4(v1.numpy()))
    if x2_transposed:
        x2 = torch.from_numpy(np_pack_int4(v2.t().contiguous().numpy())).t()  # (k/8, n)
        assert x2.shape == (k // 8, n) and not x2.is_contiguous()
    else:
        x2 = torch.from_numpy(np_pack_int4(v2.numpy()))  # (k, n/8)
    scale = rand_f((n,), 27).abs() * 0.1
    bias = torch.randint(-50, 50, (n,), dtype=I32)
    s_arg = trans_quant_param(scale) if scale_kind == "int64" else scale
    out = quant_matmul(x1, x2, s_arg, bias=bias, output_dtype=F16)
    assert out.shape == (2, m, n) and out.dtype == F16
    acc = np.matmul(v1.numpy().astype(np.int64), v2.numpy().astype(np.int64)) + bias.numpy()
    y = acc.astype(np.float32) * np_truncate(scale.numpy())
    np.testing.assert_array_equal(out.numpy(), y.astype(np.float16))


# --- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s1", "s2"),
    [
        ((6, 16), (16, 5)),
        ((2, 1, 3, 6, 16), (4, 1, 16, 5)),
        ((6, 16), (2, 3, 1, 2, 16, 5)),
        ((1, 2, 1, 2, 6, 16), (2, 1, 2, 1, 16, 5)),
    ],
)
def test_batch_broadcast_ranks_2_to_6(s1: tuple[int, ...], s2: tuple[int, ...]) -> None:
    x1, x2 = rand_i8(s1, 28), rand_i8(s2, 29)
    out = quant_matmul(x1, x2, torch.ones(1, dtype=BF16), output_dtype=I32)
    expected = np_acc(x1, x2)
    assert tuple(out.shape) == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)


def test_transposed_int8_x2_view() -> None:
    x1, x2t = rand_i8((4, 32), 30), rand_i8((7, 32), 31)
    out = quant_matmul(x1, x2t.t(), torch.ones(7), output_dtype=I32)
    np.testing.assert_array_equal(out.numpy(), np_acc(x1, x2t.t()))


# --- trans_quant_param ------------------------------------------------------------------------


def test_trans_quant_param_bits() -> None:
    scale = torch.tensor([1.0, 0.5], dtype=F32)
    assert trans_quant_param(scale).tolist() == [0x3F800000 | 1 << 46, 0x3F000000 | 1 << 46]
    raw = torch.tensor([0x3F801FFF], dtype=torch.int32).view(F32)  # low 13 bits set
    assert trans_quant_param(raw).tolist() == [0x3F800000 | 1 << 46]
    offsets = torch.tensor([1.0, -1.0, 2.5, 3.5, 300.0, -300.0], dtype=F32)
    got = trans_quant_param(torch.ones(1), offsets)
    fields = [(v >> 37) & 0x1FF for v in got.tolist()]
    assert fields == [1, 0x1FF, 2, 4, 255, 256]  # 9-bit two's complement: -1 and -256
    assert all(v & (1 << 46) and v & 0xFFFFFFFF == 0x3F800000 for v in got.tolist())


def test_trans_quant_param_shapes_and_decode_round_trip() -> None:
    scale = rand_f((1, 6), 32)
    offset = rand_f((1, 6), 33) * 50
    packed = trans_quant_param(scale, offset)
    assert packed.shape == (1, 6) and packed.dtype == I64
    s, o = decode_quant_param(packed)
    np.testing.assert_array_equal(s.numpy(), np_truncate(scale.numpy()))
    np.testing.assert_array_equal(o.numpy(), np_offset(offset.numpy()))
    assert trans_quant_param(torch.ones(1), torch.zeros(5)).shape == (5,)
    assert trans_quant_param(torch.ones(5), torch.zeros(1)).shape == (5,)


@pytest.mark.parametrize(
    ("scale", "offset", "param"),
    [
        (torch.ones(3, dtype=F16), None, "scale.dtype"),
        (torch.ones(1, 1, 3), None, "scale.shape"),
        (torch.ones(2, 3), None, "scale.shape"),
        (torch.ones(0), None, "scale.shape"),
        (torch.tensor([float("nan")]), None, "scale"),
        (torch.ones(3), torch.ones(3, dtype=F16), "offset.dtype"),
        (torch.ones(3), torch.ones(2), "offset.shape"),
        (torch.ones(1, 1), torch.ones(1, 4), "offset.shape"),
        (torch.ones(3), torch.tensor([float("inf")] * 3), "offset"),
    ],
)
def test_trans_quant_param_invalid(
    scale: torch.Tensor, offset: torch.Tensor | None, param: str
) -> None:
    with pytest.raises(ParamInvalidError) as info:
        trans_quant_param(scale, offset)
    assert info.value.code == 161002
    assert info.value.param == param


def test_trans_quant_param_none() -> None:
    with pytest.raises(ParamNullptrError) as info:
        trans_quant_param(None)  # type: ignore[arg-type]
    assert info.value.code == 161001


def test_broadcast_shapes_helper() -> None:
    assert broadcast_shapes((2, 1, 3), (4, 1)) == (2, 4, 3)
    assert broadcast_shapes((2,), (3,)) is None
    assert broadcast_shapes() == ()


# --- errors: one per documented constraint ---------------------------------------------------

X1, X2, SCALE = torch.zeros(4, 16, dtype=I8), torch.zeros(16, 8, dtype=I8), torch.ones(8)


@pytest.mark.parametrize("missing", ["x1", "x2", "scale"])
def test_required_inputs(missing: str) -> None:
    args = {"x1": X1, "x2": X2, "scale": SCALE}
    args[missing] = None  # type: ignore[assignment]
    with pytest.raises(ParamNullptrError) as info:
        quant_matmul(args["x1"], args["x2"], args["scale"])
    assert info.value.code == 161001
    assert info.value.param == missing


def _pk(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape, dtype=I32)


@pytest.mark.parametrize(
    ("x1", "x2", "scale", "kwargs", "param"),
    [
        # dtypes of each input
        (X1.float(), X2, SCALE, {}, "x1.dtype"),
        (X1, X2.to(I32), SCALE, {}, "x2.dtype"),
        (X1, X2, SCALE.half(), {}, "scale.dtype"),
        (X1, X2, SCALE, {"offset": torch.ones(8, dtype=F16)}, "offset.dtype"),
        (X1, X2, SCALE, {"pertoken_scale": torch.ones(4, dtype=F16)}, "pertoken_scale.dtype"),
        (X1, X2, SCALE, {"bias": torch.ones(8, dtype=I8)}, "bias.dtype"),
        (X1, X2, SCALE, {"output_dtype": F32}, "output_dtype"),
        # combinations outside the table
        (X1, X2, SCALE.to(BF16), {"output_dtype": F16}, "dtypes"),
        (X1, X2, SCALE, {"offset": torch.ones(8), "output_dtype": F16}, "dtypes"),
        (X1, X2, SCALE, {"pertoken_scale": torch.ones(4)}, "dtypes"),
        (X1, X2, SCALE, {"bias": torch.ones(8, dtype=F16)}, "dtypes"),
        (X1, X2, SCALE, {"bias": torch.ones(8, dtype=F32), "output_dtype": I32}, "dtypes"),
        (X1, X2, trans_quant_param(SCALE), {"output_dtype": BF16}, "dtypes"),
        (_pk((4, 2)), _pk((16, 1)), SCALE, {"output_dtype": BF16}, "dtypes"),
        # ranks, emptiness, sizes
        (torch.zeros(16, dtype=I8), X2, SCALE, {"output_dtype": F16}, "x1.shape"),
        (X1, torch.zeros(1, 1, 1, 1, 1, 16, 8, dtype=I8), SCALE, {"output_dtype": F16}, "x2.shape"),
        (torch.zeros(0, 16, dtype=I8), X2, SCALE, {"output_dtype": F16}, "x1.shape"),
        (
            torch.zeros(1, 65536, dtype=I8),
            torch.zeros(65536, 1, dtype=I8),
            torch.ones(1),
            {"output_dtype": F16},
            "x1.shape",
        ),
        (
            torch.zeros(1, 1, dtype=I8),
            torch.zeros(1, 65536, dtype=I8),
            torch.ones(1),
            {"output_dtype": F16},
            "x2.shape",
        ),
        (X1, torch.zeros(15, 8, dtype=I8), SCALE, {"output_dtype": F16}, "x2.shape"),
        (
            torch.zeros(2, 4, 16, dtype=I8),
            torch.zeros(3, 16, 8, dtype=I8),
            SCALE,
            {"output_dtype": F16},
            "x2.shape",
        ),
        # int4 layouts
        (_pk((16, 4))[:, :2], _pk((16, 1)), SCALE, {"output_dtype": F16}, "x1"),
        (_pk((4, 2)), _pk((1, 16, 1)), SCALE, {"output_dtype": F16}, "x2.shape"),
        (_pk((4, 2)), _pk((16, 4))[:, ::2], SCALE, {"output_dtype": F16}, "x2"),
        # parameter shapes
        (X1, X2, torch.ones(2), {"output_dtype": F16}, "scale.shape"),
        (X1, X2, SCALE, {"offset": torch.ones(3)}, "offset.shape"),
        (
            X1,
            X2,
            SCALE,
            {"pertoken_scale": torch.ones(5), "output_dtype": BF16},
            "pertoken_scale.shape",
        ),
        (X1, X2, SCALE, {"bias": torch.ones(9, dtype=I32), "output_dtype": F16}, "bias.shape"),
        (
            X1,
            X2,
            SCALE,
            {"bias": torch.ones(1, 1, 8, dtype=I32), "output_dtype": F16},
            "bias.shape",
        ),
        (
            torch.zeros(3, 4, 16, dtype=I8),
            X2,
            SCALE,
            {"bias": torch.ones(2, 1, 8, dtype=I32), "output_dtype": F16},
            "bias.shape",
        ),
    ],
)
def test_invalid(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    kwargs: dict[str, object],
    param: str,
) -> None:
    with pytest.raises(ParamInvalidError) as info:
        quant_matmul(x1, x2, scale, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == 161002
    assert info.value.param == param


def test_combination_error_names_the_combination() -> None:
    with pytest.raises(ParamInvalidError) as info:
        quant_matmul(X1, X2, SCALE.to(BF16), output_dtype=F16)
    assert "scale=bfloat16" in str(info.value) and "output=float16" in str(info.value)


def test_3d_bias_allowed_for_3d_output() -> None:
    x1 = rand_i8((3, 4, 16), 34)
    x2 = rand_i8((16, 8), 35)
    bias = torch.arange(24, dtype=I32).reshape(3, 1, 8)
    out = quant_matmul(x1, x2, torch.ones(8, dtype=BF16), bias=bias, output_dtype=I32)
    np.testing.assert_array_equal(out.numpy(), np_acc(x1, x2) + bias.numpy())


def test_int4_one_by_one_x2_is_the_transposed_layout() -> None:
    """A (1, 1) int32 x2 is (k/8, n) = (1, 1): k = 8, n = 1 (k = 1 could match no int4 x1)."""
    v1 = torch.arange(-4, 4, dtype=I32).reshape(1, 8)
    v2 = torch.tensor([[1], [2], [3], [-1], [0], [7], [-8], [1]], dtype=I32)
    x1 = torch.from_numpy(np_pack_int4(v1.numpy()))
    x2 = torch.from_numpy(np_pack_int4(v2.t().contiguous().numpy()))
    assert x2.shape == (1, 1)
    out = quant_matmul(x1, x2, trans_quant_param(torch.ones(1)), output_dtype=F16)
    assert out.tolist() == [[float(int((v1 @ v2).item()))]]


def test_effective_quant_param_shape_mismatch() -> None:
    with pytest.raises(ParamInvalidError) as info:
        qm_module.effective_quant_param(torch.ones(3), torch.ones(2))
    assert info.value.param == "offset.shape"


def test_chunked_exact_path_with_broadcast_batches() -> None:
    """Full-range int8 with k = 2500: three k chunks (1024, 1024, 452) and broadcast batches."""
    x1, x2 = rand_i8((2, 1, 3, 2500), 36), rand_i8((4, 2500, 5), 37)
    out = quant_matmul(x1, x2, torch.ones(5), output_dtype=I32)
    assert out.shape == (2, 4, 3, 5)
    np.testing.assert_array_equal(out.numpy(), np_acc(x1, x2))
