"""The fused CUDA path of incre_flash_attention: two Triton kernels, no torch composition.

Imported only when the query lies on a CUDA device and ``triton`` imports; the CPU path and
any input this does not cover (INT8 key/value, INT8 output, tensor-list key/value, head
dimensions over 256) keep the torch composition of :mod:`mc2sim.kernels.ifa`.

The rounding points are :func:`mc2sim.kernels.ifa._attend`'s, with the window's own maximum
(not a running one): a flash softmax that rounds ``exp(s - m)`` to 16 bits against each
chunk's maximum and rescales afterwards changes about half of the float16 outputs by an ulp
or more against the reference, so the maximum is found first. Two launches, split over the
KV positions (flash decoding) so that a small batch still fills the GPU:

1. :func:`_scores_kernel`, one program per (batch, KV head, split of the positions): the
   scores ``q k^T`` of the KV head's query group (tensor cores: exact products of the 16-bit
   inputs, float32 sums), times ``scale_value`` in float32, plus ``pse_shift`` in float32,
   ``-1e12`` where ``atten_mask`` is 1, ``-inf`` outside the window; written as float32 to a
   workspace with each split's maximum.
2. :func:`_values_kernel`, the same grid: the window's maximum from the splits' maxima,
   ``p = exp(s - max)`` in float32, its float32 sum, ``p`` rounded to the query's dtype and
   multiplied by the values (tensor cores, float32 sums); each split writes its partial sum
   and weighted sum, and the split that finishes last for a (batch, KV head) (an atomic
   counter) adds the splits' partials in order, divides, zeroes empty windows and rounds once
   to the query's dtype (round to nearest even).

The scores round trip (float32, G values per position) costs ``4 * G / (2 * D)`` of reading
the keys again (1/16 at G=4, D=128). Block ids are read from the caller's INT32 table and
clamped into ``[0, blocknum)``, so the kernel never reads outside the cache whatever the
table holds (the checks reject an out-of-range id in use before the launch).

Host time: a decode step at a small batch takes less GPU time (about 65 us at B=4 on the
H200) than Python took to check and launch it, so :func:`prepare` fixes both launches from a
plan once (:class:`IfaLaunch`, launched directly by
:class:`mc2sim.kernels._triton_launch.KernelLaunch`) and :func:`run` only queues them;
:mod:`mc2sim.kernels.ifa` keeps a checked call's launches for the calls of its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    from triton.language.extra.cuda import libdevice

from mc2sim.kernels._cache import put_bounded
from mc2sim.kernels._device import from_host
from mc2sim.kernels._ifa_plan import IfaPlan
from mc2sim.kernels._ifa_sources import DenseKV, PagedKV
from mc2sim.kernels._triton_launch import (
    KernelLaunch,
    current_stream,
    device_index,
    launching_on,
    multiprocessors,
    workspace,
)

__all__ = ["MAX_HEAD_DIM", "IfaLaunch", "attend", "prepare", "run", "supported"]

MAX_HEAD_DIM = 256
"""Larger head dimensions take the torch composition (one program holds D float32 sums per
query head of its group)."""
_PROGRAMS_PER_SM = 4
"""The KV positions are split until about this many programs per SM run."""
_TILE = 128
"""KV positions per step of a program (half that above D=128; a divisor of the block size)."""
_NUM_WARPS = 4
"""Warps per program (twice that when a query group's float32 sums exceed 4096 values)."""
_NUM_STAGES = 3
"""Software pipeline depth of the programs' loops (Triton's ``num_stages``)."""
_WINDOWS: dict[tuple[object, ...], torch.Tensor] = {}
"""Per-batch window bounds already on a device, by value: a decode step reuses them in
every layer. Bounded by :data:`_WINDOWS_MAX`."""
_WINDOWS_MAX = 64
_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
"""Per (device, stream): int32 zeros, one per (batch, KV head), that the values kernel's
last split resets after use."""
_SCORES_CONSTEXPRS = ("PAGED", "PAGE", "HAS_MASK", "HAS_PSE", "G_PAD", "D_PAD", "BLOCK_N")
"""The scores kernel's constexpr parameters, in order."""
_VALUES_CONSTEXPRS = ("PAGED", "PAGE", "G_PAD", "D_PAD", "S_PAD", "BLOCK_N")
"""The values kernel's constexpr parameters, in order."""


@triton.jit
def _program_start(
    win_ptr,
    n_kv,
    group,
    dim,
    batch,
    split_len,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):  # pragma: no cover - compiled by Triton for the GPU
    """Where a program of either kernel starts: its place in the grid, its window, its heads.

    Returns ``(row, split, b, kvh, start, end, lo, hi, g, d, g_ok, d_ok)``: the program's
    (batch, KV head) row and split of the positions, that batch and KV head, the batch's
    window ``[start, end)``, the split's share of it ``[lo, hi)``, the query group's head and
    the head dimension's offsets (padded to ``G_PAD`` and ``D_PAD``) and which are real.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // n_kv
    kvh = row % n_kv
    start = tl.load(win_ptr + b)
    end = tl.load(win_ptr + batch + b)
    lo = tl.maximum(split * split_len, start)
    hi = tl.minimum((split + 1) * split_len, end)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < group
    d_ok = d < dim
    return row, split, b, kvh, start, end, lo, hi, g, d, g_ok, d_ok


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    table_ptr,
    win_ptr,
    mask_ptr,
    pse_ptr,
    ws_ptr,
    n_kv,
    group,
    dim,
    length,
    batch,
    split_len,
    n_split,
    blocknum,
    sq_b,
    sq_h,
    sq_d,
    sk_b,
    sk_p,
    sk_h,
    sk_d,
    st_b,
    st_j,
    sm_b,
    sm_s,
    sp_b,
    sp_h,
    sp_s,
    scale,
    max_off,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSE: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # pragma: no cover - compiled by Triton for the GPU
    row, split, b, kvh, _, _, lo, hi, g, d, g_ok, d_ok = _program_start(
        win_ptr, n_kv, group, dim, batch, split_len, G_PAD, D_PAD
    )
    heads = kvh * group + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    score_rows = ws_ptr + (row * group + g).to(tl.int64) * length
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for p0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        pos = p0 + n
        valid = (pos >= lo) & (pos < hi)
        if PAGED:
            block = tl.load(table_ptr + b.to(tl.int64) * st_b + (p0 // PAGE) * st_j)
            block = tl.minimum(tl.maximum(block, 0), blocknum - 1).to(tl.int64)
            base = k_ptr + block * sk_b + (pos % PAGE) * sk_p
        else:
            base = k_ptr + b.to(tl.int64) * sk_b + pos.to(tl.int64) * sk_p
        k = tl.load(
            base[:, None] + kvh * sk_h + d[None, :] * sk_d,
            mask=valid[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * scale
        if HAS_PSE:
            pse = tl.load(
                pse_ptr + b * sp_b + heads[:, None] * sp_h + pos[None, :] * sp_s,
                mask=g_ok[:, None] & valid[None, :],
                other=0.0,
            )
            s = s + pse.to(tl.float32)
        if HAS_MASK:
            masked = tl.load(mask_ptr + b * sm_b + pos * sm_s, mask=valid, other=0)
            s = tl.where((masked != 0)[None, :], -1e12, s)  # ifa.MASKED_SCORE
        s = tl.where(valid[None, :], s, float("-inf"))
        tl.store(score_rows[:, None] + pos[None, :], s, mask=g_ok[:, None] & valid[None, :])
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
    tl.store(ws_ptr + max_off + (row * group + g) * n_split + split, m_i, mask=g_ok)


@triton.jit
def _values_kernel(
    v_ptr,
    table_ptr,
    win_ptr,
    ws_ptr,
    out_ptr,
    count_ptr,
    n_kv,
    group,
    dim,
    length,
    batch,
    split_len,
    n_split,
    blocknum,
    sv_b,
    sv_p,
    sv_h,
    sv_d,
    st_b,
    st_j,
    max_off,
    acc_off,
    sum_off,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # pragma: no cover - compiled by Triton for the GPU
    row, split, b, kvh, start, end, lo, hi, g, d, g_ok, d_ok = _program_start(
        win_ptr, n_kv, group, dim, batch, split_len, G_PAD, D_PAD
    )
    rows = row * group + g
    splits = tl.arange(0, S_PAD)
    maxima = tl.load(
        ws_ptr + max_off + rows[:, None] * n_split + splits[None, :],
        mask=g_ok[:, None] & (splits < n_split)[None, :],
        other=float("-inf"),
    )
    m = tl.max(maxima, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty windows: every p is 0
    score_rows = ws_ptr + rows.to(tl.int64) * length
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for p0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        pos = p0 + n
        valid = (pos >= lo) & (pos < hi)
        s = tl.load(
            score_rows[:, None] + pos[None, :],
            mask=g_ok[:, None] & valid[None, :],
            other=float("-inf"),
        )
        p = libdevice.exp(s - m[:, None])  # CUDA's expf, as torch's exp
        total += tl.sum(p, axis=1)
        if PAGED:
            block = tl.load(table_ptr + b.to(tl.int64) * st_b + (p0 // PAGE) * st_j)
            block = tl.minimum(tl.maximum(block, 0), blocknum - 1).to(tl.int64)
            base = v_ptr + block * sv_b + (pos % PAGE) * sv_p
        else:
            base = v_ptr + b.to(tl.int64) * sv_b + pos.to(tl.int64) * sv_p
        v = tl.load(
            base[:, None] + kvh * sv_h + d[None, :] * sv_d,
            mask=valid[:, None] & d_ok[None, :],
            other=0.0,
        )
        # rounding point: the unnormalized probabilities in the query's (= values') dtype
        acc = tl.dot(p.to(v.dtype), v, acc)
    part = (rows * n_split + split).to(tl.int64)
    tl.store(
        ws_ptr + acc_off + part[:, None] * dim + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :]
    )
    tl.store(ws_ptr + sum_off + part, total, mask=g_ok)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
    if done == n_split - 1:  # the last split of this (batch, KV head): add up, in order
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        for i in range(0, n_split):
            part = (rows * n_split + i).to(tl.int64)
            acc += tl.load(
                ws_ptr + acc_off + part[:, None] * dim + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            total += tl.load(ws_ptr + sum_off + part, mask=g_ok, other=1.0, cache_modifier=".cg")
        out = acc / total[:, None]
        out = tl.where(end > start, out, 0.0)
        tl.store(
            out_ptr + (b.to(tl.int64) * n_kv * group + kvh * group + g[:, None]) * dim + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )
        tl.atomic_xchg(count_ptr + row, 0)


def _windows(plan: IfaPlan, device: torch.device) -> torch.Tensor:
    """The windows' starts then ends, int32 ``(2 * B,)`` on ``device`` (cached by value)."""
    key = (device, plan.starts, plan.ends)
    found = _WINDOWS.get(key)
    if found is None:
        found = from_host([*plan.starts, *plan.ends], device, torch.int32)
        put_bounded(_WINDOWS, key, found, _WINDOWS_MAX)
    return found


def _counters(index: int, stream: int, rows: int) -> torch.Tensor:
    """Zeroed int32 counters for ``rows`` (batch, KV head) pairs on ``stream``."""
    key = (index, stream)
    found = _COUNTERS.get(key)
    if found is None or found.numel() < rows:
        found = torch.zeros(max(rows, 1024), dtype=torch.int32, device=torch.device("cuda", index))
        _COUNTERS[key] = found
    return found


def supported(plan: IfaPlan) -> bool:
    """Whether the fused kernels cover ``plan`` (else the torch composition runs)."""
    return (
        plan.key_antiquant is None
        and plan.quant_scale2 is None
        and plan.head_dim <= MAX_HEAD_DIM
        and isinstance(plan.key, (DenseKV, PagedKV))
        and isinstance(plan.value, (DenseKV, PagedKV))
        and plan.length > 0
    )


def _pow2(n: int, floor: int) -> int:
    """The power of two >= ``max(n, floor)``."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


@dataclass(frozen=True, kw_only=True, slots=True)
class IfaLaunch:
    """Both kernels' launches for a plan: everything a call fixes but its tensors' addresses.

    A function of the plan's shapes, strides, dtypes, windows and scale only, so one serves
    every call whose plan agrees in those (a decode step's layers, each with its own cache).
    """

    index: int
    """The CUDA device."""
    out_shape: tuple[int, ...]
    """The output's shape (the query's)."""
    out_dtype: torch.dtype
    """The output's dtype (the query's)."""
    windows: torch.Tensor
    """The windows' starts then ends, int32 on the device."""
    rows: int
    """(batch, KV head) pairs: the values kernel's counters."""
    workspace: int
    """float32 elements of workspace: the scores, the splits' maxima, partial sums."""
    scores: KernelLaunch
    """The scores kernel (tensors: query, key, table, windows, mask, pse, workspace)."""
    values: KernelLaunch
    """The values kernel (tensors: value, table, windows, workspace, output, counters)."""


def prepare(plan: IfaPlan) -> IfaLaunch:
    """Fix both kernels' launches for a plan :func:`supported` covers.

    Args:
        plan: the checked plan, its tensors on one CUDA device.

    Returns:
        The launches; :func:`run` queues them for the plan's tensors or any of the same
        shapes, strides and dtypes.
    """
    q = plan.query
    device = q.device
    batch, heads, kv_heads, dim = plan.batch, plan.num_heads, plan.num_kv_heads, plan.head_dim
    group = heads // kv_heads
    length = plan.length
    key, value = plan.key, plan.value
    g_pad = _pow2(group, 16)
    d_pad = _pow2(dim, 16)
    block_n = _TILE if d_pad <= 128 else _TILE // 2
    warps = _NUM_WARPS if g_pad * d_pad <= 4096 else 2 * _NUM_WARPS
    if isinstance(key, PagedKV) and isinstance(value, PagedKV):
        paged, page = True, key.block_size
        while page % block_n:
            block_n //= 2
        table_dtype = key.pages.raw.dtype
        st_b, st_j = key.pages.raw.stride()
        blocknum = key.pages.blocknum
        # (blocknum, blockSize, N_kv, D) strides: block, position in the block, head, dim
        kc = key.cache if not key.heads_first else key.cache.transpose(1, 2)
        vc = value.cache if not value.heads_first else value.cache.transpose(1, 2)
        sk = kc.stride()
        sv = vc.stride()
        k_dtype, v_dtype = key.cache.dtype, value.cache.dtype
    else:
        paged, page = False, 1
        table_dtype = q.dtype  # the query fills the unused slot
        st_b = st_j = 0
        blocknum = 1
        # (B, N_kv, S, D) views: batch, position, head, dim
        kv, vv = cast(DenseKV, key).view, cast(DenseKV, value).view
        sk = (kv.stride(0), kv.stride(2), kv.stride(1), kv.stride(3))
        sv = (vv.stride(0), vv.stride(2), vv.stride(1), vv.stride(3))
        k_dtype, v_dtype = kv.dtype, vv.dtype
    # (B, N, D): always a view of the query (a size-1 axis dropped, H split into N and D)
    q_strides = q.reshape(batch, heads, dim).stride()
    rows = batch * kv_heads
    index = device_index(device)
    tiles = -(-length // block_n)
    n_split = max(1, min(tiles, -(-_PROGRAMS_PER_SM * multiprocessors(index) // rows)))
    split_len = -(-tiles // n_split) * block_n
    n_split = -(-length // split_len)
    rows_g = batch * heads
    max_off = rows_g * length
    acc_off = max_off + rows_g * n_split
    sum_off = acc_off + rows_g * n_split * dim
    mask = plan.atten_mask
    mask_dtype = q.dtype if mask is None else _mask_dtype(mask)
    pse = plan.pse_shift
    sm = (0, 0) if mask is None else mask.stride()
    sp = (0, 0, 0) if pse is None else pse.stride()
    sp_b = 0 if pse is None or pse.shape[0] == 1 else sp[0]
    grid = (rows, n_split)
    options = (warps, _NUM_STAGES)
    scores = KernelLaunch(
        _scores_kernel,
        _SCORES_CONSTEXPRS,
        grid,
        index,
        (q.dtype, k_dtype, table_dtype, torch.int32, mask_dtype,
         q.dtype if pse is None else pse.dtype, torch.float32),
        (kv_heads, group, dim, length, batch, split_len, n_split, blocknum,
         q_strides[0], q_strides[1], q_strides[2], sk[0], sk[1], sk[2], sk[3], st_b, st_j,
         sm[0], sm[1], sp_b, sp[1], sp[2], plan.scale_value, max_off),
        (paged, page, mask is not None, pse is not None, g_pad, d_pad, block_n),
        options,
    )  # fmt: skip
    values = KernelLaunch(
        _values_kernel,
        _VALUES_CONSTEXPRS,
        grid,
        index,
        (v_dtype, table_dtype, torch.int32, torch.float32, plan.out_dtype, torch.int32),
        (kv_heads, group, dim, length, batch, split_len, n_split, blocknum,
         sv[0], sv[1], sv[2], sv[3], st_b, st_j, max_off, acc_off, sum_off),
        (paged, page, g_pad, d_pad, _pow2(n_split, 2), block_n),
        options,
    )  # fmt: skip
    return IfaLaunch(
        index=index,
        out_shape=plan.out_shape,
        out_dtype=plan.out_dtype,
        windows=_windows(plan, device),
        rows=rows,
        workspace=sum_off + rows_g * n_split,
        scores=scores,
        values=values,
    )


def _mask_dtype(mask: torch.Tensor) -> torch.dtype:
    """The dtype the kernel reads ``atten_mask`` as (a bool mask as its bytes)."""
    return torch.uint8 if mask.dtype == torch.bool else mask.dtype


def run(
    launch: IfaLaunch,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    table: torch.Tensor | None,
    atten_mask: torch.Tensor | None = None,
    pse_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queue both kernels on the current stream; return the output.

    Args:
        launch: :func:`prepare`'s launches for a plan of these tensors' shapes, strides and
            dtypes.
        query: the query as given.
        key: the key cache (or any view of it starting at its first element: only the
            address is read, the strides are the launch's).
        value: the value cache, likewise.
        table: the INT32 block table with page attention, else None.
        atten_mask: the plan's ``(B, S_mask)`` mask, or None.
        pse_shift: the plan's ``(1 or B, N, S_pse)`` pse, or None.

    Returns:
        The attention output shaped like the query, in its dtype.
    """
    index = launch.index
    stream = current_stream(index)
    work = workspace(index, stream, launch.workspace)
    out = torch.empty(launch.out_shape, dtype=launch.out_dtype, device=query.device)
    slot = query  # fills the slots of absent tensors (never read)
    if atten_mask is not None and atten_mask.dtype == torch.bool:
        atten_mask = atten_mask.view(torch.uint8)
    table_or = slot if table is None else table
    scores = (query, key, table_or, launch.windows, slot if atten_mask is None else atten_mask,
              slot if pse_shift is None else pse_shift, work)  # fmt: skip
    values = (value, table_or, launch.windows, work, out, _counters(index, stream, launch.rows))
    with launching_on(index):
        launch.scores(stream, scores)
        launch.values(stream, values)
    return out


def attend(plan: IfaPlan, launch: IfaLaunch | None = None) -> torch.Tensor:
    """Run the fused kernels on a plan :func:`supported` covers; return the final output.

    Args:
        plan: the checked plan, its tensors on one CUDA device.
        launch: :func:`prepare`'s launches for the plan (made here when None).

    Returns:
        The attention output shaped like the query, in its dtype.
    """
    key, value = plan.key, plan.value
    if isinstance(key, PagedKV) and isinstance(value, PagedKV):
        k_base, v_base, table = key.cache, value.cache, key.pages.raw
    else:
        k_base, v_base, table = cast(DenseKV, key).view, cast(DenseKV, value).view, None
    if launch is None:
        launch = prepare(plan)
    return run(launch, plan.query, k_base, v_base, table, plan.atten_mask, plan.pse_shift)
