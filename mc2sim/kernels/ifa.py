"""Reference IncreFlashAttention: decode attention of one query token over a KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mc2sim.kernels._ifa_plan import IfaLayout, IfaPlan, plan_incre_flash_attention

__all__ = ["IfaLayout", "incre_flash_attention"]

MASKED_SCORE = -1e12
"""The score a position with attention mask 1 gets (it replaces q k^T * scale + pse)."""

_CHUNK_ELEMENTS = 1 << 22
"""About how many float32 KV elements one chunk holds (16 MiB): small enough to stay in cache."""


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

    Everything is computed in float32: scores, pse_shift, softmax and the weighted sum; INT8
    key/value are dequantized in float32 as ``(kv + offset) * scale``. The float32 result is
    rounded once, to the query's dtype (round to nearest even), or, with ``quant_scale2``, to
    INT8 as ``clamp(round_half_even(out * quant_scale2 + quant_offset2), -128, 127)``.
    ``inner_precise`` (0 high precision, 1 high performance) is checked but does not change
    this arithmetic.

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
            ``block_table[b][j]`` is the physical block of batch b's logical block j.
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
    return _finish(plan, _attend(plan))


def _chunk_positions(plan: IfaPlan) -> int:
    """Return how many KV positions one chunk holds: a multiple of the block size."""
    per_position = plan.batch * plan.num_kv_heads * plan.head_dim
    blocks = max(1, _CHUNK_ELEMENTS // (per_position * plan.block_size))
    return min(blocks * plan.block_size, plan.length)


def _attend(plan: IfaPlan) -> torch.Tensor:
    """Return the float32 attention output ``(B, N_kv, G, D)``; empty windows give NaN rows."""
    batch, kv_heads, dim, length = plan.batch, plan.num_kv_heads, plan.head_dim, plan.length
    group = plan.num_heads // kv_heads
    out = torch.zeros(batch, kv_heads, group, dim)
    if length == 0:
        return out
    # Query head n = kv * group + g, so a reshape pairs each KV head with its query heads.
    q = plan.query.reshape(batch, kv_heads, group, dim).float()
    chunk = _chunk_positions(plan)
    buffer = torch.empty(batch, kv_heads, chunk, dim)
    bounds = [(c0, min(c0 + chunk, length)) for c0 in range(0, length, chunk)]

    scores = torch.empty(batch, kv_heads, group, length)
    for c0, c1 in bounds:
        keys = plan.key.load(c0, c1, buffer)
        scores[..., c0:c1] = torch.matmul(q, keys.transpose(-1, -2))
    scores.mul_(plan.scale_value)
    if plan.pse_shift is not None:
        pse = plan.pse_shift[:, :, :length].float()
        scores.add_(pse.reshape(pse.shape[0], kv_heads, group, length))
    if plan.atten_mask is not None:
        masked = plan.atten_mask[:, :length] != 0
        scores.masked_fill_(masked.view(batch, 1, 1, length), MASKED_SCORE)
    positions = torch.arange(length)
    inside = (positions >= torch.tensor(plan.starts).unsqueeze(1)) & (
        positions < torch.tensor(plan.ends).unsqueeze(1)
    )
    scores.masked_fill_(~inside.view(batch, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    del scores

    for c0, c1 in bounds:
        values = plan.value.load(c0, c1, buffer)
        outside = ~inside[:, c0:c1]
        if bool(outside.any()):
            # The operator never reads outside the window; keep what lies there (padding,
            # unused blocks) out of the sum even if it is not finite.
            values.masked_fill_(outside.view(batch, 1, c1 - c0, 1), 0.0)
        out.add_(torch.matmul(probs[..., c0:c1], values))
    return out


def _finish(plan: IfaPlan, out: torch.Tensor) -> torch.Tensor:
    """Zero the empty windows' rows, quantize or round, and shape like the query."""
    batch = plan.batch
    empty = torch.tensor([e <= s for s, e in zip(plan.starts, plan.ends, strict=True)])
    flat = out.reshape(batch, plan.num_heads, plan.head_dim)
    flat.masked_fill_(empty.view(batch, 1, 1), 0.0)
    if plan.quant_scale2 is not None:
        shifted = flat * plan.quant_scale2
        if plan.quant_offset2 is not None:
            shifted.add_(plan.quant_offset2)
        quantized = torch.round(shifted).clamp_(-128, 127)
        quantized.masked_fill_(empty.view(batch, 1, 1), 0.0)
        return quantized.to(torch.int8).reshape(plan.out_shape)
    return flat.to(plan.out_dtype).reshape(plan.out_shape)
