"""A grouped GEMM for CUDA in Triton, with its last wave split along K.

Where each expert owns a few hundred rows, a grouped GEMM is a few hundred output tiles, and
the GPU runs them in waves of one tile per multiprocessor: 288 tiles of 128 x 256 on the
H200's 132 multiprocessors are two full waves and a third of 24 tiles, which takes as long
as a full one (CUTLASS's grouped GEMM behind ``torch._grouped_mm`` and a plain Triton kernel
both took 137 us there, against 86 us for one GEMM of the same FLOPs in two waves). Here the
tiles of that last wave are split along K into parts that fill the multiprocessors
(split-K: each part sums its share of K in float32, and a second kernel adds the parts in
order and rounds, a few rows of a tile per program), so the last wave takes a fraction of a
full one. Both are launched through :class:`mc2sim.kernels._triton_launch.KernelLaunch`
(Triton's own launch path cost more host time per call than the kernels' GPU time at this
size), and the tile table is moved to the device once per routing's counts.

The arithmetic is the matrix unit's: exact products of the 16-bit operands, float32
accumulation (split or not, only the summation order differs), one rounding to the output
dtype. Deterministic: the parts are added in a fixed order, never by atomics.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from mc2sim.kernels._cache import put_bounded
from mc2sim.kernels._device import from_host
from mc2sim.kernels._triton_launch import (
    KernelLaunch,
    current_stream,
    device_index,
    launching_on,
    multiprocessors,
    workspace,
)

__all__ = ["grouped_gemm", "plan_split", "row_tiles"]

BLOCK_M, BLOCK_N, BLOCK_K = 128, 256, 64
"""The output tile and the K step (the fastest of the configurations timed on the H200)."""
WARPS, STAGES = 8, 4
ADD_ROWS, ADD_WARPS, ADD_STAGES = 8, 4, 3
"""Rows of a split tile per program of the adding kernel, its warps and pipeline depth: a
tile's 5 float32 parts are 640 KiB, slow for one multiprocessor to read (the bench's A=4096
on the H200: 128 rows per program 0.71 to 0.74 of one GEMM's throughput, 8 rows 0.78 to
0.79; docs/BENCHMARKS.md)."""
MIN_PART_STEPS = 4
"""A split part sums at least this many K steps (shorter parts cost more than they save)."""
_TILES_CONSTEXPRS = ("NUM_N", "BM", "BN", "BK", "EVEN_K", "EVEN_N")
"""The tile kernel's constexpr parameters, in order."""
_ADD_CONSTEXPRS = ("NUM_N", "BM", "BN", "ROWS")
"""The adding kernel's constexpr parameters, in order."""
_TABLES: dict[tuple[object, ...], torch.Tensor] = {}
"""Row tile tables already on a device, by device and counts: the layers of a step share the
routing's counts. Bounded by :data:`_TABLES_MAX`."""
_TABLES_MAX = 64


@triton.jit
def _tiles(  # pragma: no cover - CUDA
    x_ptr, w_ptr, out_ptr, part_ptr, table_ptr,
    n, k,
    sxm, sxk, swe, swk, swn, som, son,
    whole, split, part_k,
    NUM_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """One program per whole tile, then ``split`` per tile of the last wave (a K range each).

    ``EVEN_K``, ``EVEN_N``: K and N are multiples of the block's, so only rows are masked.
    """
    pid = tl.program_id(0)
    is_part = pid >= whole
    unit = tl.maximum(pid - whole, 0)
    tile = tl.where(is_part, whole + unit // split, pid)
    k0 = tl.where(is_part, (unit % split) * part_k, 0)
    k1 = tl.where(is_part, tl.minimum(k, k0 + part_k), k)
    m_tile = tile // NUM_N
    expert = tl.load(table_ptr + 3 * m_tile)
    row0 = tl.load(table_ptr + 3 * m_tile + 1)
    row1 = tl.load(table_ptr + 3 * m_tile + 2)
    rm = row0 + tl.arange(0, BM)
    rn = (tile % NUM_N) * BN + tl.arange(0, BN)
    rk = k0 + tl.arange(0, BK)
    in_m = rm < row1
    in_n = rn < n
    # 64-bit offsets: an (H, N) weight of the largest shapes holds more than 2**31 elements
    rk64, rn64 = rk.to(tl.int64), rn.to(tl.int64)
    xp = x_ptr + rm[:, None].to(tl.int64) * sxm + rk64[None, :] * sxk
    wp = w_ptr + expert.to(tl.int64) * swe + rk64[:, None] * swk + rn64[None, :] * swn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k_at in range(k0, k1, BK):
        if EVEN_K and EVEN_N:
            a = tl.load(xp, mask=in_m[:, None], other=0.0)
            b = tl.load(wp)
        elif EVEN_K:
            a = tl.load(xp, mask=in_m[:, None], other=0.0)
            b = tl.load(wp, mask=in_n[None, :], other=0.0)
        else:
            in_k = rk < k1 - (k_at - k0)
            a = tl.load(xp, mask=in_m[:, None] & in_k[None, :], other=0.0)
            b = tl.load(wp, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        xp += BK * sxk
        wp += BK * swk
    if pid < whole:
        op = out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :].to(tl.int64) * son
        tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
    else:
        local = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        tl.store(part_ptr + (pid - whole).to(tl.int64) * (BM * BN) + local, acc)


@triton.jit
def _add_parts(  # pragma: no cover - CUDA
    out_ptr, part_ptr, table_ptr, n, som, son, whole, split,
    NUM_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Sum a split tile's parts in order, in float32, and round once into the output.

    One program per ``ROWS`` rows of a split tile (``BM // ROWS`` programs per tile): the
    parts of a tile are many rows of float32 to read, more than one multiprocessor reads
    quickly.
    """
    t = tl.program_id(0)
    r0 = tl.program_id(1) * ROWS
    tile = whole + t
    m_tile = tile // NUM_N
    row0 = tl.load(table_ptr + 3 * m_tile + 1)
    row1 = tl.load(table_ptr + 3 * m_tile + 2)
    if row0 + r0 < row1:  # rows past the expert's: nothing to add
        lr = r0 + tl.arange(0, ROWS)
        rm = row0 + lr
        rn = (tile % NUM_N) * BN + tl.arange(0, BN)
        local = lr[:, None] * BN + tl.arange(0, BN)[None, :]
        acc = tl.zeros((ROWS, BN), dtype=tl.float32)
        for s in range(split):
            acc += tl.load(part_ptr + (t * split + s).to(tl.int64) * (BM * BN) + local)
        op = out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :].to(tl.int64) * son
        inside = (rm < row1)[:, None] & (rn < n)[None, :]
        tl.store(op, acc.to(out_ptr.dtype.element_ty), mask=inside)


def plan_split(tiles: int, k: int, multiprocessors: int) -> tuple[int, int]:
    """``(whole, split)``: tiles run whole, and parts along K of each tile of the last wave.

    The tiles beyond the last full wave (all of them when there are fewer than one wave)
    are cut into ``split`` parts, as many as fill the multiprocessors, each at least
    :data:`MIN_PART_STEPS` K steps long; ``split`` 1 means no tile is cut.
    """
    rest = tiles % multiprocessors
    steps = -(-k // BLOCK_K)
    split = min(multiprocessors // rest, steps // MIN_PART_STEPS) if rest else 1
    if split <= 1:
        return tiles, 1
    return tiles - rest, split


def row_tiles(counts: list[int], block: int) -> list[int]:
    """Flat ``(expert, first row, end row)`` of every ``block``-row tile of every expert."""
    table: list[int] = []
    starts = itertools.accumulate(counts, initial=0)
    for j, (start, c) in enumerate(zip(starts, counts, strict=False)):
        for r in range(start, start + c, block):
            table += (j, r, min(r + block, start + c))
    return table


def grouped_gemm(  # pragma: no cover - CUDA
    x: torch.Tensor, weight: torch.Tensor, counts: list[int], trans_weight: bool
) -> torch.Tensor:
    """``out[rows of j] = x[rows of j] @ weight[j]`` (``weight[j].T`` if ``trans_weight``).

    Args:
        x: ``(A, H)`` float16 or bfloat16 on a CUDA device, A > 0.
        weight: ``(e, H, N)``, or ``(e, N, H)`` when ``trans_weight``; x's dtype and device.
        counts: rows per expert, summing to A.
        trans_weight: whether ``weight`` is stored as ``(e, N, H)``.

    Returns:
        ``(A, N)`` of x's dtype.
    """
    h = x.shape[1]
    if trans_weight:  # (e, N, H) read as (e, H, N) through its strides
        n = weight.shape[1]
        swe, swk, swn = weight.stride(0), weight.stride(2), weight.stride(1)
    else:
        n = weight.shape[2]
        swe, swk, swn = weight.stride(0), weight.stride(1), weight.stride(2)
    device = x.device
    index = device_index(device)
    table = _table(counts, device)
    num_n = -(-n // BLOCK_N)
    tiles = table.shape[0] // 3 * num_n
    whole, split = plan_split(tiles, h, multiprocessors(index))
    cut = tiles - whole
    steps = -(-h // BLOCK_K)
    part_k = -(-steps // split) * BLOCK_K  # whole K steps per part
    stream = current_stream(index)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=device)
    parts = workspace(index, stream, max(1, cut * split * BLOCK_M * BLOCK_N))
    with launching_on(index):
        KernelLaunch(
            _tiles, _TILES_CONSTEXPRS, (whole + cut * split,), index,
            (x.dtype, weight.dtype, x.dtype, torch.float32, torch.int32),
            (n, h, x.stride(0), x.stride(1), swe, swk, swn, out.stride(0), out.stride(1),
             whole, split, part_k),
            (num_n, BLOCK_M, BLOCK_N, BLOCK_K, h % BLOCK_K == 0, n % BLOCK_N == 0),
            (WARPS, STAGES),
        )(stream, (x, weight, out, parts, table))  # fmt: skip
        if cut:
            KernelLaunch(
                _add_parts, _ADD_CONSTEXPRS, (cut, BLOCK_M // ADD_ROWS), index,
                (x.dtype, torch.float32, torch.int32),
                (n, out.stride(0), out.stride(1), whole, split),
                (num_n, BLOCK_M, BLOCK_N, ADD_ROWS),
                (ADD_WARPS, ADD_STAGES),
            )(stream, (out, parts, table))  # fmt: skip
    return out


def _table(counts: list[int], device: torch.device) -> torch.Tensor:  # pragma: no cover - CUDA
    """:func:`row_tiles` of ``counts`` as int32 on ``device`` (cached by value)."""
    key = (device, *counts)
    found = _TABLES.get(key)
    if found is None:
        found = from_host(row_tiles(counts, BLOCK_M), device, torch.int32)
        put_bounded(_TABLES, key, found, _TABLES_MAX)
    return found
