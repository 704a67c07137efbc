"""Weight-only quantized matmul (torch_npu.npu_weight_quant_batchmatmul, OPS.md section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mc2sim import limits
from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels._device import cpu_gemm, mm_float32, same_device
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank
from mc2sim.kernels.int4 import (
    NZ_C0_BYTES,
    NZ_R0,
    Int4PackDtype,
    WeightFormat,
    as_enum,
    nz_to_nd,
    unpack_int4,
)
from mc2sim.kernels.quant_matmul import effective_quant_param, round_to_int8

__all__ = ["MAX_KN", "dequantize_weight", "weight_quant_batchmatmul"]

MAX_KN = 65535
"""Largest k and n (seed 001: "k、n的范围为[1, 65535]")."""
MAX_M = 2**31 - 1
"""Largest m (seed 001: "m的范围为[1, 2147483647]")."""

_X_DTYPES = (torch.float16, torch.bfloat16)
_WEIGHT_DTYPES = (torch.int8, torch.int32, torch.uint8)
_INT4_STORAGE = {torch.int32: Int4PackDtype.INT32, torch.uint8: Int4PackDtype.INT4}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_transposed_2d(t: torch.Tensor, k: int, per: int) -> bool:
    """Whether packed int4 ND storage is the ``(k/per, n)`` transpose of a contiguous one.

    A 1 x 1 storage reads both ways (k = 1, n = per, or k = per, n = 1); x's ``k`` decides.
    """
    rows, cols = t.shape
    if rows == 1 and cols == 1:
        return k == per
    return t.stride(0) == 1 and t.stride(1) == rows


def _check_weight(
    weight: torch.Tensor,
    fmt: WeightFormat,
    weight_shape: Sequence[int] | None,
    weight_transposed: bool,
    kx: int,
) -> tuple[int, int]:
    """Check the weight's dtype, layout and shape; return its logical ``(k, n)``."""
    require_dtype("weight", weight, _WEIGHT_DTYPES)
    require(
        "weight_transposed",
        weight_transposed,
        isinstance(weight_transposed, bool),
        "must be a bool",
    )
    int4 = _INT4_STORAGE.get(weight.dtype)
    per = 1 if int4 is None else int4.per_element
    if fmt is WeightFormat.ND:
        require_rank("weight", weight, (2,))
        require(
            "weight_transposed",
            weight_transposed,
            not weight_transposed,
            "must be False for ND: pass the transposed view itself (e.g. w.t())",
        )
        if int4 is None:
            k, n = weight.shape
        elif _is_transposed_2d(weight, kx, per):
            k, n = weight.shape[0] * per, weight.shape[1]
        else:
            require(
                "weight",
                f"shape {tuple(weight.shape)} strides {weight.stride()}",
                weight.is_contiguous(),
                f"packed int4 ({weight.dtype}) ND weight must be a contiguous (k, n/{per}) or "
                f"the transpose of a contiguous (n, k/{per})",
            )
            k, n = weight.shape[0], weight.shape[1] * per
        if weight_shape is not None:
            require(
                "weight_shape",
                tuple(weight_shape),
                tuple(weight_shape) == (k, n),
                f"must be None or the weight's (k, n) = {(k, n)}",
            )
        return k, n
    require_rank("weight", weight, (4,))
    if weight_shape is None:
        raise ParamNullptrError("weight_shape", None, "is required for a FRACTAL_NZ weight")
    dims = tuple(weight_shape)
    require(
        "weight_shape",
        dims,
        len(dims) == 2 and all(isinstance(d, int) and d >= 1 for d in dims),
        "must be the logical (k, n) of the FRACTAL_NZ weight, two positive ints",
    )
    k, n = dims
    rows, cols = (n, k) if weight_transposed else (k, n)
    require(
        "weight_shape",
        dims,
        cols % per == 0,
        f"the stored matrix's last dim ({'k' if weight_transposed else 'n'}) must be a "
        f"multiple of {per} for {weight.dtype} storage",
    )
    c0 = NZ_C0_BYTES // weight.element_size()
    expected = (_ceil_div(cols // per, c0), _ceil_div(rows, NZ_R0), NZ_R0, c0)
    require(
        "weight.shape",
        tuple(weight.shape),
        tuple(weight.shape) == expected,
        f"must be {expected}: FRACTAL_NZ storage of the "
        f"{'(n, k)' if weight_transposed else '(k, n)'} matrix for weight_shape (k, n) = {(k, n)}",
    )
    return k, n


def _decode_weight(
    weight: torch.Tensor, fmt: WeightFormat, k: int, n: int, weight_transposed: bool
) -> torch.Tensor:
    """Return the (k, n) weight values as an integer tensor (a view where possible)."""
    int4 = _INT4_STORAGE.get(weight.dtype)
    if fmt is WeightFormat.ND:
        if int4 is None:
            return weight
        if _is_transposed_2d(weight, k, int4.per_element):
            return unpack_int4(weight.t(), (n, k), packed_dtype=int4).t()
        return unpack_int4(weight, (k, n), packed_dtype=int4)
    rows, cols = (n, k) if weight_transposed else (k, n)
    if int4 is None:
        values = nz_to_nd(weight, (rows, cols))
    else:
        values = unpack_int4(
            weight, (rows, cols), packed_dtype=int4, packed_format=WeightFormat.FRACTAL_NZ
        )
    return values.t() if weight_transposed else values


def _expand_rows(t: torch.Tensor, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Antiquant parameter in ``dtype``, broadcastable against the (k, n) weight."""
    cast = t.to(dtype)
    if group_size:
        return cast.repeat_interleave(group_size, dim=0)[:k]
    return cast.reshape(1, -1)


def dequantize_weight(
    values: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Return ``(values + offset) * scale`` as the device forms it: in the scale's dtype.

    The matrix unit multiplies float16/bfloat16 operands, so the antiquant runs on the
    vector unit before the matmul and its results are stored in x's dtype: ``values +
    offset`` is computed in float32 and rounded to that dtype, then multiplied by the
    scale in float32 and rounded again. Evidence: hicann/ops-nn
    ``matmul/weight_quant_batch_matmul_v2/tests/assets/wqbmmv2_kernel_golden.py``
    (``_compute_tc`` and ``_compute_pergroup`` truncate ``weight + offset`` and then
    ``weight * scale`` to the intermediate dtype, float16 for float16 x and bfloat16 for
    bfloat16 x, ``matmul_golden_util.truncate`` being a round-to-nearest cast), and
    Ascend/op-plugin ``test/test_custom_ops/test_npu_weight_quant_batchmatmul.py``, whose
    golden ``(weight + antiquant_offset) * antiquant_scale`` on an int8 tensor and 16-bit
    parameters rounds each step to the parameters' dtype by torch's type promotion.
    Rounding once at the end instead (all float32) misses rtol 1e-3 against those goldens
    for 17% of float16 and 49% of bfloat16 outputs. Each float32 step is exact or rounds
    once before the 16-bit rounding, exactly as the goldens' float32 numpy arithmetic.

    Args:
        values: integer ``(k, n)`` weight values (int8 range), on the device.
        scale: float16/bfloat16 antiquant scale, ``(1,)``, ``(n,)``, ``(1, n)`` or
            per-group ``(ceil(k/g), n)``.
        offset: optional, like ``scale``.
        group_size: ``g`` for per-group parameters (row ``kk`` uses group ``kk // g``), else 0.

    Returns:
        The ``(k, n)`` dequantized weight in ``scale``'s dtype on ``values``' device.

    """
    k, n = values.shape
    dtype = scale.dtype
    if values.device.type != "cpu":
        # Off the CPU, in x's dtype directly: torch computes 16-bit elementwise ops in float32
        # and rounds each result once, the same two roundings with a third of the traffic.
        deq = values.to(dtype)  # exact: int8 and int4 values are 16-bit floats
        if offset is not None:
            deq = deq + _expand_rows(offset, group_size, k, dtype)
        return deq * _expand_rows(scale, group_size, k, dtype)
    # Reused buffers: fresh CPU memory costs a page fault per 4 KiB on first touch.
    w = torch.empty((k, n), dtype=torch.float32)
    w.copy_(values)
    rounded = torch.empty((k, n), dtype=dtype)
    if offset is not None:
        w += _expand_rows(offset, group_size, k, torch.float32)
        rounded.copy_(w)  # rounding point 1: w + offset stored in x's dtype
        w.copy_(rounded)
    w *= _expand_rows(scale, group_size, k, torch.float32)
    rounded.copy_(w)  # rounding point 2: (w + offset) * scale stored in x's dtype
    return rounded


def weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    *,
    weight_format: WeightFormat | str | None = None,
    weight_shape: Sequence[int] | None = None,
    weight_transposed: bool = False,
) -> torch.Tensor:
    """Matmul with a weight-only quantized weight: ``x @ ((w + offset) * scale) + bias``.

    Positional order follows torch_npu.npu_weight_quant_batchmatmul (``quant_scale`` before
    ``quant_offset``). Rounded where the device rounds (:func:`dequantize_weight`):
    ``W = round(round(w + antiquant_offset) * antiquant_scale)``, each step computed in
    float32 and rounded to ``x.dtype``; then ``y = x @ W`` with exact products and float32
    accumulation (summation order unspecified), ``+ bias`` in float32. Per-group parameters
    apply to row ``kk`` of the weight from group ``kk // antiquant_group_size``. Without
    ``quant_scale`` the result is rounded to ``x.dtype`` (round to nearest even). With
    ``quant_scale`` the output is int8:
    ``round_half_to_even(y * qs + qo)`` saturated to [-128, 127], where ``(qs, qo)`` are what
    the hardware applies: a float32 ``quant_scale`` is encoded by trans_quant_param first,
    as torch_npu does (low 13 mantissa bits dropped, offset rounded half to even and clamped
    to [-256, 255]); an int64 one is decoded, and a ``quant_offset`` given with it replaces
    its offset field.

    The weight comes in one of these layouts (``weight_format`` None infers ND from rank 2
    and FRACTAL_NZ from rank 4):

    * ND int8 ``(k, n)``: any strides (a transposed view ``w.t()`` included).
    * ND packed int4 (int32 = 8 values, uint8 = 2 values, see :mod:`mc2sim.kernels.int4`):
      a contiguous ``(k, n/8)`` / ``(k, n/2)``, or ``(k/8, n)`` / ``(k/2, n)`` that is the
      transpose of a contiguous ``(n, k/8)`` / ``(n, k/2)``.
    * FRACTAL_NZ storage (int8, or packed int4 from :func:`convert_weight_to_int4pack` with
      ``out_format="FRACTAL_NZ"``): the storage tensor says nothing about padding, so
      ``weight_shape=(k, n)`` gives the logical view shape, as aclnn's view shape does. With
      ``weight_transposed=True`` the storage holds the ``(n, k)`` matrix (a weight packed
      from its transpose, as in seed 000's example); else the ``(k, n)`` matrix.

    Args:
        x: float16 or bfloat16, ``(m, k)`` or ``(b, s, k)``; any strides.
        weight: int8, int32 (packed int4) or uint8 (packed int4), laid out as above.
        antiquant_scale: ``x.dtype``; per-tensor ``(1,)``, per-channel ``(n,)`` or
            ``(1, n)``, per-group ``(ceil(k/g), n)`` with ``g = antiquant_group_size``.
        antiquant_offset: optional, ``x.dtype``, same shape as ``antiquant_scale``.
        quant_scale: optional float32 or int64 (trans_quant_param), ``(1,)``, ``(n,)`` or
            ``(1, n)``; makes the output int8.
        quant_offset: optional float32, same shape as ``quant_scale``; needs ``quant_scale``.
        bias: optional ``(n,)`` or ``(1, n)``; ``x.dtype``, or float32 when ``x`` is
            bfloat16 (aclnnWeightQuantBatchMatmulV2 asks float32 there, seed 001 the same
            dtype as x: both are accepted).
        antiquant_group_size: 0 (per-tensor / per-channel), or a multiple of 32 in
            [32, k - 1] (per-group).
        weight_format: "ND", "FRACTAL_NZ" or None (infer from the rank).
        weight_shape: the logical ``(k, n)``; required for FRACTAL_NZ, optional for ND
            (then it must match).
        weight_transposed: FRACTAL_NZ only: the storage holds the ``(n, k)`` matrix.

    Returns:
        ``(m, n)`` or ``(b, s, n)``: ``x.dtype``, or int8 with ``quant_scale``.

    Raises:
        ParamNullptrError: ``x``, ``weight`` or ``antiquant_scale`` is None, or
            ``weight_shape`` is None for a FRACTAL_NZ weight.
        ParamInvalidError: a dtype, rank, shape or layout outside the rules above, k or n
            outside [1, 65535], mismatched k, a bad ``antiquant_group_size``, or
            ``quant_offset`` without ``quant_scale``, or a tensor on another device than
            ``x``.

    """
    require_not_none("x", x)
    require_not_none("weight", weight)
    require_not_none("antiquant_scale", antiquant_scale)
    require_dtype("x", x, _X_DTYPES)
    require_rank("x", x, (2, 3))
    require("x.shape", tuple(x.shape), x.numel() > 0, "must not be empty")
    fmt: WeightFormat
    if weight_format is None:
        require_dtype("weight", weight, _WEIGHT_DTYPES)
        require(
            "weight.shape",
            tuple(weight.shape),
            weight.dim() in (2, 4),
            "must have 2 (ND) or 4 (FRACTAL_NZ) dimensions when weight_format is None",
        )
        fmt = WeightFormat.ND if weight.dim() == 2 else WeightFormat.FRACTAL_NZ
    else:
        fmt = as_enum("weight_format", weight_format, WeightFormat)
    kx = x.shape[-1]
    k, n = _check_weight(weight, fmt, weight_shape, weight_transposed, kx)
    m = x.numel() // kx
    require("x.shape", tuple(x.shape), 1 <= kx <= MAX_KN, f"k must be in [1, {MAX_KN}]")
    require("x.shape", tuple(x.shape), m <= MAX_M, f"m must be in [1, {MAX_M}]")
    require("weight", (k, n), k == kx, f"k must equal x's k={kx}")
    require("weight", (k, n), 1 <= n <= MAX_KN, f"n must be in [1, {MAX_KN}]")

    g = antiquant_group_size
    limits.ANTIQUANT_GROUP.check(
        "antiquant_group_size",
        g,
        isinstance(g, int)
        and not isinstance(g, bool)
        and (g == 0 or (g % 32 == 0 and 32 <= g <= k - 1)),
        f"must be 0 or a multiple of 32 in [32, k-1] (k={k})",
    )
    require_dtype("antiquant_scale", antiquant_scale, (x.dtype,))
    scale_shapes = [(_ceil_div(k, g), n)] if g else [(1,), (n,), (1, n)]
    require(
        "antiquant_scale.shape",
        tuple(antiquant_scale.shape),
        tuple(antiquant_scale.shape) in scale_shapes,
        f"must be one of {scale_shapes}"
        + (f" (per-group, g={g})" if g else " (per-tensor or per-channel)"),
    )
    if antiquant_offset is not None:
        require_dtype("antiquant_offset", antiquant_offset, (x.dtype,))
        require(
            "antiquant_offset.shape",
            tuple(antiquant_offset.shape),
            antiquant_offset.shape == antiquant_scale.shape,
            f"must equal antiquant_scale's shape {tuple(antiquant_scale.shape)}",
        )
    vec_shapes = [(1,), (n,), (1, n)]
    if quant_scale is not None:
        require_dtype("quant_scale", quant_scale, (torch.float32, torch.int64))
        require(
            "quant_scale.shape",
            tuple(quant_scale.shape),
            tuple(quant_scale.shape) in vec_shapes,
            f"must be one of {vec_shapes}",
        )
    if quant_offset is not None:
        if quant_scale is None:
            raise ParamInvalidError("quant_offset", "given", "needs quant_scale")
        require_dtype("quant_offset", quant_offset, (torch.float32,))
        require(
            "quant_offset.shape",
            tuple(quant_offset.shape),
            quant_offset.shape == quant_scale.shape,
            f"must equal quant_scale's shape {tuple(quant_scale.shape)}",
        )
    if bias is not None:
        allowed = (x.dtype, torch.float32) if x.dtype == torch.bfloat16 else (x.dtype,)
        require_dtype("bias", bias, allowed)
        require(
            "bias.shape",
            tuple(bias.shape),
            tuple(bias.shape) in ((n,), (1, n)),
            f"must be (n,) or (1, n) with n={n}",
        )

    device = same_device(
        ("x", x),
        ("weight", weight),
        ("antiquant_scale", antiquant_scale),
        ("antiquant_offset", antiquant_offset),
        ("quant_scale", quant_scale),
        ("quant_offset", quant_offset),
        ("bias", bias),
    )

    # --- arithmetic -------------------------------------------------------------------
    w = dequantize_weight(
        _decode_weight(weight, fmt, k, n, weight_transposed), antiquant_scale, antiquant_offset, g
    )
    x2d = x.reshape(m, k)
    if device.type == "cpu":
        # Casts go through torch.empty(...).copy_(...): the vectorized copy kernel, and no
        # temporaries beyond the float32 weight, x and y.
        w32 = torch.empty((k, n), dtype=torch.float32)
        w32.copy_(w)
        x32 = torch.empty((m, k), dtype=torch.float32)
        x32.copy_(x2d)
        y = cpu_gemm(x32, w32)
    else:
        y = mm_float32(x2d, w)
    if bias is not None:
        y += bias.to(torch.float32).reshape(-1)
    if quant_scale is not None:
        qs, qo = effective_quant_param(quant_scale, quant_offset)
        y *= qs.reshape(-1)
        y += qo.reshape(-1)
        out = round_to_int8(y)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=device)
        out.copy_(y)
    return out.reshape(*x.shape[:-1], n)
