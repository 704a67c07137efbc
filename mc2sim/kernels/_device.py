"""Where a kernel's tensors live, and the device's fast matmul paths that keep the math exact.

Every kernel computes on its inputs' device and returns its result there: CPU, CUDA, or an
Ascend ``npu`` through the same torch calls. Inputs on different devices are refused with a
``ParamInvalidError`` (161002) naming the parameter; nothing is copied to the host behind
the caller's back.

The matrix unit of an Ascend NPU takes float16/bfloat16 (or int8) operands and accumulates in
float32 (int32). The paths below compute exactly that on every device:

* 16-bit float operands: every product of two float16 (11-bit significands) or bfloat16
  (8-bit) values is exact in float32, so a float32 GEMM of the upcast operands, or a CUDA
  tensor-core GEMM with float32 accumulation and float32 output (``torch.mm(...,
  out_dtype=torch.float32)``), differs from the device only in summation order.
* int8 operands: ``torch._int_mm`` on CUDA (exact int32 accumulation); elsewhere float32
  GEMMs on chunks of k short enough that every partial sum is an exact integer
  (:func:`mc2sim.kernels.quant_matmul.exact_int_matmul`).
"""

from __future__ import annotations

import numpy as np
import torch

from mc2sim.errors import ParamInvalidError

__all__ = [
    "cpu_gemm",
    "from_host",
    "int8_matmul",
    "mm_float32",
    "same_device",
    "uses_cuda_int8",
]

_HALF = (torch.float16, torch.bfloat16)
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.bmm, "dtype")
"""Whether this torch has ``mm``/``bmm`` with ``out_dtype`` (torch >= 2.8, CUDA only)."""
_INT_MM_MIN_ROWS = 17
"""``torch._int_mm`` on CUDA needs more than 16 rows ..."""
_INT_MM_ALIGN = 8
"""... and n a multiple of 8; other problems are zero-padded (exactly) ..."""
_INT_MM_K_ALIGN = 32
"""... and k a multiple of 32 (the H200's cuBLASLt refused k = 112)."""


def same_device(
    first: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor | None]
) -> torch.device:
    """Return the device of the first tensor; raise unless every other one is there too.

    Args:
        first: ``(parameter name, tensor)`` of the input whose device the others must share.
        *others: ``(parameter name, tensor or None)`` pairs; None entries (absent optional
            inputs) and non-tensors (refused by other checks) are skipped.

    Returns:
        The first tensor's device.

    Raises:
        ParamInvalidError: a tensor lies on another device (161002), naming its parameter.

    """
    first_name, tensor = first
    device = tensor.device
    for name, t in others:
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ParamInvalidError(
                f"{name}.device",
                str(t.device),
                f"must be {device}, the device of {first_name}: kernels compute where their "
                "inputs live and never copy between devices",
            )
    return device


def from_host(
    values: object, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Return host metadata (index lists, lengths, flags) as a tensor on ``device``.

    On an accelerator the copy is issued non-blocking from pageable memory. A blocking copy
    (``torch.tensor(values, device=...)``) waits for every kernel queued before it, so a
    kernel that moved its metadata that way would synchronize the host with the device on
    every call; CUDA stages a pageable host-to-device copy before the call returns (no
    device synchronization), so the host tensor may go at once. Measured on an H200 behind
    4.5 ms of queued GEMMs: 212 us per blocking copy, 84 us through pinned memory, 9.6 us
    pageable non-blocking (docs/BENCHMARKS.md).

    Args:
        values: a list (nested lists) of numbers, or a CPU tensor.
        device: where the tensor is needed.
        dtype: the tensor's dtype (default: torch's for ``values``).

    Returns:
        The tensor on ``device``.
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type == "cpu":
        return host
    return host.to(device, non_blocking=True)  # pragma: no cover - accelerators


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return ``a @ b`` in float32: exact products, float32 accumulation.

    Args:
        a: ``(m, k)`` or ``(batch, m, k)``, float16, bfloat16 or float32.
        b: ``(k, n)`` or ``(batch, k, n)`` of ``a``'s dtype, on ``a``'s device; any strides.

    Returns:
        The float32 product on ``a``'s device.

    """
    if a.is_cuda and a.dtype in _HALF and _HAS_MM_OUT_DTYPE:  # pragma: no cover - CUDA only
        # tensor cores, float32 accumulation and float32 output: no 16-bit rounding inside
        if a.dim() == 2:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.matmul(a.float(), b.float())


def cpu_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 2-D float32 CPU matrices by numpy's GEMM (the BLAS of its wheel).

    The same arithmetic as ``torch.matmul`` (float32 products and sums, summation order
    unspecified), through the library the kernels' targets are measured against: on this
    project's AMD host torch's CPU build runs a large float32 GEMM through MKL about 20%
    slower than numpy's OpenBLAS (2048 x 4096 x 4096: 440 to 455 against 360 to 390 ms).
    Used where that GEMM is one large product (weight_quant_batchmatmul); the grouped
    matmul's expert-by-panel products ran slower this way (docs/BENCHMARKS.md).

    Args:
        a: float32 ``(m, k)`` on the CPU; any strides.
        b: float32 ``(k, n)`` on the CPU; any strides.

    Returns:
        The float32 ``(m, n)`` product.
    """
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def uses_cuda_int8(a: torch.Tensor) -> bool:
    """Whether :func:`int8_matmul` takes the CUDA integer path for ``a``'s device."""
    return a.is_cuda and hasattr(torch, "_int_mm")


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - CUDA
    """Exact int32 ``a @ b`` of 2-D int8 matrices on CUDA (``torch._int_mm``).

    ``torch._int_mm`` needs more than 16 rows and k, n multiples of 8; a smaller or unaligned
    problem is padded with zeros, which adds nothing to any dot product.

    Args:
        a: int8 ``(m, k)`` on a CUDA device.
        b: int8 ``(k, n)`` on the same device; any strides.

    Returns:
        The int32 ``(m, n)`` product.

    """
    m, k = a.shape
    n = b.shape[1]
    mp = max(m, _INT_MM_MIN_ROWS)
    # k to a multiple of 32: cuBLASLt's int8 GEMM on an H200 refused k = 112 (a multiple of
    # 8 and 16) with CUBLAS_STATUS_NOT_SUPPORTED, at 17 and 24 rows and n = 256
    kp = -(-k // _INT_MM_K_ALIGN) * _INT_MM_K_ALIGN
    np_ = -(-n // _INT_MM_ALIGN) * _INT_MM_ALIGN
    if (mp, kp) != (m, k):
        padded = torch.zeros((mp, kp), dtype=torch.int8, device=a.device)
        padded[:m, :k] = a
        a = padded
    if (kp, np_) != (k, n):
        padded = torch.zeros((kp, np_), dtype=torch.int8, device=b.device)
        padded[:k, :n] = b
        b = padded
    try:
        out = torch._int_mm(a, b)
    except RuntimeError:  # a layout cuBLASLt's int8 GEMM does not take: row-major copies
        out = torch._int_mm(a.contiguous(), b.contiguous())
    return out[:m, :n]
