"""Plain float matmul with an optional bias: the dense part of the tensor-parallel MC2 ops."""

from __future__ import annotations

import torch

from mc2sim.kernels._device import mm_float32, same_device
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank

__all__ = ["matmul"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matmul(x1: torch.Tensor, x2: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x1 @ x2 + bias`` in ``x1``'s dtype.

    Computed as the matrix unit does: exact products, float32 accumulation (summation order
    unspecified), bias added in float32, then rounded once to ``x1.dtype`` (round to nearest
    even). On ``x1``'s device; the result stays there.

    Args:
        x1: ``(m, k)`` or ``(b, s, k)``; float16, bfloat16 or float32; any strides.
        x2: ``(k, n)`` of ``x1``'s dtype; may be a transposed view.
        bias: optional ``(n,)`` of ``x1``'s dtype.

    Returns:
        ``(m, n)`` or ``(b, s, n)`` tensor of ``x1.dtype`` on ``x1``'s device.

    Raises:
        ParamNullptrError: ``x1`` or ``x2`` is None.
        ParamInvalidError: dtypes differ or are not float, ranks or inner dims do not match,
            ``bias`` is not ``(n,)``, or a tensor lies on another device than ``x1``.

    """
    require_not_none("x1", x1)
    require_not_none("x2", x2)
    require_dtype("x1", x1, _FLOAT_DTYPES)
    require_dtype("x2", x2, (x1.dtype,))
    require_rank("x1", x1, (2, 3))
    require_rank("x2", x2, (2,))
    k, n = x2.shape
    require(
        "x2.shape", tuple(x2.shape), x1.shape[-1] == k, f"dim 0 must equal x1's k ({x1.shape[-1]})"
    )
    if bias is not None:
        require_dtype("bias", bias, (x1.dtype,))
        require("bias.shape", tuple(bias.shape), tuple(bias.shape) == (n,), f"must be ({n},)")
    device = same_device(("x1", x1), ("x2", x2), ("bias", bias))
    lead = x1.shape[:-1]
    rows = x1.reshape(-1, k)
    if device.type != "cpu":
        result = mm_float32(rows, x2)
        if bias is not None:
            result += bias.float()
        return result.to(x1.dtype).reshape(*lead, n)
    if x1.dtype == torch.float32:
        result = torch.matmul(rows, x2)
        if bias is not None:
            result += bias
        return result.reshape(*lead, n)
    # 16-bit inputs: float32 products a block of rows at a time, so the float32 intermediate
    # stays in cache instead of making a full-size float32 copy of the output (on 2 cores
    # this halved the time of memory-bound shapes: docs/BENCHMARKS.md).
    w32 = x2.float()
    b32 = None if bias is None else bias.float()
    out = torch.empty((rows.shape[0], n), dtype=x1.dtype)
    block = max(BLOCK_MIN_ROWS, BLOCK_FLOATS // max(n, 1))
    buf = torch.empty((min(block, rows.shape[0]), n), dtype=torch.float32)
    for start in range(0, rows.shape[0], block):
        stop = min(start + block, rows.shape[0])
        part = buf[: stop - start]
        torch.matmul(rows[start:stop].float(), w32, out=part)
        if b32 is not None:
            part += b32
        out[start:stop].copy_(part)
    return out.reshape(*lead, n)


BLOCK_FLOATS = 1 << 18
"""float32 elements of one block of the intermediate product (1 MiB)."""
BLOCK_MIN_ROWS = 16
"""Fewest rows in a block."""
