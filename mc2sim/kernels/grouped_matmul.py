"""Grouped matmul of MoE experts: consecutive row blocks of x times one weight per expert."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch

from mc2sim.kernels._device import from_host, mm_float32, same_device
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank

__all__ = ["MAX_DIM", "grouped_matmul"]

MAX_DIM = 65535
"""Largest H and N (OPS.md section 3: H1 and N1 in (0, 65536))."""

PANEL = 1024
"""Output columns converted and multiplied per step (bounds the float32 weight buffer)."""

ROW_BLOCK_BYTES = 1 << 20
"""Bytes of float32 output a CPU panel product makes per step (rows enough to fill it, and
at least H rows), so the product is still in a core's cache when rounded into the output:
an expert of 3280 rows, H 64 and 1024 columns, 13 MiB at once, ran at 56 against 97
GFLOP/s (docs/BENCHMARKS.md)."""

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)


def _counts(group_list: Sequence[int] | torch.Tensor) -> list[int]:
    """Return group_list as a list of Python ints, or raise ParamInvalidError."""
    if isinstance(group_list, torch.Tensor):
        require_dtype("group_list", group_list, (torch.int32, torch.int64))
        require_rank("group_list", group_list, (1,))
        return [int(c) for c in group_list.tolist()]
    items = list(group_list)
    require(
        "group_list",
        items,
        all(isinstance(c, int) and not isinstance(c, bool) for c in items),
        "must be a sequence of ints or a 1-D int32/int64 tensor",
    )
    return items


def _grouped_gemm(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int], trans_weight: bool
) -> torch.Tensor | None:
    """One grouped GEMM for every expert on CUDA, or None where that path does not apply.

    Triton's (:mod:`mc2sim.kernels._gmm_triton`, its last wave split along K) where Triton
    imports, else CUTLASS's through ``torch._grouped_mm``.
    """
    if not (x.is_cuda and x.dtype in _HALF):
        return None
    triton_gemm = _triton_grouped_gemm()
    if triton_gemm is not None:  # pragma: no cover - CUDA
        return triton_gemm(x, weight, counts, trans_weight)
    if not hasattr(torch, "_grouped_mm"):
        return None
    return _cuda_grouped_gemm(x, weight, counts, trans_weight)


@functools.cache
def _triton_grouped_gemm() -> (
    Callable[[torch.Tensor, torch.Tensor, list[int], bool], torch.Tensor] | None
):
    """The Triton grouped GEMM, or None where Triton is not installed (imported on first use)."""
    try:
        from mc2sim.kernels._gmm_triton import grouped_gemm
    except ImportError:
        return None
    return grouped_gemm  # pragma: no cover - Triton


def _cuda_grouped_gemm(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int], trans_weight: bool
) -> torch.Tensor | None:  # pragma: no cover - CUDA only
    """``torch._grouped_mm``: CUTLASS's grouped GEMM, one launch for all experts.

    It accumulates the 16-bit products in float32 and rounds once to the output dtype, as
    the per-expert path does (bitwise the same result on an H200, docs/BENCHMARKS.md).
    None if it refuses the call (alignment, architecture): the caller goes expert by expert.
    """
    ends = from_host(list(itertools.accumulate(counts)), x.device, torch.int32)
    mat_b = weight.transpose(-2, -1) if trans_weight else weight
    try:
        return torch._grouped_mm(x, mat_b, offs=ends, out_dtype=x.dtype)
    except RuntimeError:
        return None


def grouped_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_list: Sequence[int] | torch.Tensor,
    *,
    trans_weight: bool = False,
) -> torch.Tensor:
    """Multiply each expert's block of rows of ``x`` by that expert's weight.

    ``group_list`` holds per-expert row **counts**, not cumulative offsets (torch_npu's
    ``group_list_type=1``): expert ``j`` owns rows ``[sum(c[:j]), sum(c[:j+1]))`` of ``x`` and
    ``out[rows] = x[rows] @ weight[j]`` (``@ weight[j].T`` when ``trans_weight``). Computed
    as the matrix unit does: exact products, float32 accumulation (summation order
    unspecified), then rounded once to ``x.dtype`` (round to nearest even). Experts with zero
    rows are skipped. Runs on ``x``'s device and returns there (CUDA: one grouped
    tensor-core GEMM for all experts, its last wave split along K, or one GEMM per expert
    with float32 output).

    Only the per-operator limits that do not depend on the communication group are checked
    here (H and N in [1, 65535], counts invariant); e <= 32, the send/recv count rules and the
    world-size limits belong to the fused operator.

    Args:
        x: ``(A, H)``, float16, bfloat16 or float32; any strides; A may be 0.
        weight: same dtype as ``x``; ``(e, H, N)``, or ``(e, N, H)`` when ``trans_weight``.
        group_list: ``e`` non-negative row counts (a sequence of ints or a 1-D int32/int64
            tensor) summing to ``A``.
        trans_weight: whether ``weight`` is stored as ``(e, N, H)``.

    Returns:
        ``(A, N)`` tensor of ``x.dtype`` on ``x``'s device.

    Raises:
        ParamNullptrError: ``x``, ``weight`` or ``group_list`` is None.
        ParamInvalidError: a dtype, rank or shape mismatch, H or N outside [1, 65535], a
            negative count, ``len(group_list) != e`` or ``sum(group_list) != A``, or
            ``weight`` (or a ``group_list`` tensor) on another device than ``x``.

    """
    require_not_none("x", x)
    require_not_none("weight", weight)
    require_not_none("group_list", group_list)
    device = same_device(
        ("x", x),
        ("weight", weight),
        ("group_list", group_list if isinstance(group_list, torch.Tensor) else None),
    )
    require_dtype("x", x, _FLOAT_DTYPES)
    require_dtype("weight", weight, (x.dtype,))
    require_rank("x", x, (2,))
    require_rank("weight", weight, (3,))
    require("trans_weight", trans_weight, isinstance(trans_weight, bool), "must be a bool")
    rows, h = x.shape
    e = weight.shape[0]
    wh, n = (weight.shape[2], weight.shape[1]) if trans_weight else weight.shape[1:]
    require("x.shape", tuple(x.shape), 1 <= h <= MAX_DIM, f"H must be in [1, {MAX_DIM}]")
    require(
        "weight.shape",
        tuple(weight.shape),
        wh == h,
        f"must be (e, {'N, H' if trans_weight else 'H, N'}) with H = x's H = {h}",
    )
    require("weight.shape", tuple(weight.shape), e >= 1, "must have at least one expert")
    require("weight.shape", tuple(weight.shape), 1 <= n <= MAX_DIM, f"N must be in [1, {MAX_DIM}]")
    counts = _counts(group_list)
    require("group_list", counts, len(counts) == e, f"must have one count per expert (e={e})")
    require("group_list", counts, all(c >= 0 for c in counts), "counts must be >= 0")
    require(
        "group_list",
        counts,
        sum(counts) == rows,
        f"counts (not cumulative) must sum to x's rows A={rows}",
    )

    if rows and device.type != "cpu":
        fused = _grouped_gemm(x, weight, counts, trans_weight)
        if fused is not None:  # pragma: no cover - CUDA
            return fused
    out = torch.empty((rows, n), dtype=x.dtype, device=device)
    if rows == 0:
        return out
    if device.type != "cpu":
        start = 0
        for j, c in enumerate(counts):
            if c:
                w = weight[j].t() if trans_weight else weight[j]
                out[start : start + c].copy_(mm_float32(x[start : start + c], w))
            start += c
        return out
    # Fresh CPU memory costs a page fault per 4 KiB on first touch, so the float32 copies
    # live in small buffers reused across experts; the weight is converted one panel of at
    # most PANEL output columns at a time, and each panel's product is made ROW_BLOCK_BYTES
    # of float32 output at a time, so that it is still in cache when rounded into ``out``.
    widest = max(counts)
    panel = min(n, PANEL)
    # at least h rows a block: each block re-reads the weight panel (h x width), no more
    # bytes than the block's own output
    block = max(1, ROW_BLOCK_BYTES // (4 * panel), h)
    x_buf = torch.empty((widest, h), dtype=torch.float32)
    w_buf = torch.empty(h * panel, dtype=torch.float32)  # flat: every panel view contiguous
    y_buf = torch.empty(min(widest, block) * panel, dtype=torch.float32)
    start = 0
    for j, c in enumerate(counts):
        if c == 0:
            continue
        xs = x_buf[:c]
        xs.copy_(x[start : start + c])
        for n0 in range(0, n, panel):
            width = min(panel, n - n0)
            if trans_weight:
                wp = w_buf[: width * h].view(width, h).copy_(weight[j, n0 : n0 + width]).t()
            else:
                wp = w_buf[: h * width].view(h, width).copy_(weight[j, :, n0 : n0 + width])
            for r0 in range(0, c, block):
                r1 = min(c, r0 + block)
                ys = y_buf[: (r1 - r0) * width].view(r1 - r0, width)
                torch.matmul(xs[r0:r1], wp, out=ys)
                out[start + r0 : start + r1, n0 : n0 + width].copy_(ys)
        start += c
    return out
