"""Tests of mc2sim.kernels.ifa.incre_flash_attention against independent float64 oracles.

Two oracles, neither sharing code with the kernel: torch's scaled_dot_product_attention in
float64 with the window, mask and pse folded into an additive float mask built here, and
explicit per-batch, per-head loops in float64 numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels import ifa as ifa_module
from mc2sim.kernels._ifa_plan import plan_incre_flash_attention
from mc2sim.kernels.ifa import IfaLayout, incre_flash_attention

FLOATS = [torch.float16, torch.bfloat16]
LAYOUTS = ["BSH", "BNSD", "BSND"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, dtype: torch.dtype = torch.float16, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _query(q: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, D) -> the layout's query shape."""
    b, n, d = q.shape
    return {"BNSD": q.view(b, n, 1, d), "BSND": q.view(b, 1, n, d), "BSH": q.view(b, 1, n * d)}[
        layout
    ]


def _kv(kv: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N_kv, S, D) -> the layout's KV shape (a fresh contiguous tensor)."""
    b, n, s, d = kv.shape
    if layout == "BNSD":
        return kv.contiguous()
    bsnd = kv.permute(0, 2, 1, 3).contiguous()
    return bsnd if layout == "BSND" else bsnd.view(b, s, n * d)


def _flat_out(out: torch.Tensor) -> torch.Tensor:
    """Any layout's output -> (B, N, D) float64 (all layouts share the element order)."""
    return out.double().reshape(out.shape[0], -1)


def _sdpa_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    windows: list[tuple[int, int]] | None = None,
    mask: torch.Tensor | None = None,
    pse: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 SDPA; q (B, N, D), k/v (B, N_kv, S, D); mask (B, S) bool; pse (1|B, N, S).

    Returns (B, N*D); rows of empty windows are zero.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, n, d = q.shape
    s = k.shape[2]
    group = n // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    windows = windows or [(0, s)] * b
    bias = torch.zeros(b, n, 1, s, dtype=torch.float64)
    for i, (lo, hi) in enumerate(windows):
        bias[i, :, :, :lo] = -math.inf
        bias[i, :, :, hi:] = -math.inf
    if mask is not None:
        bias = bias + torch.where(mask, -1e12, 0.0).view(b, 1, 1, s)
    if pse is not None:
        bias = bias + pse.double()[..., :s].unsqueeze(2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=bias, scale=scale)
    out = out.reshape(b, n * d)
    for i, (lo, hi) in enumerate(windows):
        if hi <= lo:
            out[i] = 0.0
    return out


def _loop_oracle(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    scale: float,
    windows: list[tuple[int, int]],
    mask: torch.Tensor | None = None,
    pse: torch.Tensor | None = None,
    kv_affine: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    probs_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Per-batch, per-head float64 numpy loops.

    q (B, N, D); keys/values per batch (N_kv, S_b, D); windows per batch [start, end);
    mask (B, S) nonzero = masked (replaced by -1e12); pse (1|B, N, S); kv_affine =
    (k_scale, k_offset, v_scale, v_offset) broadcastable to (N_kv, 1, D): kv = (kv + o) * s.
    probs_dtype: round the unnormalized probabilities exp(s - max) to this dtype before the
    product with the values, dividing by the sum of the unrounded ones (where the device
    rounds); None keeps everything exact. Returns (B, N, D).
    """
    qn = q.double().numpy()
    b, n, d = qn.shape
    out = np.zeros((b, n, d))
    for i in range(b):
        kb = keys[i].double().numpy()
        vb = values[i].double().numpy()
        if kv_affine is not None:
            ks, ko, vs, vo = kv_affine
            kb, vb = (kb + ko) * ks, (vb + vo) * vs
        group = n // kb.shape[0]
        lo, hi = windows[i]
        if hi <= lo:
            continue
        for h in range(n):
            kh, vh = kb[h // group, lo:hi], vb[h // group, lo:hi]
            s = kh @ qn[i, h] * scale
            if pse is not None:
                s = s + pse[0 if pse.shape[0] == 1 else i, h, lo:hi].double().numpy()
            if mask is not None:
                s = np.where(mask[i, lo:hi].numpy() != 0, -1e12, s)
            p = np.exp(s - s.max())
            if probs_dtype is None:
                out[i, h] = (p / p.sum()) @ vh
            else:
                stored = torch.from_numpy(p).to(probs_dtype).double().numpy()
                out[i, h] = (stored @ vh) / p.sum()
    return out


def _assert_close(out: torch.Tensor, ref: torch.Tensor | np.ndarray, dtype: torch.dtype) -> None:
    expected = torch.as_tensor(ref, dtype=torch.float64).reshape(out.shape[0], -1)
    tol = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(_flat_out(out), expected, atol=tol[0], rtol=tol[1])


def _paged(
    kv: torch.Tensor,
    lengths: list[int],
    block: int,
    *,
    heads_first: bool,
    perm: torch.Tensor,
    garbage: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter a dense (B, N_kv, S, D) cache into shuffled blocks; return (cache, table).

    Blocks beyond a batch's length are left as ``garbage``, as are positions past its length
    inside its last block; table entries past a batch's blocks are -1; one spare column.
    """
    b, n, _, d = kv.shape
    needed = [math.ceil(x / block) for x in lengths]
    blocknum = perm.numel()
    shape = (blocknum, n, block, d) if heads_first else (blocknum, block, n * d)
    cache = torch.full(shape, garbage).to(kv.dtype)
    table = torch.full((b, max(needed) + 1), -1, dtype=torch.int32)
    used = 0
    for i in range(b):
        for j in range(needed[i]):
            phys = int(perm[used])
            used += 1
            table[i, j] = phys
            page = kv[i, :, j * block : (j + 1) * block].clone()  # (N_kv, block, D)
            valid = lengths[i] - j * block
            if valid < block:
                page[:, valid:] = torch.tensor(garbage).to(kv.dtype)
            cache[phys] = page if heads_first else page.permute(1, 0, 2).reshape(block, n * d)
    return cache, table


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_with_gqa_match_sdpa(layout: str, dtype: torch.dtype) -> None:
    gen = _gen(1)
    b, n, nkv, d, s = 2, 8, 2, 16, 37
    q, k, v = (
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
    )
    out = incre_flash_attention(
        _query(q, layout),
        _kv(k, layout),
        _kv(v, layout),
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=d**-0.5,
        input_layout=layout,
    )
    assert out.shape == _query(q, layout).shape
    assert out.dtype == dtype
    _assert_close(out, _sdpa_oracle(q, k, v, scale=d**-0.5), dtype)


def test_layout_accepts_the_enum_and_default_kv_heads() -> None:
    gen = _gen(2)
    b, n, d, s = 3, 4, 8, 20
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    out = incre_flash_attention(
        _query(q, "BSH"), _kv(k, "BSH"), _kv(v, "BSH"), num_heads=n, input_layout=IfaLayout.BSH
    )
    _assert_close(out, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)


def test_gqa_query_head_n_reads_kv_head_n_over_group() -> None:
    b, n, nkv, d, s = 1, 8, 2, 4, 5
    q = torch.zeros(b, n, 1, d, dtype=torch.float16)
    k = torch.zeros(b, nkv, s, d, dtype=torch.float16)
    v = torch.arange(nkv, dtype=torch.float16).view(1, nkv, 1, 1).expand(b, nkv, s, d)
    out = incre_flash_attention(
        q, k, v.contiguous(), num_heads=n, num_key_value_heads=nkv, input_layout="BNSD"
    )
    expected = (torch.arange(n) // (n // nkv)).to(torch.float16).view(1, n, 1, 1).expand_as(out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int8, torch.uint8])
@pytest.mark.parametrize("mask_shape", ["BS", "B1S", "B11S"])
def test_atten_mask_dtypes_and_shapes(mask_dtype: torch.dtype, mask_shape: str) -> None:
    gen = _gen(3)
    b, n, nkv, d, s = 3, 4, 2, 16, 24
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, nkv, s, d, gen=gen), _rand(b, nkv, s, d, gen=gen)
    masked = torch.rand(b, s, generator=gen) < 0.4
    masked[:, 0] = False  # every row keeps a position
    mask = masked.to(mask_dtype).view(
        {"BS": (b, s), "B1S": (b, 1, s), "B11S": (b, 1, 1, s)}[mask_shape]
    )
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        atten_mask=mask,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.25,
        input_layout="BNSD",
    )
    _assert_close(out, _sdpa_oracle(q, k, v, scale=0.25, mask=masked), torch.float16)


def test_fully_masked_window_averages_its_values() -> None:
    gen = _gen(4)
    b, n, d, s = 2, 2, 8, 10
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    mask = torch.ones(b, s, dtype=torch.bool)
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        atten_mask=mask,
        actual_seq_lengths=[6, 10],
        num_heads=n,
        input_layout="BNSD",
    )
    expected = torch.stack([v[0, :, :6].double().mean(1), v[1].double().mean(1)])
    _assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pse_batch", [1, 3])
def test_pse_shift_is_added_after_scaling(dtype: torch.dtype, pse_batch: int) -> None:
    gen = _gen(5)
    b, n, nkv, d, s = 3, 4, 1, 16, 19
    q, k, v = (
        _rand(*shape, dtype=dtype, gen=gen) for shape in ((b, n, d), (b, nkv, s, d), (b, nkv, s, d))
    )
    pse = _rand(pse_batch, n, 1, s + 3, dtype=dtype, gen=gen) * 3
    lengths = [19, 7, 12]
    out = incre_flash_attention(
        _query(q, "BSND"),
        _kv(k, "BSND"),
        _kv(v, "BSND"),
        pse_shift=pse,
        actual_seq_lengths=lengths,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.3,
        input_layout="BSND",
    )
    ref = _loop_oracle(
        q, list(k), list(v), scale=0.3, windows=[(0, x) for x in lengths], pse=pse[:, :, 0]
    )
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("lengths", [[5], [0, 9, 17], torch.tensor([17, 1, 4])])
def test_actual_seq_lengths(lengths: Any) -> None:
    gen = _gen(6)
    b, n, d, s = 3, 2, 8, 17
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    out = incre_flash_attention(
        _query(q, "BSH"),
        _kv(k, "BSH"),
        _kv(v, "BSH"),
        actual_seq_lengths=lengths,
        num_heads=n,
        scale_value=0.5,
    )
    ends = [int(x) for x in lengths] * (b if len(lengths) == 1 else 1)
    _assert_close(
        out, _sdpa_oracle(q, k, v, scale=0.5, windows=[(0, e) for e in ends]), torch.float16
    )


def test_empty_windows_give_zero_rows() -> None:
    gen = _gen(7)
    b, n, d, s = 3, 2, 8, 6
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    out = incre_flash_attention(
        _query(q, "BNSD"), k, v, actual_seq_lengths=[0, 6, 0], num_heads=n, input_layout="BNSD"
    )
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    _assert_close(out[1:2], _sdpa_oracle(q[1:2], k[1:2], v[1:2], scale=1.0), torch.float16)
    quant = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        actual_seq_lengths=[0, 0, 0],
        num_heads=n,
        input_layout="BNSD",
        quant_scale2=torch.tensor([2.0]),
        quant_offset2=torch.tensor([5.0]),
    )
    assert quant.dtype == torch.int8 and torch.all(quant == 0)


def test_empty_kv_cache_gives_zeros() -> None:
    q = torch.ones(2, 1, 8, dtype=torch.float16)
    kv = torch.ones(2, 0, 8, dtype=torch.float16)
    out = incre_flash_attention(q, kv, kv, num_heads=2)
    assert out.shape == q.shape and torch.all(out == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_list_kv_with_different_lengths(layout: str) -> None:
    gen = _gen(8)
    b, n, nkv, d = 3, 4, 2, 8
    seqs = [5, 13, 9]
    q = _rand(b, n, d, gen=gen)
    ks = [_rand(1, nkv, s, d, gen=gen) for s in seqs]
    vs = [_rand(1, nkv, s, d, gen=gen) for s in seqs]
    out = incre_flash_attention(
        _query(q, layout),
        [_kv(x, layout) for x in ks],
        tuple(_kv(x, layout) for x in vs),
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.4,
        input_layout=layout,
    )
    ref = _loop_oracle(
        q, [x[0] for x in ks], [x[0] for x in vs], scale=0.4, windows=[(0, s) for s in seqs]
    )
    _assert_close(out, ref, torch.float16)
    lengths = [3, 0, 9]
    out = incre_flash_attention(
        _query(q, layout),
        [_kv(x, layout) for x in ks],
        [_kv(x, layout) for x in vs],
        actual_seq_lengths=lengths,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.4,
        input_layout=layout,
    )
    ref = _loop_oracle(
        q, [x[0] for x in ks], [x[0] for x in vs], scale=0.4, windows=[(0, s) for s in lengths]
    )
    _assert_close(out, ref, torch.float16)


def test_tensor_list_of_one_batch_one_tensor() -> None:
    gen = _gen(9)
    q, k, v = _rand(1, 2, 8, gen=gen), _rand(1, 2, 7, 8, gen=gen), _rand(1, 2, 7, 8, gen=gen)
    out = incre_flash_attention(_query(q, "BNSD"), [k], [v], num_heads=2, input_layout="BNSD")
    _assert_close(out, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)


@pytest.mark.parametrize(
    ("layout", "heads_first"), [("BSH", False), ("BSND", False), ("BNSD", False), ("BNSD", True)]
)
@pytest.mark.parametrize("dtype", FLOATS)
def test_page_attention_matches_dense(layout: str, heads_first: bool, dtype: torch.dtype) -> None:
    gen = _gen(10)
    b, n, nkv, d, block = 3, 4, 2, 16, 16
    lengths = [40, 16, 3]
    s = 48
    q, k, v = (
        _rand(*shape, dtype=dtype, gen=gen) for shape in ((b, n, d), (b, nkv, s, d), (b, nkv, s, d))
    )
    perm = torch.randperm(9, generator=gen)
    kc, table = _paged(k, lengths, block, heads_first=heads_first, perm=perm, garbage=math.nan)
    vc, _ = _paged(v, lengths, block, heads_first=heads_first, perm=perm, garbage=math.nan)
    width = table.shape[1] * block
    masked = torch.rand(b, width, generator=gen) < 0.3
    masked[:, 0] = False
    pse = _rand(b, n, 1, width, dtype=dtype, gen=gen)
    out = incre_flash_attention(
        _query(q, layout),
        kc,
        vc,
        block_table=table,
        actual_seq_lengths=lengths,
        atten_mask=masked.to(torch.uint8),
        pse_shift=pse,
        block_size=block,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=d**-0.5,
        input_layout=layout,
    )
    ref = _sdpa_oracle(
        q,
        k,
        v,
        scale=d**-0.5,
        windows=[(0, x) for x in lengths],
        mask=masked[:, :s],
        pse=pse[:, :, 0],
    )
    assert not torch.isnan(_flat_out(out)).any()
    _assert_close(out, ref, dtype)


def test_page_attention_with_all_lengths_zero() -> None:
    q = torch.ones(2, 1, 32, dtype=torch.float16)
    cache = torch.ones(1, 16, 32, dtype=torch.float16)
    table = torch.zeros(2, 1, dtype=torch.int32)
    out = incre_flash_attention(
        q, cache, cache, block_table=table, actual_seq_lengths=[0, 0], block_size=16, num_heads=2
    )
    assert torch.all(out == 0)


def _int8_kv(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("form", ["per_tensor", "2N1D", "2ND", "2H"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_int8_kv_antiquant(dtype: torch.dtype, form: str, with_offset: bool) -> None:
    gen = _gen(11)
    b, n, nkv, d, s = 2, 4, 2, 8, 21
    q = _rand(b, n, d, dtype=dtype, gen=gen)
    k, v = _int8_kv(gen, b, nkv, s, d), _int8_kv(gen, b, nkv, s, d)
    shape = {"per_tensor": (2,), "2N1D": (2, nkv, 1, d), "2ND": (2, nkv, d), "2H": (2, nkv * d)}[
        form
    ]
    scale = (torch.rand(shape, generator=gen) * 0.02 + 0.005).to(dtype)
    offset = (torch.randn(shape, generator=gen) * 4).round().to(dtype) if with_offset else None
    out = incre_flash_attention(
        _query(q, "BSH"),
        _kv(k, "BSH"),
        _kv(v, "BSH"),
        antiquant_scale=scale,
        antiquant_offset=offset,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.5,
    )
    per = (1, 1, 1) if form == "per_tensor" else (nkv, 1, d)
    sc = scale.double().numpy().reshape(2, *per)
    of = np.zeros((2, *per)) if offset is None else offset.double().numpy().reshape(2, *per)
    ref = _loop_oracle(
        q,
        list(k),
        list(v),
        scale=0.5,
        windows=[(0, s)] * b,
        kv_affine=(sc[0], of[0], sc[1], of[1]),
    )
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("heads_first", [False, True])
def test_int8_kv_antiquant_with_page_attention(heads_first: bool) -> None:
    gen = _gen(12)
    b, n, nkv, d, block, s = 2, 4, 2, 8, 32, 64
    lengths = [50, 33]
    q = _rand(b, n, d, gen=gen)
    k, v = _int8_kv(gen, b, nkv, s, d), _int8_kv(gen, b, nkv, s, d)
    perm = torch.randperm(5, generator=gen)
    kc, table = _paged(k, lengths, block, heads_first=heads_first, perm=perm, garbage=127)
    vc, _ = _paged(v, lengths, block, heads_first=heads_first, perm=perm, garbage=127)
    scale = (torch.rand(2, nkv, 1, d, generator=gen) * 0.02 + 0.005).half()
    offset = (torch.randn(2, nkv, 1, d, generator=gen) * 3).round().half()
    out = incre_flash_attention(
        _query(q, "BNSD"),
        kc,
        vc,
        block_table=table,
        actual_seq_lengths=lengths,
        block_size=block,
        antiquant_scale=scale,
        antiquant_offset=offset,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.5,
        input_layout="BNSD",
    )
    sc, of = scale.double().numpy(), offset.double().numpy()
    ref = _loop_oracle(
        q,
        list(k),
        list(v),
        scale=0.5,
        windows=[(0, x) for x in lengths],
        kv_affine=(sc[0], of[0], sc[1], of[1]),
    )
    _assert_close(out, ref, torch.float16)


def test_int8_kv_antiquant_with_tensor_list() -> None:
    gen = _gen(19)
    b, n, d = 2, 2, 8
    seqs = [9, 4]
    q = _rand(b, n, d, dtype=torch.bfloat16, gen=gen)
    ks = [_int8_kv(gen, 1, s, n * d) for s in seqs]
    vs = [_int8_kv(gen, 1, s, n * d) for s in seqs]
    scale = torch.tensor([0.01, 0.02], dtype=torch.bfloat16)
    offset = torch.tensor([3.0, -2.0], dtype=torch.bfloat16)
    out = incre_flash_attention(
        _query(q, "BSH"),
        ks,
        vs,
        antiquant_scale=scale,
        antiquant_offset=offset,
        num_heads=n,
        scale_value=0.5,
    )
    dense = [x.view(s, n, d).permute(1, 0, 2) for x, s in zip(ks, seqs, strict=True)]
    values = [x.view(s, n, d).permute(1, 0, 2) for x, s in zip(vs, seqs, strict=True)]
    sc, of = scale.double().numpy(), offset.double().numpy()
    ref = _loop_oracle(
        q,
        dense,
        values,
        scale=0.5,
        windows=[(0, s) for s in seqs],
        kv_affine=(sc[0], of[0], sc[1], of[1]),
    )
    _assert_close(out, ref, torch.bfloat16)


# --------------------------------------------------------------------------- where the device rounds


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp16", "bf16"])
def test_probabilities_are_rounded_to_the_query_dtype_before_the_values(
    dtype: torch.dtype,
) -> None:
    """exp(s - max) is stored in the query's dtype for the product with V.

    The sum of the unrounded ones divides it (hicann/ops-transformer incre_flash_attention_
    split_Bbn2s2_Us2.h: DealBmm1ResBaseBlock casts the softmax result to the KV dtype;
    RowDivs by the float32 softmax sum at the end).

    Nearly every output equals the device-rounded float64 oracle rounded once; with float32
    probabilities throughout, a large share of them (a quarter or more) differ from it.
    """
    gen = _gen(30)
    b, n, nkv, d, s = 8, 8, 2, 16, 48
    q, k, v = (
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
    )
    out = incre_flash_attention(
        _query(q, "BNSD"), k, v, num_heads=n, num_key_value_heads=nkv, scale_value=0.5,
        input_layout="BNSD",
    )  # fmt: skip
    windows = [(0, s)] * b
    device = _loop_oracle(q, list(k), list(v), scale=0.5, windows=windows, probs_dtype=dtype)
    exact = _loop_oracle(q, list(k), list(v), scale=0.5, windows=windows)
    got = _flat_out(out)
    assert (
        got == torch.from_numpy(device).to(dtype).double().reshape(b, -1)
    ).double().mean() >= 0.99
    assert (got != torch.from_numpy(exact).to(dtype).double().reshape(b, -1)).double().mean() >= 0.2


def _two_position_int8_call(
    q: torch.Tensor, k1: int, v1: int, scale_value: float, inner: int, v_scale: float = 1.0
) -> torch.Tensor:
    """Attend one fp16 query (1, 1, D) to int8 KV of two positions.

    Position 0 holds zeros; position 1 holds ``k1`` in the key's last channel and ``v1`` in
    every channel of the value.
    """
    d = q.shape[-1]
    k = torch.zeros(1, 2, d, dtype=torch.int8)
    k[0, 1, -1] = k1
    v = torch.zeros(1, 2, d, dtype=torch.int8)
    v[0, 1] = v1
    return incre_flash_attention(
        q, k, v, antiquant_scale=torch.tensor([1.0, v_scale], dtype=torch.float16),
        num_heads=1, scale_value=scale_value, inner_precise=inner,
    )  # fmt: skip


def test_int8_kv_splits_the_query_into_two_or_three_int8_parts() -> None:
    """INT8 KV: the query is split into 2 int8 parts at inner_precise 1, 3 at 0.

    Scaled to 127 / max|q|, each part resolving the last residual in 1/254 (ops-transformer
    IFA kernel AntiquantMatmulPreProcess / AntiquantAIterExpand; ITER_NUM = 2,
    HIGH_PRECISION_ITER_NUM = 3 in incre_flash_attention_tiling_base.h).

    q = (1, 2**-17): 127 * 2**-17 = 9.7e-4 of an int8 step, below the 1/508 that two parts
    resolve, so with 2 parts the score of position 1 is exactly that of position 0 and the
    output averages the values (v1 / 2 = 32); 3 parts resolve it (score 4.8 apart after
    scale_value 5000: about 0.992 * 64), as exact dequantization does.
    """
    q = torch.tensor([1.0, 2.0**-17], dtype=torch.float16).view(1, 1, 2)
    exact_weight = 1.0 / (1.0 + math.exp(-127 * 2.0**-17 * 5000))
    two = _two_position_int8_call(q, 127, 64, 5000.0, inner=1)
    three = _two_position_int8_call(q, 127, 64, 5000.0, inner=0)
    assert two.reshape(-1).tolist() == [32.0, 32.0]
    assert torch.allclose(
        three.double(), torch.tensor(64 * exact_weight, dtype=torch.float64), rtol=2e-3
    )


def test_int8_kv_splits_the_probabilities_into_int8_parts() -> None:
    """INT8 KV: the probabilities times 127 are split into int8 parts as the query is.

    (AntiquantSoftmaxResPreProcess.) A weight of 1.0e-5 is 1.3e-3 of an int8 step: lost by
    2 parts (output 0), kept by 3 (about 1.0e-5 * 127 * 1000 = 1.27, as exact).
    """
    q = torch.tensor([1.0], dtype=torch.float16).view(1, 1, 1)
    # score of position 1: 127 * (-115) / 127 * 0.1 = -11.5, so its weight is e^-11.5 = 1.0e-5
    exact = 127 * 1000.0 * math.exp(-11.5) / (1 + math.exp(-11.5))
    two = _two_position_int8_call(q, -115, 127, 0.1, inner=1, v_scale=1000.0)
    three = _two_position_int8_call(q, -115, 127, 0.1, inner=0, v_scale=1000.0)
    assert two.item() == 0.0
    assert abs(three.item() - exact) < 0.02 * exact


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads_first", [False, True], ids=["bsh_cache", "bnsd_cache"])
def test_in_place_block_path_matches_the_gathered_path(
    dtype: torch.dtype, heads_first: bool
) -> None:
    """The accelerators' in-place page-attention path gives the gathered path's result.

    The cache read block by block in place: same rounding points, another float32 summation
    order. Garbage (NaN) past each window, a partial last block, an empty window, mask, pse.
    """
    gen = _gen(31)
    b, n, nkv, d, block, s = 4, 4, 2, 16, 16, 64
    lengths = [64, 37, 0, 16]
    q, k, v = (
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
        _rand(b, nkv, s, d, dtype=dtype, gen=gen),
    )
    perm = torch.randperm(9, generator=gen)
    kc, table = _paged(k, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    vc, _ = _paged(v, lengths, block, heads_first=heads_first, perm=perm, garbage=float("nan"))
    layout = "BNSD" if heads_first else "BSH"
    plan = plan_incre_flash_attention(
        _query(q, layout), kc, vc, padding_mask=None,
        atten_mask=torch.rand(b, table.shape[1] * block, generator=gen) < 0.2,
        pse_shift=_rand(1, n, 1, table.shape[1] * block, dtype=dtype, gen=gen),
        actual_seq_lengths=lengths, antiquant_scale=None, antiquant_offset=None,
        block_table=table, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
        quant_scale2=None, quant_offset2=None, kv_padding_size=None, num_heads=n,
        scale_value=0.3, input_layout=layout, num_key_value_heads=nkv, block_size=block,
        inner_precise=1,
    )  # fmt: skip
    assert plan.key.blocks is not None  # type: ignore[attr-defined]
    gathered = ifa_module._finish(plan, ifa_module._attend(plan))
    in_place = ifa_module._finish(
        plan,
        ifa_module._attend_in_blocks(plan, plan.key, plan.value, plan.key.blocks),  # type: ignore[arg-type, attr-defined]
    )
    assert not in_place.isnan().any() and not in_place.reshape(b, -1)[2].any()
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(in_place.double(), gathered.double(), rtol=tol, atol=tol)


def test_shared_or_sparse_blocks_take_the_gathered_path() -> None:
    gen = _gen(32)
    q, kv = _rand(2, 2, 16, gen=gen), _rand(10, 16, 32, gen=gen)
    shared = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)  # block 1 in both tables
    sparse = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # 4 of 10 blocks in use
    for table in (shared, sparse):
        plan = plan_incre_flash_attention(
            _query(q, "BSH"), kv, kv, padding_mask=None, atten_mask=None, pse_shift=None,
            actual_seq_lengths=[32, 20], antiquant_scale=None, antiquant_offset=None,
            block_table=table, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
            quant_scale2=None, quant_offset2=None, kv_padding_size=None, num_heads=2,
            scale_value=1.0, input_layout="BSH", num_key_value_heads=2, block_size=16,
            inner_precise=1,
        )  # fmt: skip
        assert plan.key.blocks is None  # type: ignore[attr-defined]


def _assert_quantized(out: torch.Tensor, ref: np.ndarray) -> None:
    """``out`` equals round-half-even(clip(ref)) except within 1e-3 of a rounding tie."""
    got = out.reshape(-1).numpy().astype(np.int64)
    ref = ref.reshape(-1)
    want = np.clip(np.rint(ref), -128, 127).astype(np.int64)
    near_tie = np.abs(np.abs(ref - np.floor(ref)) - 0.5) < 1e-3
    assert np.all(np.abs(got - want) <= 1)
    assert np.array_equal(got[~near_tie], want[~near_tie])


@pytest.mark.parametrize(
    ("dtype", "scale_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_offset", [False, True])
def test_int8_output_quantization(
    dtype: torch.dtype, scale_dtype: torch.dtype, per_channel: bool, with_offset: bool
) -> None:
    gen = _gen(13)
    b, n, nkv, d, s = 2, 4, 2, 8, 15
    q, k, v = (
        _rand(*shape, dtype=dtype, gen=gen) for shape in ((b, n, d), (b, nkv, s, d), (b, nkv, s, d))
    )
    shape = (n, d) if per_channel else (1,)
    scale = (torch.rand(shape, generator=gen) * 150 + 20).to(scale_dtype)
    offset = (torch.randn(shape, generator=gen) * 10).to(scale_dtype) if with_offset else None
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        quant_scale2=scale,
        quant_offset2=offset,
        num_heads=n,
        num_key_value_heads=nkv,
        scale_value=0.25,
        input_layout="BNSD",
    )
    assert out.dtype == torch.int8 and out.shape == (b, n, 1, d)
    attn = _loop_oracle(q, list(k), list(v), scale=0.25, windows=[(0, s)] * b, probs_dtype=dtype)
    sc = scale.double().numpy().reshape(1, *(shape if per_channel else (1, 1)))
    of = 0.0 if offset is None else offset.double().numpy().reshape(sc.shape)
    _assert_quantized(out, attn * sc + of)


def test_int8_output_rounds_half_to_even_and_saturates() -> None:
    # With one KV position the softmax weight is exactly 1, so the output is exactly v.
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.25, 200.0, -300.0], dtype=torch.float16)
    q = torch.zeros(1, 1, 8, dtype=torch.float16)
    out = incre_flash_attention(
        q,
        v.view(1, 1, 8).clone(),
        v.view(1, 1, 8).clone(),
        num_heads=1,
        quant_scale2=torch.tensor([1.0]),
    )
    assert out.reshape(-1).tolist() == [0, 2, 2, 0, -2, 3, 127, -128]
    out = incre_flash_attention(
        q,
        v.view(1, 1, 8).clone(),
        v.view(1, 1, 8).clone(),
        num_heads=1,
        quant_scale2=torch.full((8,), 2.0),
        quant_offset2=torch.full((8,), 0.5),
    )
    assert out.reshape(-1).tolist() == [2, 4, 6, 0, -4, 7, 127, -128]


@pytest.mark.parametrize("padding", [2, 0, -3])
def test_kv_left_padding(padding: int) -> None:
    gen = _gen(14)
    b, n, d, s = 4, 2, 8, 20
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    p = max(padding, 0)
    lengths = [10, 18, 19, 0]
    masked = torch.rand(b, s, generator=gen) < 0.3
    pse = _rand(1, n, 1, s, gen=gen)
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        kv_padding_size=torch.tensor([padding]),
        actual_seq_lengths=lengths,
        atten_mask=masked,
        pse_shift=pse,
        num_heads=n,
        scale_value=0.5,
        input_layout="BNSD",
    )
    windows = []
    for x in lengths:
        start = s - p - x
        windows.append((start, s - p) if start >= 0 else (0, 0))
    ref = _loop_oracle(
        q, list(k), list(v), scale=0.5, windows=windows, mask=masked, pse=pse[:, :, 0]
    )
    _assert_close(out, ref, torch.float16)
    if p == 2:  # batch 2 (19 > 20 - 2) starts before the cache: zeros
        assert torch.all(out[2] == 0)


def test_kv_left_padding_ignores_values_outside_the_window() -> None:
    gen = _gen(15)
    b, n, d, s = 2, 2, 8, 12
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    k[:, :, :4] = math.nan
    v[:, :, :4] = math.inf
    v[:, :, -1] = math.nan
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        kv_padding_size=torch.tensor([1]),
        actual_seq_lengths=[7, 5],
        num_heads=n,
        input_layout="BNSD",
    )
    ref = _loop_oracle(q, list(k), list(v), scale=1.0, windows=[(4, 11), (6, 11)])
    _assert_close(out, ref, torch.float16)


def test_kv_left_padding_takes_effect_only_with_dense_kv_and_lengths() -> None:
    gen = _gen(16)
    b, n, d, s = 2, 2, 16, 32
    q, k, v = _rand(b, n, d, gen=gen), _rand(b, n, s, d, gen=gen), _rand(b, n, s, d, gen=gen)
    pad = torch.tensor([3])
    common: dict[str, Any] = {"num_heads": n, "input_layout": "BNSD"}
    plain = incre_flash_attention(_query(q, "BNSD"), k, v, **common)
    assert torch.equal(
        incre_flash_attention(_query(q, "BNSD"), k, v, kv_padding_size=pad, **common), plain
    )
    listed = incre_flash_attention(
        _query(q, "BNSD"),
        list(k.unsqueeze(1)),
        list(v.unsqueeze(1)),
        kv_padding_size=pad,
        actual_seq_lengths=[s, s],
        **common,
    )
    _assert_close(listed, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)
    perm = torch.arange(4)
    kc, table = _paged(k, [s, s], 16, heads_first=True, perm=perm, garbage=0.0)
    vc, _ = _paged(v, [s, s], 16, heads_first=True, perm=perm, garbage=0.0)
    paged = incre_flash_attention(
        _query(q, "BNSD"),
        kc,
        vc,
        block_table=table,
        block_size=16,
        kv_padding_size=pad,
        actual_seq_lengths=[s, s],
        **common,
    )
    _assert_close(paged, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)


def test_empty_optional_tensors_count_as_absent() -> None:
    gen = _gen(17)
    q, k, v = _rand(2, 2, 8, gen=gen), _rand(2, 2, 6, 8, gen=gen), _rand(2, 2, 6, 8, gen=gen)
    empty = torch.empty(0)
    out = incre_flash_attention(
        _query(q, "BNSD"),
        k,
        v,
        padding_mask=empty,
        atten_mask=empty.bool(),
        pse_shift=empty,
        antiquant_scale=empty,
        antiquant_offset=empty,
        block_table=empty.int(),
        dequant_scale1=empty,
        quant_scale1=empty,
        dequant_scale2=empty,
        quant_scale2=empty,
        quant_offset2=empty,
        kv_padding_size=empty.long(),
        actual_seq_lengths=[],
        num_heads=2,
        input_layout="BNSD",
    )
    assert out.dtype == torch.float16
    _assert_close(out, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)


@pytest.mark.parametrize("inner_precise", [0, 1])
def test_inner_precise_modes_compute_the_same(inner_precise: int) -> None:
    gen = _gen(18)
    q, k, v = _rand(1, 2, 8, gen=gen), _rand(1, 2, 9, 8, gen=gen), _rand(1, 2, 9, 8, gen=gen)
    out = incre_flash_attention(
        _query(q, "BNSD"), k, v, num_heads=2, input_layout="BNSD", inner_precise=inner_precise
    )
    _assert_close(out, _sdpa_oracle(q, k, v, scale=1.0), torch.float16)


def test_seed_document_example() -> None:
    """The aclnnIncreFlashAttentionV4 document's example: BNSD, all ones, int8 zero mask."""
    batch, heads, dim, kv_heads, seq = 1, 2, 16, 2, 16
    query = torch.ones(batch, heads, 1, dim, dtype=torch.float16)
    key = torch.ones(batch, kv_heads, seq, dim, dtype=torch.float16)
    value = torch.ones(batch, kv_heads, seq, dim, dtype=torch.float16)
    mask = torch.zeros(batch, 1, 1, seq, dtype=torch.int8)
    out = incre_flash_attention(
        query,
        [key],
        [value],
        atten_mask=mask,
        actual_seq_lengths=[seq],
        num_heads=heads,
        scale_value=1 / math.sqrt(dim),
        input_layout="BNSD",
        num_key_value_heads=kv_heads,
        block_size=1,
        inner_precise=1,
    )
    assert out.shape == (1, 2, 1, 16) and out.dtype == torch.float16
    assert torch.equal(out, torch.ones_like(out))


def test_checks_run_before_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> torch.Tensor:
        raise AssertionError("attention ran before the checks")

    monkeypatch.setattr(ifa_module, "_attend", boom)
    q = torch.ones(1, 1, 1, 8, dtype=torch.float16)
    with pytest.raises(ParamInvalidError):
        incre_flash_attention(q, q, q, num_heads=1, input_layout="BNSD", inner_precise=5)


# --------------------------------------------------------------------------- errors

Kwargs = dict[str, Any]


def _dense() -> Kwargs:
    """Return a valid BNSD call: B=2, N=4, N_kv=2, D=16, S=32, fp16."""
    gen = _gen(20)
    return {
        "query": _rand(2, 4, 1, 16, gen=gen),
        "key": _rand(2, 2, 32, 16, gen=gen),
        "value": _rand(2, 2, 32, 16, gen=gen),
        "num_heads": 4,
        "num_key_value_heads": 2,
        "input_layout": "BNSD",
    }


def _paged_call(heads_first: bool = False, kv_dtype: torch.dtype = torch.float16) -> Kwargs:
    """Return a valid page-attention call: B=2, N=4, N_kv=2, D=16, block 32, lengths [40, 20]."""
    gen = _gen(21)
    shape = (4, 2, 32, 16) if heads_first else (4, 32, 32)
    kv = _int8_kv(gen, *shape) if kv_dtype == torch.int8 else _rand(*shape, gen=gen)
    call = {
        "query": _rand(2, 4, 1, 16, gen=gen),
        "key": kv,
        "value": kv.clone(),
        "block_table": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        "actual_seq_lengths": [40, 20],
        "block_size": 32,
        "num_heads": 4,
        "num_key_value_heads": 2,
        "input_layout": "BNSD",
    }
    if kv_dtype == torch.int8:
        call["antiquant_scale"] = torch.ones(2, dtype=torch.float16)
    return call


def _run(call: Kwargs) -> torch.Tensor:
    call = dict(call)
    return incre_flash_attention(call.pop("query"), call.pop("key"), call.pop("value"), **call)


def test_valid_bases_run() -> None:
    assert _run(_dense()).shape == (2, 4, 1, 16)
    assert _run(_paged_call()).shape == (2, 4, 1, 16)
    assert _run(_paged_call(heads_first=True)).shape == (2, 4, 1, 16)
    assert _run(_paged_call(kv_dtype=torch.int8)).shape == (2, 4, 1, 16)


def _with(base: Callable[[], Kwargs], **changes: Any) -> Callable[[], Kwargs]:
    def make() -> Kwargs:
        call = base()
        for name, change in changes.items():
            call[name] = change(call) if callable(change) else change
        return call

    return make


def _bsh(call: Kwargs) -> Kwargs:
    call["query"] = call["query"].reshape(2, 1, 64)
    call["key"] = call["key"].permute(0, 2, 1, 3).reshape(2, 32, 32)
    call["value"] = call["value"].permute(0, 2, 1, 3).reshape(2, 32, 32)
    call["input_layout"] = "BSH"
    return call


def _list_kv(seqs: list[int], **shape_changes: int) -> Callable[[], Kwargs]:
    def make() -> Kwargs:
        call = _dense()
        gen = _gen(22)
        call["key"] = [_rand(1, 2, s, 16, gen=gen) for s in seqs]
        call["value"] = [_rand(1, 2, s, 16, gen=gen) for s in seqs]
        for index, heads in shape_changes.items():
            i = int(index.removeprefix("bad"))
            call["key"][i] = _rand(1, heads, seqs[i], 16, gen=gen)
            call["value"][i] = _rand(1, heads, seqs[i], 16, gen=gen)
        return call

    return make


NULLPTR_CASES: dict[str, tuple[Callable[[], Kwargs], str]] = {
    "query_missing": (_with(_dense, query=None), "query"),
    "key_missing": (_with(_dense, key=None), "key"),
    "value_missing": (_with(_dense, value=None), "value"),
    "key_list_entry_missing": (_with(_dense, key=lambda c: [c["key"][:1], None]), "key[1]"),
    "antiquant_scale_missing_for_int8_kv": (
        _with(
            _dense, key=lambda c: c["key"].to(torch.int8), value=lambda c: c["value"].to(torch.int8)
        ),
        "antiquant_scale",
    ),
    "actual_seq_lengths_missing_with_page_attention": (
        _with(_paged_call, actual_seq_lengths=None),
        "actual_seq_lengths",
    ),
    "quant_scale2_missing_with_quant_offset2": (
        _with(_dense, quant_offset2=torch.tensor([1.0])),
        "quant_scale2",
    ),
}


@pytest.mark.parametrize("case", sorted(NULLPTR_CASES))
def test_missing_required_input_raises_nullptr(case: str) -> None:
    make, param = NULLPTR_CASES[case]
    with pytest.raises(ParamNullptrError) as info:
        _run(make())
    assert info.value.code == 161001
    assert info.value.param == param


INVALID_CASES: dict[str, tuple[Callable[[], Kwargs], str]] = {
    # unused / unsupported inputs
    "padding_mask_given": (_with(_dense, padding_mask=torch.zeros(2, 32)), "padding_mask"),
    "dequant_scale1_given": (_with(_dense, dequant_scale1=torch.ones(1)), "dequant_scale1"),
    "quant_scale1_given": (_with(_dense, quant_scale1=torch.ones(1)), "quant_scale1"),
    "dequant_scale2_given": (_with(_dense, dequant_scale2=torch.ones(1)), "dequant_scale2"),
    # attributes
    "input_layout_unknown": (_with(_dense, input_layout="TND"), "input_layout"),
    "input_layout_not_a_string": (_with(_dense, input_layout=3), "input_layout"),
    "inner_precise_2": (_with(_dense, inner_precise=2), "inner_precise"),
    "inner_precise_bool": (_with(_dense, inner_precise=True), "inner_precise"),
    "num_heads_zero": (_with(_dense, num_heads=0), "num_heads"),
    "num_heads_over_256": (_with(_dense, num_heads=257), "num_heads"),
    "num_kv_heads_not_a_divisor": (_with(_dense, num_key_value_heads=3), "num_key_value_heads"),
    "num_kv_heads_negative": (_with(_dense, num_key_value_heads=-2), "num_key_value_heads"),
    "num_kv_heads_above_num_heads": (_with(_dense, num_key_value_heads=8), "num_key_value_heads"),
    "group_over_64": (
        _with(_dense, num_heads=128, num_key_value_heads=1, query=torch.ones(2, 128, 1, 16).half()),
        "num_heads / num_key_value_heads",
    ),
    "scale_value_not_a_number": (_with(_dense, scale_value="0.1"), "scale_value"),
    # query
    "query_not_a_tensor": (_with(_dense, query=[1.0]), "query"),
    "query_float32": (_with(_dense, query=lambda c: c["query"].float()), "query.dtype"),
    "qkv_all_int8": (
        _with(
            _dense,
            query=lambda c: c["query"].to(torch.int8),
            key=lambda c: c["key"].to(torch.int8),
            value=lambda c: c["value"].to(torch.int8),
        ),
        "query.dtype",
    ),
    "query_rank": (_with(_dense, query=lambda c: c["query"][0]), "query.shape"),
    "query_s_not_1": (_with(_dense, query=torch.ones(2, 4, 2, 16).half()), "query.shape"),
    "query_heads_not_num_heads": (
        _with(_dense, query=torch.ones(2, 2, 1, 16).half()),
        "query.shape",
    ),
    "query_bsh_h_not_multiple": (
        _with(_dense, input_layout="BSH", query=torch.ones(2, 1, 66).half()),
        "query.shape",
    ),
    "batch_over_65536": (
        _with(_dense, query=torch.ones(65537, 4, 1, 16).half()),
        "query.shape",
    ),
    "head_dim_over_512": (_with(_dense, query=torch.ones(2, 4, 1, 513).half()), "query.shape"),
    # key / value
    "key_not_a_tensor": (_with(_dense, key=3), "key"),
    "key_empty_list": (_with(_dense, key=[]), "key"),
    "key_list_entry_not_a_tensor": (_with(_dense, key=lambda c: [c["key"][:1], "x"]), "key[1]"),
    "value_list_length": (_with(_dense, value=lambda c: [c["value"]] * 2), "value"),
    "key_dtype_bf16_with_fp16_query": (
        _with(_dense, key=lambda c: c["key"].bfloat16(), value=lambda c: c["value"].bfloat16()),
        "key.dtype",
    ),
    "key_float32": (
        _with(_dense, key=lambda c: c["key"].float(), value=lambda c: c["value"].float()),
        "key.dtype",
    ),
    "value_dtype_differs": (
        _with(_dense, value=lambda c: c["value"].to(torch.int8)),
        "value.dtype",
    ),
    "key_rank": (
        _with(_dense, key=lambda c: c["key"][0], value=lambda c: c["value"][0]),
        "key.shape",
    ),
    "key_heads_not_kv_heads": (
        _with(
            _dense,
            key=lambda c: c["key"].repeat(1, 2, 1, 1),
            value=lambda c: c["value"].repeat(1, 2, 1, 1),
        ),
        "key.shape",
    ),
    "key_head_dim_differs": (
        _with(_dense, key=lambda c: c["key"][..., :8], value=lambda c: c["value"][..., :8]),
        "key.shape",
    ),
    "key_bsh_hidden_differs": (
        _with(
            lambda: _bsh(_dense()),
            key=lambda c: c["key"][..., :16],
            value=lambda c: c["value"][..., :16],
        ),
        "key.shape",
    ),
    "key_batch_differs": (
        _with(_dense, key=lambda c: c["key"][:1], value=lambda c: c["value"][:1]),
        "key.shape",
    ),
    "value_shape_differs": (_with(_dense, value=lambda c: c["value"][:, :, :16]), "value.shape"),
    # tensor lists
    "list_length_not_batch": (_list_kv([5, 6, 7]), "key"),
    "list_batch_over_256": (
        _with(
            _dense,
            query=torch.ones(257, 4, 1, 16).half(),
            key=[torch.ones(1, 2, 1, 16).half()] * 257,
            value=[torch.ones(1, 2, 1, 16).half()] * 257,
        ),
        "key",
    ),
    "list_entry_batch_not_1": (
        _with(_dense, key=lambda c: [c["key"], c["key"]], value=lambda c: [c["value"], c["value"]]),
        "key[0].shape",
    ),
    "list_entries_differ_beyond_s": (_list_kv([5, 6], bad1=4), "key[1].shape"),
    "list_value_shape_differs": (
        _with(_list_kv([5, 6]), value=lambda c: [c["value"][0], c["value"][0]]),
        "value[1].shape",
    ),
    "list_value_dtype_differs": (
        _with(_list_kv([5, 6]), value=lambda c: [c["value"][0], c["value"][1].bfloat16()]),
        "value[1].dtype",
    ),
    # actual_seq_lengths
    "lengths_over_s": (_with(_dense, actual_seq_lengths=[32, 33]), "actual_seq_lengths[1]"),
    "lengths_over_list_entry_s": (
        _with(_list_kv([5, 6]), actual_seq_lengths=[6, 6]),
        "actual_seq_lengths[0]",
    ),
    "lengths_negative": (_with(_dense, actual_seq_lengths=[3, -1]), "actual_seq_lengths"),
    "lengths_count": (_with(_dense, actual_seq_lengths=[3, 4, 5]), "actual_seq_lengths"),
    "lengths_not_ints": (_with(_dense, actual_seq_lengths=[3.0, 4.0]), "actual_seq_lengths"),
    "lengths_not_a_sequence": (_with(_dense, actual_seq_lengths=5), "actual_seq_lengths"),
    "lengths_float_tensor": (
        _with(_dense, actual_seq_lengths=torch.tensor([3.0, 4.0])),
        "actual_seq_lengths.dtype",
    ),
    "lengths_2d_tensor": (
        _with(_dense, actual_seq_lengths=torch.tensor([[3, 4]])),
        "actual_seq_lengths.shape",
    ),
    # page attention
    "block_size_zero": (_with(_paged_call, block_size=0), "block_size"),
    "block_size_over_512": (_with(_paged_call, block_size=528), "block_size"),
    "block_size_not_16_aligned": (_with(_paged_call, block_size=24), "block_size"),
    "block_size_not_32_aligned_int8": (
        _with(lambda: _paged_call(kv_dtype=torch.int8), block_size=16),
        "block_size",
    ),
    "block_size_not_an_int": (_with(_paged_call, block_size=32.0), "block_size"),
    "block_table_int64": (
        _with(_paged_call, block_table=lambda c: c["block_table"].long()),
        "block_table.dtype",
    ),
    "block_table_rank": (
        _with(_paged_call, block_table=lambda c: c["block_table"][0]),
        "block_table.shape",
    ),
    "block_table_batch": (
        _with(_paged_call, block_table=lambda c: c["block_table"][:1]),
        "block_table.shape",
    ),
    "block_table_too_narrow": (
        _with(_paged_call, block_table=lambda c: c["block_table"][:, :1]),
        "block_table.shape",
    ),
    "block_table_entry_out_of_range": (
        _with(_paged_call, block_table=torch.tensor([[0, 4], [2, 3]], dtype=torch.int32)),
        "block_table[0][1]",
    ),
    "block_table_entry_negative": (
        _with(_paged_call, block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)),
        "block_table[1][0]",
    ),
    "blocknum_too_small": (
        _with(_paged_call, key=lambda c: c["key"][:2], value=lambda c: c["value"][:2]),
        "key.shape",
    ),
    "paged_cache_list_of_two": (
        _with(
            _paged_call,
            key=lambda c: [c["key"], c["key"]],
            value=lambda c: [c["value"], c["value"]],
        ),
        "key",
    ),
    "paged_cache_rank": (
        _with(_paged_call, key=lambda c: c["key"][0], value=lambda c: c["value"][0]),
        "key.shape",
    ),
    "paged_cache_block_dim_not_block_size": (
        _with(
            _paged_call,
            block_size=16,
            block_table=torch.tensor([[0, 1, 2], [3, 3, 3]], dtype=torch.int32),
        ),
        "key.shape",
    ),
    "paged_heads_first_cache_needs_bnsd": (
        _with(
            lambda: _paged_call(heads_first=True),
            input_layout="BSND",
            query=torch.ones(2, 1, 4, 16).half(),
        ),
        "key.shape",
    ),
    "paged_heads_first_cache_shape": (
        _with(
            lambda: _paged_call(heads_first=True),
            key=lambda c: c["key"][:, :1],
            value=lambda c: c["value"][:, :1],
        ),
        "key.shape",
    ),
    "paged_value_shape_differs": (
        _with(_paged_call, value=lambda c: c["value"][:3]),
        "value.shape",
    ),
    "paged_bsh_cache_hidden_over_64k": (
        lambda: {
            "query": torch.ones(1, 256, 1, 256).half(),
            "key": torch.ones(1, 16, 65536).half(),
            "value": torch.ones(1, 16, 65536).half(),
            "block_table": torch.zeros(1, 1, dtype=torch.int32),
            "actual_seq_lengths": [16],
            "block_size": 16,
            "num_heads": 256,
            "input_layout": "BNSD",
        },
        "num_key_value_heads * D",
    ),
    "paged_mask_shorter_than_table_width": (
        _with(_paged_call, atten_mask=torch.zeros(2, 40, dtype=torch.bool)),
        "atten_mask.shape",
    ),
    "paged_pse_shorter_than_table_width": (
        _with(_paged_call, pse_shift=torch.zeros(2, 4, 1, 63).half()),
        "pse_shift.shape",
    ),
    # atten_mask
    "mask_float": (_with(_dense, atten_mask=torch.zeros(2, 32)), "atten_mask.dtype"),
    "mask_not_a_tensor": (_with(_dense, atten_mask=[[0] * 32] * 2), "atten_mask"),
    "mask_rank_1": (
        _with(_dense, atten_mask=torch.zeros(32, dtype=torch.bool)),
        "atten_mask.shape",
    ),
    "mask_batch": (
        _with(_dense, atten_mask=torch.zeros(1, 32, dtype=torch.bool)),
        "atten_mask.shape",
    ),
    "mask_middle_dim": (
        _with(_dense, atten_mask=torch.zeros(2, 4, 1, 32, dtype=torch.bool)),
        "atten_mask.shape",
    ),
    "mask_too_short": (
        _with(_dense, atten_mask=torch.zeros(2, 31, dtype=torch.bool)),
        "atten_mask.shape",
    ),
    "mask_shorter_than_lengths": (
        _with(
            _dense, actual_seq_lengths=[20, 10], atten_mask=torch.zeros(2, 19, dtype=torch.uint8)
        ),
        "atten_mask.shape",
    ),
    "mask_values_not_0_1": (
        _with(_dense, atten_mask=torch.full((2, 32), 2, dtype=torch.int8)),
        "atten_mask",
    ),
    # pse_shift
    "pse_dtype": (_with(_dense, pse_shift=torch.zeros(2, 4, 1, 32)), "pse_shift.dtype"),
    "pse_rank": (_with(_dense, pse_shift=torch.zeros(2, 4, 32).half()), "pse_shift.shape"),
    "pse_batch": (_with(_dense, pse_shift=torch.zeros(3, 4, 1, 32).half()), "pse_shift.shape"),
    "pse_heads": (_with(_dense, pse_shift=torch.zeros(2, 2, 1, 32).half()), "pse_shift.shape"),
    "pse_s1_not_1": (_with(_dense, pse_shift=torch.zeros(2, 4, 2, 32).half()), "pse_shift.shape"),
    "pse_too_short": (_with(_dense, pse_shift=torch.zeros(1, 4, 1, 31).half()), "pse_shift.shape"),
    # antiquant
    "antiquant_with_float_kv": (
        _with(_dense, antiquant_scale=torch.ones(2).half()),
        "antiquant_scale",
    ),
    "antiquant_offset_with_float_kv": (
        _with(_dense, antiquant_offset=torch.ones(2).half()),
        "antiquant_offset",
    ),
    "antiquant_scale_dtype": (
        _with(lambda: _paged_call(kv_dtype=torch.int8), antiquant_scale=torch.ones(2)),
        "antiquant_scale.dtype",
    ),
    "antiquant_scale_shape": (
        _with(
            lambda: _paged_call(kv_dtype=torch.int8), antiquant_scale=torch.ones(2, 4, 1, 16).half()
        ),
        "antiquant_scale.shape",
    ),
    "antiquant_offset_dtype": (
        _with(lambda: _paged_call(kv_dtype=torch.int8), antiquant_offset=torch.ones(2).bfloat16()),
        "antiquant_offset.dtype",
    ),
    "antiquant_offset_shape": (
        _with(lambda: _paged_call(kv_dtype=torch.int8), antiquant_offset=torch.ones(2, 32).half()),
        "antiquant_offset.shape",
    ),
    # output quantization
    "quant_scale2_float16": (
        _with(_dense, quant_scale2=torch.ones(1).half()),
        "quant_scale2.dtype",
    ),
    "quant_scale2_bf16_with_fp16_query": (
        _with(_dense, quant_scale2=torch.ones(1).bfloat16()),
        "quant_scale2.dtype",
    ),
    "quant_scale2_elements": (_with(_dense, quant_scale2=torch.ones(32)), "quant_scale2.shape"),
    "quant_offset2_dtype": (
        _with(_dense, quant_scale2=torch.ones(64), quant_offset2=torch.ones(64).double()),
        "quant_offset2.dtype",
    ),
    "quant_offset2_shape": (
        _with(_dense, quant_scale2=torch.ones(4, 16), quant_offset2=torch.ones(64)),
        "quant_offset2.shape",
    ),
    # kv_padding_size
    "kv_padding_size_int32": (
        _with(_dense, kv_padding_size=torch.tensor([1], dtype=torch.int32)),
        "kv_padding_size.dtype",
    ),
    "kv_padding_size_two_elements": (
        _with(_dense, kv_padding_size=torch.tensor([1, 2])),
        "kv_padding_size.shape",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CASES))
def test_broken_rule_raises_param_invalid(case: str) -> None:
    make, param = INVALID_CASES[case]
    with pytest.raises(ParamInvalidError) as info:
        _run(make())
    assert info.value.code == 161002
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_error_message_names_value_and_rule() -> None:
    with pytest.raises(ParamInvalidError) as info:
        _run(_with(_paged_call, block_size=24)())
    assert str(info.value) == "block_size=24: must be a multiple of 16 with FLOAT16/BFLOAT16 KV"
    with pytest.raises(ParamInvalidError, match="all INT8"):
        _run(INVALID_CASES["qkv_all_int8"][0]())


def test_a_reused_block_table_is_checked_once_until_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table's values are read on the host once per table version.

    A decode step's layers share one table; an in-place change through torch, or a longer
    window reaching entries not checked yet, is read again and an out-of-range id still
    raises 161002.
    """
    from mc2sim.kernels import _ifa_plan

    reads: list[int] = []
    real = _ifa_plan._read_entries

    def counted(table: torch.Tensor, used: int) -> torch.Tensor:
        reads.append(used)
        return real(table, used)

    monkeypatch.setattr(_ifa_plan, "_read_entries", counted)
    call = _paged_call()  # lengths [40, 20], block 32: entries [0][0:2] and [1][0] in use
    # a CPU table is read on every call: a numpy view can change it behind torch's back
    entries = np.array([[0, 1, 99], [2, 99, 99]], dtype=np.int32)
    call["block_table"] = torch.from_numpy(entries)
    first = _run(call)
    assert torch.equal(_run(call), first) and reads == [2, 2]
    entries[0, 1] = 4
    with pytest.raises(ParamInvalidError) as info:
        _run(call)
    assert info.value.code == 161002 and info.value.param == "block_table[0][1]"
    # off the CPU a table is remembered; the same rule on a CPU table, for a host-only test
    monkeypatch.setattr(_ifa_plan, "_ALWAYS_READ", frozenset())
    reads.clear()
    table = torch.tensor([[0, 1, 99], [2, 99, 99]], dtype=torch.int32)
    call["block_table"] = table
    assert torch.equal(_run(call), first) and torch.equal(_run(call), first) and reads == [2]
    table[0, 1] = 4  # in place through torch: the version changes
    with pytest.raises(ParamInvalidError) as info:
        _run(call)
    assert info.value.code == 161002 and info.value.param == "block_table[0][1]"
    table[0, 1] = 1
    assert torch.equal(_run(call), first) and reads == [2, 2, 2]
    assert torch.equal(_run(dict(call, block_table=table.clone())), first)  # another tensor
    assert reads == [2, 2, 2, 2]
    # a longer window reaches entry [1][1], never checked: read again
    with pytest.raises(ParamInvalidError) as info:
        _run(dict(call, actual_seq_lengths=[20, 40]))
    assert info.value.code == 161002 and info.value.param == "block_table[1][1]"
    assert reads == [2, 2, 2, 2, 2]


def test_a_remembered_table_changed_unseen_is_checked_where_its_entries_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that bypasses torch's version counter skips the remembered check, not the read.

    The torch composition reads the entries in use on the host to gather blocks
    (``PageTable.resolve``); an entry out of the cache raises 161002 there, naming the same
    entry as the check at planning would, instead of reaching an index on the device.
    """
    from mc2sim.kernels import _ifa_plan

    monkeypatch.setattr(_ifa_plan, "_ALWAYS_READ", frozenset())  # remember a CPU table
    monkeypatch.setattr(_ifa_plan, "_CHECKED_TABLES", {})
    call = _paged_call()  # lengths [40, 20], block 32: entries [0][0:2] and [1][0] in use
    table = torch.tensor([[0, 1, 99], [2, 99, 99]], dtype=torch.int32)
    first = _run(dict(call, block_table=table))
    table.numpy()[1, 0] = 7  # blocknum is 4 (_paged_call): out of the cache, version unchanged
    assert table._version == 0
    with pytest.raises(ParamInvalidError) as info:
        _run(dict(call, block_table=table))
    assert info.value.code == 161002 and info.value.param == "block_table[1][0]"
    assert str(info.value) == "block_table[1][0]=7: must be a block index in [0, blocknum=4)"
    table.numpy()[1, 2] = -5  # past batch 1's length: never read, never checked
    table.numpy()[1, 0] = 2
    assert torch.equal(_run(dict(call, block_table=table)), first)


# --------------------------------------------------------------------------- call keys


def _key(call: Kwargs) -> tuple[object, ...] | None:
    """``call_key`` of a call, or None where another optional input is given."""
    from mc2sim.kernels._ifa_plan import call_key

    optional = set(call) - {
        "query", "key", "value", "block_table", "actual_seq_lengths", "num_heads",
        "scale_value", "input_layout", "num_key_value_heads", "block_size", "inner_precise",
    }  # fmt: skip
    if any(call[name] is not None for name in optional):
        return None
    return call_key(
        call["query"], call["key"], call["value"], call.get("block_table"),
        call.get("actual_seq_lengths"), call.get("num_heads", 1), call.get("scale_value", 1.0),
        call.get("input_layout", "BSH"), call.get("num_key_value_heads", 0),
        call.get("block_size", 0), call.get("inner_precise", 1),
    )  # fmt: skip


def _valid_calls() -> list[Kwargs]:
    return [
        _dense(),
        _bsh(_dense()),
        _with(_dense, actual_seq_lengths=[32, 7])(),
        _paged_call(),
        _paged_call(heads_first=True),
    ]


@pytest.mark.parametrize("case", sorted(INVALID_CASES) + sorted(NULLPTR_CASES))
def test_no_call_the_checks_reject_shares_a_key_with_one_they_pass(case: str) -> None:
    """A call of a passed call's key skips the checks on CUDA: the key must tell them apart.

    Only the block table's entries are data the key does not hold; a call of the key still
    checks them (``check_table_entries``).
    """
    make = (INVALID_CASES.get(case) or NULLPTR_CASES[case])[0]
    key = _key(make())
    if case.startswith("block_table_entry_"):
        assert key in {_key(c) for c in _valid_calls()}  # rejected for its data
        return
    assert key is None or key not in {_key(c) for c in _valid_calls()}


def test_calls_of_one_key_resolve_into_the_same_plan_but_for_their_data() -> None:
    """Other data of the same dtypes, shapes, strides and lengths: one key, one plan shape."""
    from mc2sim.kernels._ifa_plan import plan_incre_flash_attention

    def plan(call: Kwargs) -> Any:
        full = dict.fromkeys(
            ["padding_mask", "atten_mask", "pse_shift", "actual_seq_lengths",
             "antiquant_scale", "antiquant_offset", "block_table", "dequant_scale1",
             "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
             "kv_padding_size"]
        )  # fmt: skip
        full.update(num_heads=1, scale_value=1.0, input_layout="BSH", num_key_value_heads=0)
        full.update(block_size=0, inner_precise=1)
        full.update(call)
        return plan_incre_flash_attention(**full)

    static = ("batch", "num_heads", "num_kv_heads", "head_dim", "starts", "ends", "length",
              "block_size", "scale_value", "out_dtype", "out_shape")  # fmt: skip
    for call in _valid_calls():
        gen = _gen(99)
        other = dict(call)
        for name in ("query", "key", "value"):
            other[name] = torch.randn(call[name].shape, generator=gen).to(call[name].dtype)
        if "block_table" in call:
            other["block_table"] = call["block_table"].flip(0).contiguous()
        assert _key(other) == _key(call) is not None
        a, b = plan(call), plan(other)
        assert [getattr(a, f) for f in static] == [getattr(b, f) for f in static]
    # what the checks or the plan read makes another key
    base = _dense()
    changed = [
        dict(base, key=base["key"].transpose(2, 3).contiguous().transpose(2, 3)),  # strides
        dict(base, query=base["query"].bfloat16()),
        dict(base, actual_seq_lengths=[32, 31]),
        dict(base, scale_value=-0.0),
        dict(base, num_key_value_heads=4, key=base["key"].repeat(1, 2, 1, 1)),
        dict(base, inner_precise=0),
    ]
    keys = {_key(c) for c in changed}
    assert len(keys) == len(changed) and _key(dict(base, scale_value=0.0)) not in keys
    assert _key(base) not in keys
    # what the key cannot tell: None
    for odd in (
        dict(base, num_heads=True),
        dict(base, num_heads=np.int64(4)),
        dict(base, scale_value=np.float32(0.5)),
        dict(base, input_layout=None),
        dict(base, actual_seq_lengths=torch.tensor([32, 32])),
        dict(base, actual_seq_lengths=[32, np.int64(32)]),
        dict(base, actual_seq_lengths=range(2)),
        dict(base, key=[base["key"][:1], base["key"][1:]]),
        dict(base, query=torch.nn.Parameter(base["query"], requires_grad=False)),
        dict(base, block_table=[[0, 1]]),
    ):
        assert _key(odd) is None
