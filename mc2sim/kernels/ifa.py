"""Reference IncreFlashAttention: decode attention of one query token over a KV cache."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch

from mc2sim.kernels._cache import put_bounded
from mc2sim.kernels._device import from_host, mm_float32
from mc2sim.kernels._ifa_plan import (
    IfaLayout,
    IfaPlan,
    call_key,
    check_table_entries,
    plan_incre_flash_attention,
)
from mc2sim.kernels._ifa_sources import BlockIndex, PagedKV

if TYPE_CHECKING:
    from mc2sim.kernels._ifa_triton import IfaLaunch

__all__ = ["IfaLayout", "incre_flash_attention"]

MASKED_SCORE = -1e12
"""The score a position with attention mask 1 gets (it replaces q k^T * scale + pse)."""

_CHUNK_ELEMENTS = 1 << 22
"""About how many float32 KV elements one chunk holds (16 MiB): small enough to stay in cache."""
_PER_BATCH_GEMMS = 16
"""Off the CPU, a strided KV view is multiplied batch by batch up to this many batches."""

MSD_COEFF = 127.0
"""INT8 KV: rows are scaled to this many int8 steps before the split (the kernel's
``antiqCoeff1``)."""
MSD_EXPAND = 254.0
"""INT8 KV: each further part resolves the previous residual in 1/254 (``antiquantExpandCoeff``)."""
MSD_STEPS = {0: 3, 1: 2}
"""INT8 KV: int8 parts per inner_precise (``HIGH_PRECISION_ITER_NUM``, ``ITER_NUM`` of the
IFA tiling, hicann/ops-transformer ``incre_flash_attention_tiling_base.h``)."""
MSD_EXACT_POSITIONS = 1024
"""INT8 KV: positions per chunk of the probability-by-value product; 1024 * 127 * 128 < 2**24,
so the float32 GEMM of the int8-valued parts sums exact integers, as the int32 cube does."""
FUSED_CUDA_KERNEL = True
"""On a CUDA device with Triton installed, float16/bfloat16 key/value (dense or paged) take
the fused kernels of :mod:`mc2sim.kernels._ifa_triton` (same rounding points, two launches);
``False`` forces the torch composition below (the tests compare the two)."""
_CHECKED_MAX = 256
"""At most this many checked calls' launches are kept (the oldest is forgotten first)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Checked:
    """A call that passed its checks and ran the fused kernels: what a call of its key reuses."""

    launch: IfaLaunch
    """Both kernels' launches (:func:`mc2sim.kernels._ifa_triton.prepare`)."""
    table: tuple[list[int], int] | None
    """With page attention, what the block table's entries are checked against: per batch
    the entries its length reaches, and blocknum (:func:`check_table_entries`)."""


_CHECKED: dict[tuple[object, ...], _Checked] = {}
"""Fused calls by :func:`mc2sim.kernels._ifa_plan.call_key`: a decode step calls the attention
once per layer with inputs that differ only in their data, and a call of a known key skips
the checks that key already passed and the launches' set-up (about half its host time)."""


def incre_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor | Sequence[torch.Tensor],
    value: torch.Tensor | Sequence[torch.Tensor],
    *,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    pse_shift: torch.Tensor | None = None,
    actual_seq_lengths: Sequence[int] | torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    dequant_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    dequant_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    kv_padding_size: torch.Tensor | None = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    block_size: int = 0,
    inner_precise: int = 1,
) -> torch.Tensor:
    """Attend one query token per batch to its KV cache (aclnnIncreFlashAttentionV4).

    For batch b and query head n (KV head ``n // (N / N_kv)``, grouped-query attention)::

        s[j] = (q[b, n] . k[b, j]) * scale_value + pse_shift[b, n, j]
        s[j] = -1e12                      where atten_mask[b, j] is 1
        out[b, n] = sum_j softmax(s)[j] * v[b, j]   over the window start_b <= j < end_b

    The window is ``[0, actual_seq_lengths[b])`` (the whole cache when no lengths are given);
    with left padding ``p = max(kv_padding_size[0], 0)`` it is
    ``[S - p - len_b, S - p)``, positions (and mask and pse columns) counted in the padded
    cache. A batch whose window is empty (length 0, or a negative start under left padding)
    gets an all-zero output row. A window whose every position is masked averages its values
    (all scores equal -1e12), as on the device. Cache positions outside the window (padding,
    unused page blocks) never reach the result, even if they are not finite. Optional tensors
    may be empty, which counts as absent.

    Rounded where the device rounds (docs/OPS.md, "Where the device rounds"): scores,
    pse_shift and softmax are float32; the unnormalized probabilities ``exp(s - max)`` are
    rounded to the query's dtype before the product with the values, whose float32 result is
    divided by the float32 sum of the unrounded probabilities. INT8 key/value are not
    dequantized: the query (times the key's antiquant scale) and the probabilities are split
    into int8 parts, 2 at ``inner_precise=1`` (high performance) and 3 at 0 (high precision),
    each multiplied exactly by the int8 cache, as the kernel does; the value's offset and
    scale are applied to the weighted sum. The float32 result is rounded once, to the query's
    dtype (round to nearest even), or, with ``quant_scale2``, to INT8 as
    ``clamp(round_half_even(out * quant_scale2 + quant_offset2), -128, 127)``. Computed on
    the query's device and returned there: on a CUDA device with Triton installed,
    float16/bfloat16 dense or paged key/value run as two fused kernels
    (:mod:`mc2sim.kernels._ifa_triton`, the same rounding points, :data:`FUSED_CUDA_KERNEL`);
    everything else as torch operations.

    Args:
        query: FLOAT16 or BFLOAT16, ``(B, 1, H)`` for BSH, ``(B, N, 1, D)`` for BNSD,
            ``(B, 1, N, D)`` for BSND; B <= 65536, N = ``num_heads``, D <= 512.
        key: FLOAT16, BFLOAT16 (the query's dtype) or INT8: one tensor ``(B, S, H_kv)``,
            ``(B, N_kv, S, D)`` or ``(B, S, N_kv, D)`` by layout; or a list of B tensors of
            batch 1 that may differ in S only (B <= 256); or, with page attention, one cache
            ``(blocknum, blockSize, H_kv)`` or (BNSD only) ``(blocknum, N_kv, blockSize, D)``.
        value: like ``key``, same shapes and dtype.
        padding_mask: reserved by the operator and unused; must be None.
        atten_mask: BOOL, INT8 or UINT8 (values 0 or 1), ``(B, S)``, ``(B, 1, S)`` or
            ``(B, 1, 1, S)``; 1 masks the position. S >= the longest window end
            (``block_table.shape[1] * block_size`` with page attention).
        pse_shift: the query's dtype, ``(B, N, 1, S)`` or ``(1, N, 1, S)``, added to the scaled
            scores in float32; S >= the cache's S (``block_table.shape[1] * block_size`` with
            page attention).
        actual_seq_lengths: per-batch valid KV lengths, B values or one for all; each
            ``<= S`` of its cache; required with page attention.
        antiquant_scale: with INT8 key/value (required then), the query's dtype, ``(2,)``
            per-tensor or ``(2, N_kv, 1, D)``, ``(2, N_kv, D)``, ``(2, H_kv)`` per-channel;
            index 0 is the key's, 1 the value's.
        antiquant_offset: optional, same dtype and shape as ``antiquant_scale``.
        block_table: INT32 ``(B, maxBlockNumPerSeq)``: enables page attention;
            ``block_table[b][j]`` is the physical block of batch b's logical block j. The
            entries in use are read on the host: a CPU table on every call; off the CPU (a
            synchronization) once per table and version: a table reused unchanged is not
            read again, one changed in place through torch is
            (``_ifa_plan.check_table_entries``).
        dequant_scale1: fully INT8 attention is not supported: must be None.
        quant_scale1: must be None, like ``dequant_scale1``.
        dequant_scale2: must be None, like ``dequant_scale1``.
        quant_scale2: FLOAT32 (or BFLOAT16 with a BFLOAT16 query), 1 element (per-tensor) or
            N*D elements (per-channel, head-major): makes the output INT8.
        quant_offset2: optional, same dtype and shape as ``quant_scale2``.
        kv_padding_size: INT64, 1 element: KV left padding; takes effect only with one
            contiguous key/value tensor and ``actual_seq_lengths`` (ignored otherwise, as by
            the operator).
        num_heads: N, the query heads, in [1, 256].
        scale_value: multiplies q k^T, usually ``1 / sqrt(D)``.
        input_layout: ``"BSH"``, ``"BNSD"`` or ``"BSND"`` (:class:`IfaLayout`).
        num_key_value_heads: N_kv; 0 means ``num_heads``. ``num_heads`` must be a multiple of
            it, at most 64 times it.
        block_size: tokens per page-attention block: nonzero, <= 512, a multiple of 16 (32 for
            INT8 key/value); ignored without ``block_table``.
        inner_precise: 0 (high precision) or 1 (high performance).

    Returns:
        The attention output, shaped like ``query``; the query's dtype, or INT8 with
        ``quant_scale2``.

    Raises:
        ParamNullptrError: ``query``, ``key`` or ``value`` is missing, or ``antiquant_scale``
            with INT8 key/value, ``actual_seq_lengths`` with page attention, ``quant_scale2``
            with ``quant_offset2``.
        ParamInvalidError: any other documented rule is broken; the message names the
            parameter, the value seen and the rule.

    """
    fast = None
    if (
        FUSED_CUDA_KERNEL
        and type(query) is torch.Tensor
        and query.is_cuda
        and padding_mask is None
        and atten_mask is None
        and pse_shift is None
        and antiquant_scale is None
        and antiquant_offset is None
        and dequant_scale1 is None
        and quant_scale1 is None
        and dequant_scale2 is None
        and quant_scale2 is None
        and quant_offset2 is None
        and kv_padding_size is None
    ):  # pragma: no cover - CUDA
        fast = call_key(
            query, key, value, block_table, actual_seq_lengths, num_heads, scale_value,
            input_layout, num_key_value_heads, block_size, inner_precise,
        )  # fmt: skip
        checked = None if fast is None else _CHECKED.get(fast)
        if checked is not None:
            return _repeat(
                checked, query, cast(torch.Tensor, key), cast(torch.Tensor, value), block_table
            )
    plan = plan_incre_flash_attention(
        query,
        key,
        value,
        padding_mask=padding_mask,
        atten_mask=atten_mask,
        pse_shift=pse_shift,
        actual_seq_lengths=actual_seq_lengths,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        block_table=block_table,
        dequant_scale1=dequant_scale1,
        quant_scale1=quant_scale1,
        dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2,
        quant_offset2=quant_offset2,
        kv_padding_size=kv_padding_size,
        num_heads=num_heads,
        scale_value=scale_value,
        input_layout=input_layout,
        num_key_value_heads=num_key_value_heads,
        block_size=block_size,
        inner_precise=inner_precise,
    )
    fused = _fused_path(plan)
    if fused is not None:  # pragma: no cover - CUDA
        launch = fused.prepare(plan)
        if fast is not None:
            _remember(fast, plan, launch)
        return fused.attend(plan, launch)  # type: ignore[no-any-return]
    return _finish(plan, _attend(plan))


def _fused_path(plan: IfaPlan) -> ModuleType | None:
    """The fused CUDA kernels' module if they cover ``plan``, else None.

    Triton is imported on the first CUDA call only (never on the CPU path); where it does not
    import, every call takes the torch composition.
    """
    if not (FUSED_CUDA_KERNEL and plan.query.is_cuda):
        return None
    module = _fused_module()
    if module is None or not module.supported(plan):
        return None
    return module  # pragma: no cover - Triton


def _remember(
    fast: tuple[object, ...], plan: IfaPlan, launch: IfaLaunch
) -> None:  # pragma: no cover - CUDA
    """Keep a checked fused call's launch under its key (:data:`_CHECKED`)."""
    table = None
    if isinstance(plan.key, PagedKV):
        pages = plan.key.pages
        table = (pages.needed, pages.blocknum)
    put_bounded(_CHECKED, fast, _Checked(launch=launch, table=table), _CHECKED_MAX)


def _repeat(
    checked: _Checked,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor | None,
) -> torch.Tensor:  # pragma: no cover - CUDA
    """A call of a checked call's key: check the block table's entries, then launch.

    (``block_table`` is a tensor where ``checked.table`` is set: the key holds its facts.)
    """
    module = cast(ModuleType, _fused_module())  # imported: the checked call ran it
    table = None
    if checked.table is not None:
        table = cast(torch.Tensor, block_table)
        check_table_entries(table, *checked.table)
    return module.run(checked.launch, query, key, value, table)  # type: ignore[no-any-return]


@functools.cache
def _fused_module() -> ModuleType | None:
    """:mod:`mc2sim.kernels._ifa_triton`, imported once; None where Triton does not import."""
    try:
        import mc2sim.kernels._ifa_triton as module
    except ImportError:
        return None
    return module  # pragma: no cover - Triton


def _chunk_positions(plan: IfaPlan, on_cpu: bool) -> int:
    """Return how many KV positions one chunk holds: a multiple of the block size.

    On the CPU a chunk's float32 copy stays in cache (``_CHUNK_ELEMENTS``); elsewhere the
    whole length is one chunk. With an int8 cache a chunk also holds at most
    ``MSD_EXACT_POSITIONS``, so its integer probability-by-value sums stay exact in float32.
    """
    chunk = plan.length
    if on_cpu:
        per_position = plan.batch * plan.num_kv_heads * plan.head_dim
        blocks = max(1, _CHUNK_ELEMENTS // (per_position * plan.block_size))
        chunk = blocks * plan.block_size
    if plan.value_antiquant is not None:
        chunk = min(chunk, max(1, MSD_EXACT_POSITIONS // plan.block_size) * plan.block_size)
    return min(chunk, plan.length)


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, H, M, K) @ (B, H, K, N)`` in float32 off the CPU: exact products, float32 sums.

    ``b`` may be a strided view of the caller's cache: batches of one row stride go to one
    batched GEMM as they are; a view whose batch and head strides do not merge is multiplied
    batch by batch (cuBLAS takes any head stride), or copied once when there are many batches.
    """
    batch, heads, m, _ = a.shape
    n = b.shape[-1]
    a3 = a.reshape(batch * heads, m, a.shape[-1])
    try:
        b3 = b.view(batch * heads, b.shape[-2], n)
    except RuntimeError:
        if batch > _PER_BATCH_GEMMS:
            b3 = b.reshape(batch * heads, b.shape[-2], n)
        else:
            return torch.stack([mm_float32(a[i], b[i]) for i in range(batch)])
    return mm_float32(a3, b3).view(batch, heads, m, n)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to an integral value, ties away from zero (the vector unit's CAST_ROUND)."""
    rounded = torch.round(x)  # ties to even
    whole = torch.trunc(x)
    tie = (x - whole).abs() == 0.5
    return torch.where(tie, whole + torch.sign(x), rounded)


def _msd_parts(a: torch.Tensor, steps: int) -> torch.Tensor:
    """Split ``a`` (|a| <= 127) into ``steps`` int8-valued parts, most significant first.

    ``a ~ p0 + p1 / 254 + p2 / 254**2``: part i is ``round(r_i)`` with ``r_0 = a`` and
    ``r_{i+1} = (r_i - p_i) * 254``, every step in float32 (the kernel's
    ``AntiquantAIterExpand``). Returns float32 ``(steps, *a.shape)`` integers in [-127, 127].
    """
    parts = []
    residual = a
    part = _round_half_away(residual)
    parts.append(part)
    for _ in range(steps - 1):
        residual = (residual - part) * MSD_EXPAND
        part = _round_half_away(residual)
        parts.append(part)
    return torch.stack(parts)


def _msd_combine(products: torch.Tensor) -> torch.Tensor:
    """``(c0 + c1 / 254 + c2 / 254**2) / 127`` of the parts' products, in float32.

    The kernel's ``AntiquantMatmulResCombine``: the int32 products converted to float32
    (exact here, below 2**24), the scale of part i divided by 254 once per part in float32,
    each added in turn, then the sum multiplied by the float32 ``1 / 127``.
    """
    total = products[0].clone()
    scale = torch.ones((), dtype=torch.float32, device=products.device)
    for part in products[1:]:
        scale = scale / MSD_EXPAND
        total += part * scale
    return total * torch.tensor(1.0 / MSD_COEFF, dtype=torch.float32, device=products.device)


def _scores(
    plan: IfaPlan, bounds: list[tuple[int, int]], buffer: torch.Tensor | None
) -> torch.Tensor:
    """``q k^T`` of every window position, float32 ``(B, N_kv, G, length)``, unscaled.

    Float caches: exact products of the 16-bit values, float32 sums. INT8 caches, as the
    kernel computes them (hicann/ops-transformer ``incre_flash_attention_split_Bbn2s2_Us2.h``,
    ``DealQueryPreProcessBaseBlock`` and ``DealAntiqBmm1ResBaseBlock``): the query, times the
    key's per-channel antiquant scale in float32, is scaled per row to ``127 / max|q|`` and
    split into int8 parts (:func:`_msd_parts`); each part times the int8 keys is an exact
    integer product; the parts' products are recombined (:func:`_msd_combine`) and multiplied
    by the row's ``max|q|``. The key's antiquant offset adds ``q . offset`` to every score of
    a row, which softmax ignores; the kernel drops it, and so does this.
    """
    batch, kv_heads, dim = plan.batch, plan.num_kv_heads, plan.head_dim
    group = plan.num_heads // kv_heads
    q = plan.query.reshape(batch, kv_heads, group, dim)
    scores = torch.empty(batch, kv_heads, group, plan.length, device=q.device)
    key_anti = plan.key_antiquant
    if key_anti is not None:
        scaled = q.float() * key_anti.scale
        amax = scaled.abs().amax(dim=-1, keepdim=True)
        coef = torch.where(amax > 0, MSD_COEFF / amax, torch.zeros_like(amax))
        steps = MSD_STEPS[plan.inner_precise]
        parts = _msd_parts(scaled * coef, steps)  # (steps, B, N_kv, G, D)
        stacked = parts.permute(1, 2, 0, 3, 4).reshape(batch, kv_heads, steps * group, dim)
        for c0, c1 in bounds:
            keys = plan.key.load(c0, c1, buffer).float()
            products = torch.matmul(stacked, keys.transpose(-1, -2))
            split = products.view(batch, kv_heads, steps, group, c1 - c0).permute(2, 0, 1, 3, 4)
            scores[..., c0:c1] = _msd_combine(split) * amax
        return scores
    if buffer is not None:  # CPU: float32 chunks of the cache, exact products
        q32 = q.float()
        for c0, c1 in bounds:
            keys = plan.key.load(c0, c1, buffer)
            scores[..., c0:c1] = torch.matmul(q32, keys.transpose(-1, -2))
        return scores
    if len(bounds) == 1:  # accelerators: one tensor-core GEMM, float32 sums
        return _bmm_float32(q, plan.key.load(0, plan.length, None).transpose(-1, -2))
    for c0, c1 in bounds:
        keys = plan.key.load(c0, c1, None)
        scores[..., c0:c1] = _bmm_float32(q, keys.transpose(-1, -2))
    return scores


def _attend(plan: IfaPlan) -> torch.Tensor:
    """Return the float32 attention output ``(B, N_kv, G, D)``; empty windows give NaN rows.

    Rounded where the device rounds (OPS.md, "Where the device rounds"): the scores and the
    softmax are float32; the unnormalized probabilities ``exp(s - max)`` are rounded to the
    query's dtype before the product with the values (the matrix unit's operand dtype), and
    the weighted sum is divided by the float32 sum of the unrounded ones (hicann/
    ops-transformer ``incre_flash_attention_split_Bbn2s2_Us2.h``: ``DealBmm1ResBaseBlock``
    casts the softmax result to the KV dtype for bmm2; ``RowDivs`` by ``softmaxSumUb`` at the
    end). INT8 values: the probabilities times 127 are split into int8 parts as the query is
    (:func:`_msd_parts`), each part times the int8 values is an exact integer product, the
    recombined sum is divided by the probabilities' sum, the value's antiquant offset added
    and its scale applied (``DealAntiqBmm2ResBaseBlock``). The max is the whole window's; the
    kernel's flash softmax rescales chunk by chunk, which changes only the last bits.
    """
    batch, kv_heads, dim, length = plan.batch, plan.num_kv_heads, plan.head_dim, plan.length
    group = plan.num_heads // kv_heads
    device = plan.query.device
    if length == 0:
        return torch.zeros(batch, kv_heads, group, dim, device=device)
    on_cpu = device.type == "cpu"
    key, value = plan.key, plan.value
    if (
        not on_cpu
        and plan.key_antiquant is None
        and isinstance(key, PagedKV)
        and isinstance(value, PagedKV)
        and key.blocks is not None
    ):
        return _attend_in_blocks(plan, key, value, key.blocks)
    chunk = _chunk_positions(plan, on_cpu)
    buffer = torch.empty(batch, kv_heads, chunk, dim) if on_cpu else None
    bounds = [(c0, min(c0 + chunk, length)) for c0 in range(0, length, chunk)]

    weights, total, inside = _softmax_parts(plan, _scores(plan, bounds, buffer))

    out = torch.zeros(batch, kv_heads, group, dim, device=device)
    value_anti = plan.value_antiquant
    if value_anti is not None:
        parts = _msd_parts(weights * MSD_COEFF, MSD_STEPS[plan.inner_precise])
        for c0, c1 in bounds:
            values = plan.value.load(c0, c1, buffer).float()
            out += _msd_combine(torch.matmul(parts[..., c0:c1], values))
        out /= total
        if value_anti.offset is not None:
            out += value_anti.offset
        return out.mul_(value_anti.scale)

    # rounding point: the unnormalized probabilities in the query's dtype
    rounded = weights.to(plan.query.dtype)
    if on_cpu:
        rounded32 = rounded.float()
        for c0, c1 in bounds:
            values = plan.value.load(c0, c1, buffer)
            if inside is not None:
                _clear_outside(values, plan, c0, c1, inside)
            out.add_(torch.matmul(rounded32[..., c0:c1], values))
    else:  # accelerators: tensor cores, float32 sums, the whole window in one GEMM
        values = plan.value.load(0, length, None)
        if inside is not None:
            values = values.masked_fill(~inside.view(batch, 1, length, 1), 0.0)
        out = _bmm_float32(rounded, values)
    return out.div_(total)


def _softmax_parts(
    plan: IfaPlan, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scale, pse, mask and window the float32 scores, in place; exponentiate them.

    Returns ``exp(s - max)``, its sum, and the window mask (None when every window covers
    every position).
    """
    batch, kv_heads, length = plan.batch, plan.num_kv_heads, plan.length
    group = plan.num_heads // kv_heads
    scores.mul_(plan.scale_value)
    if plan.pse_shift is not None:
        pse = plan.pse_shift[:, :, :length].float()
        scores.add_(pse.reshape(pse.shape[0], kv_heads, group, length))
    if plan.atten_mask is not None:
        masked = plan.atten_mask[:, :length] != 0
        scores.masked_fill_(masked.view(batch, 1, 1, length), MASKED_SCORE)
    inside = None
    if _outside(plan, 0, length):  # some window leaves out a position: -inf there
        device = scores.device
        positions = torch.arange(length, device=device)
        starts = from_host(plan.starts, device).unsqueeze(1)
        ends = from_host(plan.ends, device).unsqueeze(1)
        inside = (positions >= starts) & (positions < ends)
        scores.masked_fill_(~inside.view(batch, 1, 1, length), float("-inf"))
    weights = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return weights, weights.sum(dim=-1, keepdim=True), inside


def _block_products(left: torch.Tensor, cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """``left[p, h] @ block(p, h)`` for every block ``p`` and KV head ``h``, float32.

    Args:
        left: ``(blocknum, N_kv, M, K)``, the cache's dtype.
        cache: the right operands in place: ``(blocknum, N_kv, K, N)`` if ``heads_first``,
            else ``(blocknum, K, N_kv, N)`` (head h of block p at ``[p, :, h]``).
        heads_first: the layout.

    Returns:
        ``(blocknum, N_kv, M, N)`` float32.
    """
    blocknum, heads, m, _ = left.shape
    if heads_first:  # blocks and heads merge into one batch of the GEMM
        right = cache.reshape(blocknum * heads, *cache.shape[2:])
        n = right.shape[-1]
        return mm_float32(left.reshape(blocknum * heads, m, -1), right).view(blocknum, heads, m, n)
    out = torch.empty(blocknum, heads, m, cache.shape[-1], device=left.device)
    for h in range(heads):  # one batched GEMM per KV head, the head a strided slice
        out[:, h] = mm_float32(left[:, h], cache[:, :, h])
    return out


def _attend_in_blocks(
    plan: IfaPlan, key: PagedKV, value: PagedKV, index: BlockIndex
) -> torch.Tensor:
    """Page attention reading the cache in place, block by block (the accelerator path).

    Each block's scores come from its own batch's query (``index.owner``) in one batched
    GEMM, and are gathered into the batches' windows; the rounded probabilities go back to
    their blocks and each block's product with its values is summed per batch in float32.
    The arithmetic is ``_attend``'s (the same rounding points), in another summation order,
    with no gathered copy of the cache. Blocks a window ends inside are multiplied again from
    a copy zeroed past the window (the cache there may hold anything, not finite included).
    """
    batch, kv_heads, dim, length = plan.batch, plan.num_kv_heads, plan.head_dim, plan.length
    group = plan.num_heads // kv_heads
    size, table = key.block_size, key.table
    used = table.shape[1]
    blocknum = key.cache.shape[0]
    q = plan.query.reshape(batch, kv_heads, group, dim)
    # each block's keys as the (D, blockSize) right operand, head h at [:, h] / [:, :, h]
    k_t = key.cache.transpose(-1, -2) if key.heads_first else key.cache.permute(0, 3, 2, 1)
    scores_in_blocks = _block_products(q.index_select(0, index.owner), k_t, key.heads_first)
    scores = (
        scores_in_blocks.index_select(0, table.reshape(-1))
        .view(batch, used, kv_heads, group, size)
        .permute(0, 2, 3, 1, 4)
        .reshape(batch, kv_heads, group, length)
    )
    weights, total, _ = _softmax_parts(plan, scores)
    rounded = weights.to(plan.query.dtype)  # rounding point, as in _attend
    by_block = rounded.view(batch, kv_heads, group, used, size).permute(0, 3, 1, 2, 4)
    probs = torch.zeros(blocknum, kv_heads, group, size, dtype=rounded.dtype, device=rounded.device)
    probs[index.use_p] = by_block[index.use_b, index.use_j]
    out_in_blocks = _block_products(probs, value.cache, value.heads_first)
    if index.partial_valid:
        tail = value.cache.index_select(0, index.partial_p)
        position_axis = 2 if value.heads_first else 1
        positions = torch.arange(size, device=tail.device).view(
            [1] * position_axis + [size] + [1] * (tail.dim() - position_axis - 1)
        )
        valid = from_host(index.partial_valid, tail.device).view([-1] + [1] * (tail.dim() - 1))
        tail = tail.masked_fill(positions >= valid, 0.0)
        out_in_blocks[index.partial_p] = _block_products(
            probs.index_select(0, index.partial_p), tail, value.heads_first
        )
    per_batch = out_in_blocks.index_select(0, table.reshape(-1)).view(
        batch, used, kv_heads, group, dim
    )
    per_batch.masked_fill_(~index.in_use.view(batch, used, 1, 1, 1), 0.0)
    return per_batch.sum(dim=1).div_(total)


def _outside(plan: IfaPlan, c0: int, c1: int) -> bool:
    """Whether some batch's window leaves out a position of ``[c0, c1)``."""
    return any(s > c0 or e < c1 for s, e in zip(plan.starts, plan.ends, strict=True))


def _clear_outside(
    values: torch.Tensor, plan: IfaPlan, c0: int, c1: int, inside: torch.Tensor
) -> None:
    """Zero the positions of a float32 chunk that lie outside a batch's window.

    The operator never reads outside the window; keep what lies there (padding, unused
    blocks) out of the sum even if it is not finite (its weight is 0, but 0 * inf is NaN).
    """
    if _outside(plan, c0, c1):
        outside = ~inside[:, c0:c1]
        values.masked_fill_(outside.view(plan.batch, 1, c1 - c0, 1), 0.0)


def _finish(plan: IfaPlan, out: torch.Tensor) -> torch.Tensor:
    """Zero the empty windows' rows, quantize or round, and shape like the query."""
    batch = plan.batch
    flags = [e <= s for s, e in zip(plan.starts, plan.ends, strict=True)]
    empty = from_host(flags, out.device).view(batch, 1, 1) if any(flags) else None
    flat = out.reshape(batch, plan.num_heads, plan.head_dim)
    if empty is not None:
        flat.masked_fill_(empty, 0.0)
    if plan.quant_scale2 is not None:
        shifted = flat * plan.quant_scale2
        if plan.quant_offset2 is not None:
            shifted.add_(plan.quant_offset2)
        quantized = torch.round(shifted).clamp_(-128, 127)
        if empty is not None:
            quantized.masked_fill_(empty, 0.0)
        return quantized.to(torch.int8).reshape(plan.out_shape)
    return flat.to(plan.out_dtype).reshape(plan.out_shape)
