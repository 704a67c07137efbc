"""Plain float matmul with an optional bias: the dense part of the tensor-parallel MC2 ops."""

from __future__ import annotations

import torch

from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank

__all__ = ["matmul"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matmul(x1: torch.Tensor, x2: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x1 @ x2 + bias`` in ``x1``'s dtype.

    Computed in float32 (inputs upcast exactly, float32 GEMM, summation order unspecified,
    bias added in float32), then rounded once to ``x1.dtype`` (round to nearest even).

    Args:
        x1: ``(m, k)`` or ``(b, s, k)``; float16, bfloat16 or float32; any strides.
        x2: ``(k, n)`` of ``x1``'s dtype; may be a transposed view.
        bias: optional ``(n,)`` of ``x1``'s dtype.

    Returns:
        ``(m, n)`` or ``(b, s, n)`` tensor of ``x1.dtype``.

    Raises:
        ParamNullptrError: ``x1`` or ``x2`` is None.
        ParamInvalidError: dtypes differ or are not float, ranks or inner dims do not match,
            or ``bias`` is not ``(n,)``.

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
    out = torch.matmul(x1.float(), x2.float())
    if bias is not None:
        out += bias.float()
    return out.to(x1.dtype)
