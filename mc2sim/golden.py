"""Independent goldens of the fused ops: float64 on the gathered global problem.

Each function takes every rank's inputs (lists indexed by rank, as :func:`gather_inputs`
returns them) and computes one rank's expected output in float64 with plain loops and
explicit offsets. None of it calls :mod:`mc2sim.kernels` or :mod:`mc2sim.ops`: int4 nibbles,
FRACTAL_NZ tiles, per-group antiquant and int64 quant scales are decoded here a second way,
so a bug in a kernel cannot hide in its own golden. Results stay float64; callers compare
with :mod:`mc2sim.compare` (which casts nothing) or cast to the op's dtype first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mc2sim.comm import Communicator

__all__ = [
    "all_gather_matmul",
    "alltoallv_gmm",
    "dequant_weight",
    "gather_inputs",
    "gmm_alltoallv",
    "ifa_paged",
    "matmul_reduce_scatter",
    "mm_all_reduce",
    "quant_scale_value",
]

_NZ_R0 = 16
_NZ_C0_BYTES = 32


def gather_inputs(comm: Communicator, **inputs: Any) -> dict[str, list[Any]]:
    """Return every rank's inputs: ``{name: [rank 0's value, rank 1's value, ...]}``.

    A control-path helper for goldens (it pickles); tensors come back on the CPU.
    """
    mine = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    everyone = comm.allgather_object(mine)
    return {k: [theirs[k] for theirs in everyone] for k in inputs}


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def _round_to(values: np.ndarray, dtype: torch.dtype | None) -> np.ndarray:
    """Round float64 values to ``dtype`` (nearest even) and back; no-op for None."""
    if dtype is None:
        return values
    return _f64(torch.from_numpy(np.ascontiguousarray(values)).to(dtype))


def _stored(values: np.ndarray, dtype: torch.dtype | None) -> np.ndarray:
    """A float32 vector-unit result stored in ``dtype``: float32 rounding, then ``dtype``'s.

    As the public kernel goldens form it (numpy ``astype(float32)``, then
    ``astype(float16 / bfloat16)``); no-op for None.
    """
    if dtype is None:
        return values
    return _round_to(values.astype(np.float32).astype(np.float64), dtype)


# -- weights ------------------------------------------------------------------------------


def _nibbles(words: np.ndarray, per_word: int) -> np.ndarray:
    """Split each unsigned word into ``per_word`` signed 4-bit values, low nibble first."""
    out = np.empty((*words.shape[:-1], words.shape[-1] * per_word), dtype=np.int64)
    for i in range(per_word):
        nib = (words >> (4 * i)) & 0xF
        out[..., i::per_word] = np.where(nib > 7, nib - 16, nib)
    return out


def _unpack_rows(packed: torch.Tensor) -> np.ndarray:
    """Unpack int4 packed along the last dim of a contiguous int32 or uint8 tensor."""
    if packed.dtype == torch.int32:
        return _nibbles(packed.numpy().astype(np.int64) & 0xFFFFFFFF, 8)
    return _nibbles(packed.numpy().astype(np.int64), 2)


def _from_nz(storage: torch.Tensor, rows: int, cols_storage: int) -> torch.Tensor:
    """Untile a FRACTAL_NZ storage (C1, R1, 16, C0) into a (rows, cols_storage) matrix."""
    c1, r1, r0, c0 = storage.shape
    matrix = torch.empty((r1 * r0, c1 * c0), dtype=storage.dtype)
    for i in range(c1):
        for j in range(r1):
            matrix[j * r0 : (j + 1) * r0, i * c0 : (i + 1) * c0] = storage[i, j]
    return matrix[:rows, :cols_storage]


def dequant_weight(
    x2: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    *,
    group_size: int = 0,
    shape: Sequence[int] | None = None,
    transposed: bool = False,
    stored_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Return ``(w + offset) * scale`` as a float64 ``(k, n)`` array.

    Exact by default. With ``stored_dtype`` each step is stored in that dtype as the device
    and the public goldens store it (``w + offset``, then ``* scale``, each rounded to x's
    16-bit dtype: hicann/ops-nn weight_quant_batch_matmul_v2 kernel golden, Ascend/op-plugin
    test_npu_weight_quant_batchmatmul.py); see docs/OPS.md, "Where the device rounds".

    Args:
        x2: int8 ``(k, n)`` (any strides); int4 packed in int32 (8 per word) or uint8 (2 per
            byte) as ``(k, n/8)`` contiguous or the transpose of a contiguous ``(n, k/8)``;
            or a 4-D FRACTAL_NZ storage of either.
        scale: per-tensor ``(1,)``, per-channel ``(n,)``/``(1, n)`` or per-group
            ``(ceil(k/g), n)``.
        offset: optional, like ``scale``.
        group_size: ``g`` for per-group parameters (row ``kk`` uses group ``kk // g``).
        shape: the logical ``(k, n)``; required for FRACTAL_NZ.
        transposed: a FRACTAL_NZ storage holding the ``(n, k)`` matrix.
        stored_dtype: round each step to this dtype (the device's precision), or None.

    Returns:
        float64 ``(k, n)``.
    """
    if x2.dim() == 4:
        if shape is None:
            raise ValueError("shape is required for a FRACTAL_NZ weight")
        k, n = shape
        rows, cols = (n, k) if transposed else (k, n)
        per = {torch.int32: 8, torch.uint8: 2}.get(x2.dtype, 1)
        tiles = _from_nz(x2, rows, cols // per)
        logical = tiles.numpy().astype(np.int64) if per == 1 else _unpack_rows(tiles)
        w = logical.T if transposed else logical
    elif x2.dtype == torch.int8:
        w = x2.numpy().astype(np.int64)
    elif x2.is_contiguous():
        w = _unpack_rows(x2)
    else:  # the transpose of a contiguous (n, k/8) packing
        w = _unpack_rows(x2.t().contiguous()).T
    k, n = w.shape
    w64 = w.astype(np.float64)

    def expand(p: torch.Tensor) -> np.ndarray:
        a = _f64(p)
        if group_size:
            return np.repeat(a, group_size, axis=0)[:k]
        return a.reshape(1, -1) if a.size > 1 else a.reshape(1, 1)

    if offset is not None:
        w64 = _stored(w64 + expand(offset), stored_dtype)
    return np.asarray(_stored(w64 * expand(scale), stored_dtype), dtype=np.float64)


def quant_scale_value(scale: torch.Tensor, *, truncate: bool) -> np.ndarray:
    """Return the scale the hardware applies, as float64.

    An int64 scale (from trans_quant_param) holds a float32 in its low 32 bits with the low
    13 mantissa bits cleared; a float32 scale that torch_npu encodes first (``truncate``) is
    truncated the same way; others are used as given.
    """
    if scale.dtype == torch.int64:
        bits = (scale.numpy() & 0xFFFFE000).astype(np.uint32)
        return np.asarray(bits.view(np.float32), dtype=np.float64)
    if truncate and scale.dtype == torch.float32:
        bits = scale.numpy().view(np.uint32) & np.uint32(0xFFFFE000)
        return np.asarray(bits.view(np.float32), dtype=np.float64)
    return _f64(scale)


# -- MoE ------------------------------------------------------------------------------------


def _matmul_block(x: np.ndarray, w: torch.Tensor, trans: bool) -> np.ndarray:
    w64 = _f64(w)
    return np.asarray(x @ (w64.T if trans else w64), dtype=np.float64)


def gmm_alltoallv(
    rank: int,
    gmm_x: Sequence[torch.Tensor],
    gmm_weight: Sequence[torch.Tensor],
    send_counts: Sequence[Sequence[int]],
    *,
    trans_gmm_weight: bool = False,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    trans_mm_weight: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Expected ``(y, mm_y)`` of GroupedMatMulAlltoAllv on ``rank``.

    Args:
        rank: the receiving rank.
        gmm_x: every rank's expert-major ``gmm_x``.
        gmm_weight: every rank's ``gmm_weight``.
        send_counts: every rank's send_counts.
        trans_gmm_weight: weights stored ``(e, N1, H1)``.
        mm_x: this rank's shared-expert input, or None.
        mm_weight: this rank's shared-expert weight.
        trans_mm_weight: ``mm_weight`` stored ``(N2, H2)``.

    Returns:
        float64 ``y`` ordered by (source rank, expert), and ``mm_y`` or None.
    """
    world = len(gmm_x)
    e = gmm_weight[0].shape[0]
    blocks: dict[tuple[int, int], np.ndarray] = {}
    for r in range(world):
        x = _f64(gmm_x[r])
        offset = 0
        for j in range(e):  # expert-major on the sender
            for q in range(world):
                n = send_counts[r][q * e + j]
                if q == rank:
                    blocks[(r, j)] = _matmul_block(
                        x[offset : offset + n], gmm_weight[r][j], trans_gmm_weight
                    )
                offset += n
    n1 = blocks[(0, 0)].shape[1]
    y = np.concatenate([blocks[(r, j)] for r in range(world) for j in range(e)]).reshape(-1, n1)
    mm_y = None
    if mm_x is not None and mm_weight is not None:
        mm_y = _matmul_block(_f64(mm_x), mm_weight, trans_mm_weight)
    return y, mm_y


def alltoallv_gmm(
    rank: int,
    gmm_x: Sequence[torch.Tensor],
    gmm_weight: torch.Tensor,
    send_counts: Sequence[Sequence[int]],
    *,
    trans_gmm_weight: bool = False,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    trans_mm_weight: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Expected ``(gmm_y, mm_y, permute_out)`` of AlltoAllvGroupedMatMul on ``rank``.

    Args:
        rank: the receiving rank.
        gmm_x: every rank's rank-major ``gmm_x``.
        gmm_weight: this rank's ``gmm_weight``.
        send_counts: every rank's send_counts.
        trans_gmm_weight: weights stored ``(e, N1, H1)``.
        mm_x: this rank's shared-expert input, or None.
        mm_weight: this rank's shared-expert weight.
        trans_mm_weight: ``mm_weight`` stored ``(N2, H2)``.

    Returns:
        float64 ``gmm_y`` and ``permute_out`` in expert-major order, and ``mm_y`` or None.
    """
    world = len(gmm_x)
    e = gmm_weight.shape[0]
    h1 = gmm_x[0].shape[1]
    rows: dict[tuple[int, int], np.ndarray] = {}
    for r in range(world):
        x = _f64(gmm_x[r])
        offset = 0
        for q in range(world):  # rank-major on the sender
            for j in range(e):
                n = send_counts[r][q * e + j]
                if q == rank:
                    rows[(j, r)] = x[offset : offset + n]
                offset += n
    permuted = [rows[(j, r)] for j in range(e) for r in range(world)]
    permute_out = np.concatenate(permuted).reshape(-1, h1)
    outs = [
        _matmul_block(
            np.concatenate([rows[(j, r)] for r in range(world)]), gmm_weight[j], trans_gmm_weight
        )
        for j in range(e)
    ]
    gmm_y = np.concatenate(outs)
    mm_y = None
    if mm_x is not None and mm_weight is not None:
        mm_y = _matmul_block(_f64(mm_x), mm_weight, trans_mm_weight)
    return gmm_y, mm_y, permute_out


# -- tensor parallel -----------------------------------------------------------------------


def mm_all_reduce(
    x1: Sequence[torch.Tensor],
    x2: Sequence[torch.Tensor],
    *,
    bias: Sequence[torch.Tensor | None] | None = None,
    x3: Sequence[torch.Tensor | None] | None = None,
    antiquant_scale: Sequence[torch.Tensor] | None = None,
    antiquant_offset: Sequence[torch.Tensor | None] | None = None,
    antiquant_group_size: int = 0,
    x2_shape: Sequence[int] | None = None,
    x2_transposed: bool = False,
    dequant_scale: Sequence[torch.Tensor] | None = None,
    pertoken_scale: Sequence[torch.Tensor | None] | None = None,
    local_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Expected MatmulAllReduce output: ``sum over ranks of x1 @ x2' + bias + x3``.

    The mode follows the arguments: ``dequant_scale`` for quant (int8 x1, x2: exact integer
    products in float64, then the hardware's scale), ``antiquant_scale`` for weight-quant,
    else float. All lists are indexed by rank. With ``local_dtype`` each rank's result is
    rounded to that dtype before the sum, as the public tests' golden sums per-rank results
    that are already in the output dtype: the fused op's own precision, not an error. The
    rounding points are the op's: the product (with bias) is rounded, then ``x3`` is added
    and the sum rounded again.

    Returns:
        float64 ``(m, n)`` or ``(b, s, n)``.
    """
    world = len(x1)
    total: np.ndarray | None = None
    for r in range(world):
        a = _f64(x1[r])
        lead = a.shape[:-1]
        a2 = a.reshape(-1, a.shape[-1])
        if dequant_scale is not None:
            pt = None if pertoken_scale is None else pertoken_scale[r]
            acc = a2 @ x2[r].to(torch.float64).numpy()  # exact: |acc| < 2**53
            b = None if bias is None else bias[r]
            if b is not None and b.dtype == torch.int32:
                acc = acc + _f64(b)
                b = None
            y = acc * quant_scale_value(dequant_scale[r], truncate=pt is None)
            if pt is not None:
                y = y * _f64(pt).reshape(-1, 1)
            if b is not None:
                y = y + _f64(b)
        else:
            if antiquant_scale is not None:
                off = None if antiquant_offset is None else antiquant_offset[r]
                w = dequant_weight(
                    x2[r],
                    antiquant_scale[r],
                    off,
                    group_size=antiquant_group_size,
                    shape=x2_shape,
                    transposed=x2_transposed,
                    stored_dtype=local_dtype,
                )
            else:
                w = _f64(x2[r])
            y = a2 @ w
            if bias is not None and bias[r] is not None:
                y = y + _f64(bias[r]).reshape(1, -1)  # type: ignore[arg-type]
        y = _round_to(y.reshape(*lead, y.shape[-1]), local_dtype)
        if x3 is not None and x3[r] is not None:
            y = _round_to(y + _f64(x3[r]), local_dtype)  # type: ignore[arg-type]
        total = y if total is None else total + y
    return np.asarray(total)


def all_gather_matmul(
    x1: Sequence[torch.Tensor], x2: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Expected ``(out, gather_out)`` of AllGatherMatmul on one rank (its own x2 and bias)."""
    gathered = np.concatenate([_f64(t) for t in x1])
    out = gathered @ _f64(x2)
    if bias is not None:
        out = out + _f64(bias)
    return out, gathered


def matmul_reduce_scatter(
    rank: int,
    x1: Sequence[torch.Tensor],
    x2: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor | None] | None = None,
    local_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Expected MatmulReduceScatter output on ``rank``: its rows of sum_r (x1 @ x2 + bias).

    ``local_dtype`` rounds each rank's product to that dtype before the sum, as for
    :func:`mm_all_reduce`.
    """
    world = len(x1)
    total = np.zeros((x1[0].shape[0], x2[0].shape[1]), dtype=np.float64)
    for r in range(world):
        y = _f64(x1[r]) @ _f64(x2[r])
        b = None if bias is None else bias[r]
        if b is not None:
            y = y + _f64(b)
        total += _round_to(y, local_dtype)
    rows = total.shape[0] // world
    return total[rank * rows : (rank + 1) * rows]


def ifa_paged(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    probs_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Decode attention over a paged cache (BSH), one batch and head at a time, in float64.

    Batch b's keys are its first ``lengths[b]`` positions, read block by block through
    ``block_table[b]`` from ``key_cache`` ``(blocknum, block_size, N_kv * D)``; query head n
    reads KV head ``n // (N / N_kv)``; a plain softmax (maximum subtracted) weighs the values.
    An empty window gives zeros. Exact by default. With ``probs_dtype`` (the query's dtype)
    the unnormalized probabilities ``exp(s - max)`` are rounded to it before they weigh the
    values and the sum of the unrounded ones divides, as the device's matrix unit and the
    public goldens do (docs/OPS.md, "Where the device rounds"): the op's own precision,
    which the relative standards (double_thousandths) need, as ``local_dtype`` for
    :func:`mm_all_reduce`. Returns ``(B, 1, N * D)``.
    """
    batch = query.shape[0]
    dim = query.shape[-1] // num_heads
    block = key_cache.shape[1]
    q = _f64(query).reshape(batch, num_heads, dim)
    keys = _f64(key_cache).reshape(key_cache.shape[0], block, num_kv_heads, dim)
    values = _f64(value_cache).reshape(keys.shape)
    table = block_table.detach().cpu().numpy()
    group = num_heads // num_kv_heads
    out = np.zeros((batch, num_heads, dim))
    for b in range(batch):
        length = int(lengths[b])
        if length <= 0:
            continue
        blocks = [int(table[b, j]) for j in range(-(-length // block))]
        k_rows = np.concatenate([keys[p] for p in blocks])[:length]
        v_rows = np.concatenate([values[p] for p in blocks])[:length]
        for n in range(num_heads):
            scores = k_rows[:, n // group, :] @ q[b, n] * scale
            weights = np.exp(scores - scores.max())
            out[b, n] = _round_to(weights, probs_dtype) @ v_rows[:, n // group, :] / weights.sum()
    return out.reshape(batch, 1, num_heads * dim)
