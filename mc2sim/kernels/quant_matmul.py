"""Quantized matmul (torch_npu.npu_quant_matmul) and its scale encoder trans_quant_param."""

from __future__ import annotations

import torch

from mc2sim.errors import ParamInvalidError
from mc2sim.kernels._device import int8_matmul, same_device, uses_cuda_int8
from mc2sim.kernels._validate import (
    require,
    require_dtype,
    require_not_none,
    require_rank,
)
from mc2sim.kernels.int4 import unpack_int4

__all__ = [
    "broadcast_shapes",
    "decode_quant_param",
    "effective_quant_param",
    "exact_int_matmul",
    "quant_matmul",
    "requantize_int8",
    "round_to_int8",
    "trans_quant_param",
]

MAX_LAST_DIM = 65535
"""Largest allowed last dim of x1 and x2 (seed 004: "不能超过65535")."""
_FLOAT32_EXACT_INT = 2**24
"""Every integer of magnitude <= 2**24 is a float32."""
_SCALE_MASK = 0xFFFFE000
"""trans_quant_param keeps the float32's sign, exponent and top 10 mantissa bits."""
_OFFSET_SHIFT = 37
_OFFSET_BITS = 0x1FF
_KEEP_SCALE_AND_SIGN = 0x4000FFFFFFFF
_SIGN_FLAG = 1 << 46

_I8, _I32, _I64 = torch.int8, torch.int32, torch.int64
_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32

# Seed 004, table 2 (A2/A3): x1/x2, scale, offset, bias, pertoken_scale, output.
# ``None`` in a set means "may be absent".
_Combo = tuple[
    torch.dtype,
    frozenset[torch.dtype],
    frozenset[torch.dtype | None],
    frozenset[torch.dtype | None],
    frozenset[torch.dtype | None],
    torch.dtype,
]
_COMBOS: tuple[_Combo, ...] = (
    (
        _I8,
        frozenset({_I64, _F32}),
        frozenset({None}),
        frozenset({_I32, None}),
        frozenset({None}),
        _F16,
    ),
    (
        _I8,
        frozenset({_I64, _F32}),
        frozenset({_F32, None}),
        frozenset({_I32, None}),
        frozenset({None}),
        _I8,
    ),
    (
        _I8,
        frozenset({_F32, _BF16}),
        frozenset({None}),
        frozenset({_I32, _BF16, _F32, None}),
        frozenset({_F32, None}),
        _BF16,
    ),
    (
        _I8,
        frozenset({_F32}),
        frozenset({None}),
        frozenset({_I32, _F16, _F32, None}),
        frozenset({_F32}),
        _F16,
    ),
    (
        _I32,
        frozenset({_I64, _F32}),
        frozenset({None}),
        frozenset({_I32, None}),
        frozenset({None}),
        _F16,
    ),
    (
        _I8,
        frozenset({_F32, _BF16}),
        frozenset({None}),
        frozenset({_I32, None}),
        frozenset({None}),
        _I32,
    ),
)
_OUTPUT_DTYPES = (None, _I8, _F16, _BF16, _I32)


def _name(dtype: torch.dtype | None) -> str:
    return "None" if dtype is None else str(dtype).removeprefix("torch.")


def _float32_matmul_is_exact() -> bool:
    """Whether torch's float32 CPU matmul runs in full IEEE float32 (no bf16/tf32 shortcuts)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    settings = (
        getattr(mkldnn_matmul, "fp32_precision", "none"),
        getattr(torch.backends, "fp32_precision", "none"),
    )
    return all(s in ("none", "ieee") for s in settings)


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiply integer matrices exactly into int32, on their device.

    On CUDA, int8 operands go to ``torch._int_mm`` (exact int32 accumulation, padded where
    its shape rules need it). Elsewhere the k axis is cut into chunks of ``2**24 // p`` with
    ``p = max|a| * max|b|`` (1024 for int8 data reaching -128): every partial sum inside a
    chunk is an integer of magnitude <= 2**24, hence exact in a float32 GEMM whatever its
    summation order. The chunk products are converted to int32 (exactly) and summed in int32,
    which cannot overflow because ``k * p < 2**31`` is required. Off the CPU, int8 operands
    take ``p = 128 * 128`` from their dtype rather than from their values, so nothing is read
    back to the host. Should torch be set to a reduced float32 matmul precision on the CPU
    (``torch.set_float32_matmul_precision("medium")``, mkldnn bf16/tf32), the product is
    taken in float64 instead (exact below 2**53, slower).

    Args:
        a: integer tensor ``(..., m, k)`` (any integer dtype).
        b: integer tensor ``(..., k, n)`` on ``a``'s device; batch dims broadcast as in
            ``torch.matmul``.

    Returns:
        The exact ``torch.int32`` product ``(..., m, n)`` on ``a``'s device.

    Raises:
        ParamInvalidError: ``k * max|a| * max|b| >= 2**31`` (the result might not fit int32).

    """
    k = a.shape[-1]
    int8_operands = a.dtype == b.dtype == _I8
    if int8_operands and a.device.type != "cpu":
        bound = 128 * 128
    else:
        bound = max(-int(a.min()), int(a.max()), 0) * max(-int(b.min()), int(b.max()), 0)
    require(
        "k",
        k,
        k * bound < 2**31,
        f"k * max|a| * max|b| = {k * bound} must be < 2**31 for an exact int32 result",
    )
    if int8_operands and uses_cuda_int8(a):  # pragma: no cover - CUDA only
        return _cuda_int8_batched(a, b)
    if a.device.type == "cpu" and not _float32_matmul_is_exact():
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)
    chunk = max(1, _FLOAT32_EXACT_INT // max(bound, 1))
    if k <= chunk:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int32)
    # Chunk operands are converted into buffers reused from chunk to chunk: fresh CPU memory
    # costs a page fault per 4 KiB on first touch, more than the conversion itself.
    a_buf = torch.empty((*a.shape[:-1], chunk), dtype=torch.float32, device=a.device)
    b_buf = torch.empty((*b.shape[:-2], chunk, b.shape[-1]), dtype=torch.float32, device=a.device)
    a_view, b_view = a_buf[..., :chunk], b_buf[..., :chunk, :]
    a_view.copy_(a[..., :chunk])
    b_view.copy_(b[..., :chunk, :])
    part = torch.matmul(a_view, b_view)
    acc = part.to(torch.int32)
    part_int = torch.empty_like(acc)
    for start in range(chunk, k, chunk):
        width = min(chunk, k - start)
        a_view, b_view = a_buf[..., :width], b_buf[..., :width, :]
        a_view.copy_(a[..., start : start + width])
        b_view.copy_(b[..., start : start + width, :])
        torch.matmul(a_view, b_view, out=part)
        part_int.copy_(part)
        acc += part_int
    return acc


def _cuda_int8_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    """``exact_int_matmul`` of int8 operands on CUDA: one ``torch._int_mm`` per matrix."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.dim() == 2:  # every batch of a against one matrix: a single tall product
        return int8_matmul(a.reshape(-1, k), b).reshape(*a.shape[:-1], n)
    batch = broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])) or ()
    a3 = a.expand(*batch, m, k).reshape(-1, m, k)
    b3 = b.expand(*batch, k, n).reshape(-1, k, n)
    out = torch.empty((a3.shape[0], m, n), dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):
        out[i] = int8_matmul(a3[i], b3[i])
    return out.reshape(*batch, m, n)


def requantize_int8(y: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """INT8 output of the quantized matmul: ``round(y)`` saturated to 9 bits, ``+ offset``.

    The device's requantization (the fixpipe's ``y = acc * scale``, then its int8 output)
    rounds ``y`` to an integer and saturates it to the 9-bit range [-256, 255] before adding
    the 9-bit offset; the sum is then saturated to int8. Evidence: hicann/ops-nn
    ``matmul/quant_batch_matmul_v3/tests/assets/qbmmv3_kernel_golden.py``
    (``compute_requant``: ``f32_2_s9(out * x2_scale)``, then ``+ f32_2_s9(offset)``, then
    ``clip(-128, 127)``) with ``f32_2_s9 = clip(round(x), -256, 255)`` in
    ``matmul/common/tests/st/arch35/matmul_quant_util.py``. Without the 9-bit step a large
    ``y`` and a negative offset would land inside [-128, 127] instead of saturating (``y =
    400, offset = -200`` gives 55 on the device, where ``round(400)`` saturates to 255
    first, and 127 with the offset added before any saturation). Rounding is half to even,
    as numpy's ``round`` in that golden.

    Args:
        y: float32 ``acc * scale``.
        offset: float32 integers in [-256, 255], broadcastable against ``y``.

    Returns:
        The ``torch.int8`` result; NaN becomes 0.

    """
    s9 = torch.round(y).nan_to_num_(nan=0.0).clamp_(-256, 255)
    s9 += offset
    return s9.clamp_(-128, 127).to(torch.int8)


def round_to_int8(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even, then saturate to [-128, 127].

    Args:
        y: a floating tensor.

    Returns:
        The ``torch.int8`` tensor; NaN becomes 0.

    """
    rounded = torch.round(y)
    return rounded.nan_to_num_(nan=0.0).clamp_(-128, 127).to(torch.int8)


def _round_offset(offset: torch.Tensor) -> torch.Tensor:
    """Offset as trans_quant_param stores it: round half to even, clamp to [-256, 255]."""
    return torch.round(offset.to(torch.float64)).clamp(-256, 255).to(torch.int64)


def trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Pack float32 quantization scales (and offsets) into int64 (npu_trans_quant_param).

    Each result is ``(bits(scale) & 0xFFFFE000) | (1 << 46)``: the float32's low 13 mantissa
    bits are dropped (truncation, not rounding). With ``offset``, its value rounded half to
    even and clamped to [-256, 255] is stored as a 9-bit two's complement field in bits
    37..45.

    Args:
        scale: ``torch.float32``, shape ``(t,)`` or ``(1, n)``, finite, non-empty.
        offset: optional ``torch.float32``, shape ``(t,)`` or ``(1, n)``, finite; it must
            broadcast against ``scale``.

    Returns:
        ``torch.int64``: shape ``(max(t_scale, t_offset),)`` for a 1-D ``scale``, else
        ``scale``'s 2-D shape.

    Raises:
        ParamNullptrError: ``scale`` is None.
        ParamInvalidError: wrong dtype, rank or shape, empty, or a non-finite value.

    """
    require_not_none("scale", scale)
    require_dtype("scale", scale, (_F32,))
    require_rank("scale", scale, (1, 2))
    _require_param_shape("scale", scale)
    require("scale", "non-finite", bool(torch.isfinite(scale).all()), "must be finite")
    out_shape: tuple[int, ...] = tuple(scale.shape)
    if offset is not None:
        require_dtype("offset", offset, (_F32,))
        require_rank("offset", offset, (1, 2))
        _require_param_shape("offset", offset)
        require("offset", "non-finite", bool(torch.isfinite(offset).all()), "must be finite")
        out_shape = _broadcast_param_shapes(scale, offset)
    return _encode(scale, offset, out_shape)


def _encode(
    scale: torch.Tensor, offset: torch.Tensor | None, out_shape: tuple[int, ...]
) -> torch.Tensor:
    """trans_quant_param's bit packing, without the checks."""
    bits = scale.contiguous().view(torch.int32).to(torch.int64) & _SCALE_MASK
    param = (bits | _SIGN_FLAG).expand(out_shape)
    if offset is not None:
        field = (_round_offset(offset) & _OFFSET_BITS) << _OFFSET_SHIFT
        param = (param & _KEEP_SCALE_AND_SIGN) | field.expand(out_shape)
    return param.contiguous()


def effective_quant_param(
    scale: torch.Tensor, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(scale, offset)`` the hardware applies for an encoded quant parameter.

    An int64 ``scale`` is decoded (:func:`decode_quant_param`); a float32 ``offset`` given
    with it replaces its offset field (rounded half to even, clamped to [-256, 255]). A
    float32 ``scale`` is first encoded as :func:`trans_quant_param` does (torch_npu encodes
    float32 scales before calling the kernel), so its low 13 mantissa bits are dropped.

    Args:
        scale: int64 or float32 tensor, already checked by the caller.
        offset: optional float32 tensor broadcastable against ``scale``.

    Returns:
        float32 ``(scale, offset)`` of the broadcast shape; the offset holds integers.

    """
    if scale.dtype == _I64:
        s, o = decode_quant_param(scale)
        if offset is not None:
            o = _round_offset(offset).to(torch.float32)
        return s, o
    shape = broadcast_shapes(tuple(scale.shape), () if offset is None else tuple(offset.shape))
    if shape is None:
        raise ParamInvalidError(
            "offset.shape",
            tuple(offset.shape) if offset is not None else None,
            f"must broadcast against scale's shape {tuple(scale.shape)}",
        )
    return decode_quant_param(_encode(scale, offset, shape))


def _broadcast_param_shapes(scale: torch.Tensor, offset: torch.Tensor) -> tuple[int, ...]:
    """Shape of trans_quant_param's result; ParamInvalidError if offset does not fit."""
    rule = f"must broadcast to scale's shape {tuple(scale.shape)}"
    both = broadcast_shapes(tuple(scale.shape), tuple(offset.shape))
    if both is None:
        raise ParamInvalidError("offset.shape", tuple(offset.shape), rule)
    require("offset.shape", tuple(offset.shape), scale.dim() == 1 or both == scale.shape, rule)
    return both


def _require_param_shape(param: str, tensor: torch.Tensor) -> None:
    ok = tensor.numel() > 0 and (tensor.dim() == 1 or tensor.shape[0] == 1)
    require(f"{param}.shape", tuple(tensor.shape), ok, "must be (t,) or (1, n), non-empty")


def decode_quant_param(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read back what :func:`trans_quant_param` packed.

    Args:
        param: ``torch.int64`` values laid out as trans_quant_param writes them.

    Returns:
        ``(scale, offset)``: the float32 scale with its low 13 mantissa bits cleared (the
        value the hardware multiplies by) and the 9-bit signed offset as float32, both of
        ``param``'s shape.

    """
    low = param & 0xFFFFFFFF & _SCALE_MASK
    scale = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)
    field = (param >> _OFFSET_SHIFT) & _OFFSET_BITS
    offset = (field - ((field & 0x100) << 1)).to(torch.float32)
    return scale, offset


def quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantized matmul with dequantization (torch_npu.npu_quant_matmul, OPS.md section 5).

    ``out = dequant(x1 @ x2 [+ int32 bias])``, with the six dtype combinations of seed 004's
    A2/A3 table. Step by step:

    1. ``acc = x1 @ x2`` exactly (see :func:`exact_int_matmul`). With ``k <= 65535`` for int8
       (``65535 * 2**14 < 2**31``) and int4 inputs it always fits in int32.
    2. An int32 ``bias`` is added with int32 two's complement wraparound, as in an int32
       accumulator.
    3. ``output_dtype=torch.int32``: return ``acc`` (``scale`` is checked but not applied:
       the int32 output is the raw accumulator, which callers dequantize later, e.g. with
       npu_dequant_swiglu_quant).
    4. The scale ``s`` and offset ``o``: an int64 ``scale`` is decoded as
       :func:`decode_quant_param` (truncated scale, 9-bit offset); a float32 ``scale``
       without ``pertoken_scale`` for int8 or float16 output is first encoded with
       ``trans_quant_param(scale, offset)``, as torch_npu does, so it is truncated the same
       way and the offset is rounded half to even and clamped to [-256, 255]; a float32
       ``offset`` given with an int64 ``scale`` replaces its offset field the same way.
       Otherwise ``s`` is the float32/bfloat16 ``scale`` as given and there is no offset.
    5. ``y = float32(acc) * s [* pertoken_scale[row]] [+ float bias]`` in float32: the
       int32 is converted to float32 (exact up to 2**24, else round to nearest even) and
       every operation is rounded to float32 (nearest even).
    6. int8 output: ``round_half_to_even(y)`` saturated to the 9-bit range [-256, 255],
       then ``+ o``, then saturated to [-128, 127], as the device's requantization does
       (:func:`requantize_int8`); the offset is applied to int8 output only.
       float16/bfloat16 output: ``y`` rounded to the output dtype (nearest even).

    Computed on ``x1``'s device and returned there (CUDA: ``torch._int_mm``).

    Args:
        x1: ``torch.int8`` ``(..., m, k)``, or ``torch.int32`` ``(..., m, k/8)`` holding eight
            int4 each (low nibble first), contiguous; rank 2 to 6.
        x2: same dtype as ``x1``. int8: ``(..., k, n)``, rank 2 to 6, any strides. int4:
            2-D, either ``(k, n/8)`` contiguous or ``(k/8, n)`` that is the transpose of a
            contiguous ``(n, k/8)``. Batch dims broadcast against ``x1``'s.
        scale: ``torch.float32``, ``torch.int64`` (from :func:`trans_quant_param`) or
            ``torch.bfloat16``; shape ``(1,)`` or ``(n,)``.
        offset: optional ``torch.float32`` ``(1,)`` or ``(n,)``; int8 output only.
        pertoken_scale: optional ``torch.float32`` ``(m,)``.
        bias: optional int32, bfloat16, float16 or float32; ``(n,)``, or ``(batch, 1, n)``
            when the output is 3-D and ``batch`` is the broadcast batch.
        output_dtype: None (= ``torch.int8``), ``torch.float16``, ``torch.bfloat16`` or
            ``torch.int32``.

    Returns:
        Tensor of shape ``(*broadcast_batch, m, n)`` and dtype ``output_dtype``.

    Raises:
        ParamNullptrError: ``x1``, ``x2`` or ``scale`` is None.
        ParamInvalidError: a dtype combination outside seed 004's table, a rank outside 2..6,
            a last dim above 65535, an empty input, mismatched k, batch dims that do not
            broadcast, a bad int4 layout, a bad shape of scale, offset, pertoken_scale
            or bias, or a tensor on another device than ``x1``.

    """
    require_not_none("x1", x1)
    require_not_none("x2", x2)
    require_not_none("scale", scale)
    require_dtype("x1", x1, (_I8, _I32))
    require_dtype("x2", x2, (x1.dtype,))
    require_dtype("scale", scale, (_F32, _I64, _BF16))
    for pname, opt in (("offset", offset), ("pertoken_scale", pertoken_scale), ("bias", bias)):
        if opt is not None:
            require_dtype(pname, opt, (_F32,) if pname != "bias" else (_I32, _BF16, _F16, _F32))
    require(
        "output_dtype",
        output_dtype,
        output_dtype in _OUTPUT_DTYPES,
        "must be None (int8), torch.int8, torch.float16, torch.bfloat16 or torch.int32",
    )
    out_dtype = _I8 if output_dtype is None else output_dtype
    _require_combination(x1, scale, offset, bias, pertoken_scale, out_dtype)

    require_rank("x1", x1, range(2, 7))
    require_rank("x2", x2, range(2, 7))
    for pname, t in (("x1", x1), ("x2", x2)):
        require(f"{pname}.shape", tuple(t.shape), t.numel() > 0, "must not be empty")
        require(
            f"{pname}.shape",
            tuple(t.shape),
            t.shape[-1] <= MAX_LAST_DIM,
            f"last dim must be <= {MAX_LAST_DIM}",
        )
    int4 = x1.dtype == _I32
    x2_transposed = False
    if int4:
        require("x1", "non-contiguous", x1.is_contiguous(), "int4 (int32) x1 must be contiguous")
        require_rank("x2", x2, (2,))
        x2_transposed = _is_transposed_2d(x2)
        require(
            "x2",
            f"shape {tuple(x2.shape)} strides {x2.stride()}",
            x2_transposed or x2.is_contiguous(),
            "int4 (int32) x2 must be a contiguous (k, n/8) or the transpose of a contiguous "
            "(n, k/8)",
        )
        k = x1.shape[-1] * 8
        k2 = x2.shape[0] * 8 if x2_transposed else x2.shape[0]
        n = x2.shape[1] if x2_transposed else x2.shape[1] * 8
    else:
        k, k2, n = x1.shape[-1], x2.shape[-2], x2.shape[-1]
    require("x2.shape", tuple(x2.shape), k2 == k, f"k must equal x1's k={k}")
    m = x1.shape[-2]
    batch = broadcast_shapes(tuple(x1.shape[:-2]), tuple(x2.shape[:-2]))
    if batch is None:
        raise ParamInvalidError(
            "x2.shape",
            tuple(x2.shape),
            f"batch dims must broadcast against x1's {tuple(x1.shape[:-2])}",
        )
    out_rank = len(batch) + 2

    _require_vector("scale", scale, n)
    if offset is not None:
        _require_vector("offset", offset, n)
    if pertoken_scale is not None:
        require(
            "pertoken_scale.shape",
            tuple(pertoken_scale.shape),
            tuple(pertoken_scale.shape) == (m,),
            f"must be (m,) = ({m},)",
        )
    if bias is not None:
        ok = tuple(bias.shape) == (n,) or (out_rank == 3 and tuple(bias.shape) == (batch[0], 1, n))
        rule = f"must be (n,) = ({n},)" + (
            f" or (batch, 1, n) = ({batch[0]}, 1, {n})"
            if out_rank == 3
            else " (a 3-D bias needs a 3-D output)"
        )
        require("bias.shape", tuple(bias.shape), ok, rule)

    device = same_device(
        ("x1", x1),
        ("x2", x2),
        ("scale", scale),
        ("offset", offset),
        ("pertoken_scale", pertoken_scale),
        ("bias", bias),
    )

    # --- arithmetic -------------------------------------------------------------------
    if int4:
        a = unpack_int4(x1, (*x1.shape[:-1], k))
        if x2_transposed:
            b = unpack_int4(x2.t(), (n, k)).t()
        else:
            b = unpack_int4(x2, (k, n))
        if device.type != "cpu":  # int4 values are int8 values: the device's int8 path
            a, b = a.to(_I8), b.to(_I8)
    else:
        a, b = x1, x2
    acc = exact_int_matmul(a, b)
    if bias is not None and bias.dtype == _I32:
        acc = _wrap_int32(acc.to(_I64) + bias.to(_I64))
    if out_dtype == _I32:
        return acc

    s, o = _effective_scale_offset(scale, offset, pertoken_scale, out_dtype)
    y = acc.to(torch.float32)
    y *= s.to(torch.float32)
    if pertoken_scale is not None:
        y *= pertoken_scale.unsqueeze(-1)
    if bias is not None and bias.dtype != _I32:
        y += bias.to(torch.float32)
    if out_dtype == _I8:
        return requantize_int8(y, o)
    out = torch.empty(y.shape, dtype=out_dtype, device=device)
    return out.copy_(y)


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """Broadcast shapes by numpy's rules.

    Args:
        *shapes: the shapes.

    Returns:
        The broadcast shape, or None when the shapes do not broadcast.

    """
    rank = max((len(sh) for sh in shapes), default=0)
    out = [1] * rank
    for sh in shapes:
        for i, d in enumerate(sh, start=rank - len(sh)):
            if d != 1:
                if out[i] not in (1, d):
                    return None
                out[i] = d
    return tuple(out)


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    """Two's complement int32 wraparound of an int64 tensor."""
    return (((v + 2**31) & 0xFFFFFFFF) - 2**31).to(_I32)


def _effective_scale_offset(
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the scale and offset the hardware applies (step 4 of quant_matmul)."""
    if scale.dtype == _I64 or (
        scale.dtype == _F32 and pertoken_scale is None and out_dtype in (_I8, _F16)
    ):
        return effective_quant_param(scale, offset)
    return scale.to(torch.float32), torch.zeros(1, device=scale.device)


def _is_transposed_2d(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor is the transpose of a contiguous one.

    op-plugin's rule (strides ``(1, rows)``) except that a 1 x 1 int4 x2 counts as transposed:
    read as ``(k, n/8)`` it would give k = 1, which no int4 x1 (k a multiple of 8) matches.
    """
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


def _require_vector(param: str, t: torch.Tensor, n: int) -> None:
    require(
        f"{param}.shape",
        tuple(t.shape),
        tuple(t.shape) in ((1,), (n,)),
        f"must be (1,) or (n,) = ({n},)",
    )


def _require_combination(
    x1: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> None:
    """Raise ParamInvalidError unless the dtypes match a row of seed 004's table 2."""
    seen = (
        x1.dtype,
        scale.dtype,
        None if offset is None else offset.dtype,
        None if bias is None else bias.dtype,
        None if pertoken_scale is None else pertoken_scale.dtype,
        out_dtype,
    )
    for x_dt, scales, offsets, biases, pertokens, out in _COMBOS:
        if (
            seen[0] == x_dt
            and seen[1] in scales
            and seen[2] in offsets
            and seen[3] in biases
            and seen[4] in pertokens
            and seen[5] == out
        ):
            return
    names = ("x1", "scale", "offset", "bias", "pertoken_scale", "output")
    combo = ", ".join(f"{k}={_name(v)}" for k, v in zip(names, seen, strict=True))
    raise ParamInvalidError(
        "dtypes",
        combo,
        "is not one of the six supported combinations of npu_quant_matmul (seed 004, table 2)",
    )
