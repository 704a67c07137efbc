"""Parameter checks of incre_flash_attention, resolving its inputs into an attention plan.

Every rule of aclnnIncreFlashAttentionV4's documentation (``003_9f5b11f2b5cf9769.txt``; the
"A2" product line's limits) is checked here, before any arithmetic, raising
``ParamNullptrError`` for a missing required input and ``ParamInvalidError`` otherwise. Where
the document is silent, the checks follow the operator's own tiling code; each such rule says
so where it is checked.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from mc2sim import limits
from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError, ParamNullptrError
from mc2sim.kernels._cache import put_bounded
from mc2sim.kernels._device import same_device
from mc2sim.kernels._ifa_sources import (
    Antiquant,
    DenseKV,
    KVSource,
    ListKV,
    PagedKV,
    PageTable,
    blocks_needed,
    check_entries,
)
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank

__all__ = [
    "IfaLayout",
    "IfaPlan",
    "call_key",
    "check_table_entries",
    "plan_incre_flash_attention",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
_KV_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
_QUANT_DTYPES = (torch.float32, torch.bfloat16)


class IfaLayout(StrEnum):
    """Axis order of query, key, value and the output (``input_layout``).

    Glossary: B batch; S sequence length (1 for the query, the KV cache length for key and
    value); N heads (``num_heads`` for query and output, ``num_key_value_heads`` for key and
    value); D head dimension; H = N * D, the hidden size.
    """

    BSH = "BSH"
    """(B, S, H)."""
    BNSD = "BNSD"
    """(B, N, S, D)."""
    BSND = "BSND"
    """(B, S, N, D)."""


_LAYOUTS = {layout.value: layout for layout in IfaLayout}
"""``input_layout`` strings to their layout."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IfaPlan:
    """Everything the attention needs, checked and resolved."""

    batch: int
    """B."""
    num_heads: int
    """N, the query heads."""
    num_kv_heads: int
    """N_kv; query head n reads KV head n // (N / N_kv)."""
    head_dim: int
    """D."""
    query: torch.Tensor
    """The query as given (B * N * D elements, in head-major order in every layout)."""
    key: KVSource
    """Reader of the keys (the cache's own values: int8 stays int8)."""
    value: KVSource
    """Reader of the values."""
    key_antiquant: Antiquant | None
    """With an int8 cache, the keys' ``(k + offset) * scale``; else ``None``."""
    value_antiquant: Antiquant | None
    """With an int8 cache, the values' ``(v + offset) * scale``; else ``None``."""
    inner_precise: int
    """0 (high precision) or 1 (high performance): with an int8 cache, how many int8 parts
    the query and the probabilities are split into (3 or 2)."""
    starts: tuple[int, ...]
    """Per batch, the first KV position attended."""
    ends: tuple[int, ...]
    """Per batch, one past the last KV position attended; the window is empty if <= start."""
    length: int
    """Positions the scores span: the largest window end (a block multiple with page attention)."""
    block_size: int
    """Chunk bounds must be multiples of this (1 without page attention)."""
    atten_mask: torch.Tensor | None
    """``(B, S_mask)`` with S_mask >= length, nonzero = masked; ``None`` for no mask."""
    pse_shift: torch.Tensor | None
    """``(1 or B, N, S_pse)`` with S_pse >= length; ``None`` for none."""
    scale_value: float
    """Multiplies q k^T."""
    quant_scale2: torch.Tensor | None
    """float32, ``(1, 1)`` or ``(N, D)``: INT8 output when given."""
    quant_offset2: torch.Tensor | None
    """float32, same shape as ``quant_scale2``; ``None`` means 0."""
    out_dtype: torch.dtype
    """The query's dtype, or int8 with output quantization."""
    out_shape: tuple[int, ...]
    """The query's shape."""


def _present(value: object) -> object:
    """Return ``value``, or ``None`` for an empty tensor (optional inputs accept empty tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 0:
        return None
    return value


def _require_int(param: str, value: object, ok: bool, rule: str) -> int:
    """Return ``value`` as an int after checking it is one and ``ok`` holds."""
    if type(value) is int:  # the common case, without the abstract-class check
        require(param, value, ok, rule)
        return value
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    require(param, value, is_int, "must be an integer")
    require(param, value, ok, rule)
    return int(cast(numbers.Integral, value))


def _tensor(param: str, value: object) -> torch.Tensor:
    """Return ``value`` after checking it is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise ParamInvalidError(param, type(value).__name__, "must be a torch.Tensor")
    return value


def _tensor_list(param: str, value: object) -> list[torch.Tensor]:
    """Return key or value as a list of tensors (a single tensor is a list of one)."""
    require_not_none(param, value)
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ParamInvalidError(
            param, type(value).__name__, "must be a tensor or a list of tensors"
        )
    require(param, value, len(value) > 0, "must hold at least one tensor")
    items: list[torch.Tensor] = []
    for i, item in enumerate(value):
        require_not_none(f"{param}[{i}]", item)
        items.append(_tensor(f"{param}[{i}]", item))
    return items


def _parse_lengths(value: object, batch: int) -> list[int] | None:
    """Return actual_seq_lengths as B ints (one value is broadcast), or None when absent."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        require_dtype("actual_seq_lengths", value, (torch.int64, torch.int32))
        require_rank("actual_seq_lengths", value, (1,))
        items: list[object] = list(value.tolist())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
    else:
        raise ParamInvalidError(
            "actual_seq_lengths", type(value).__name__, "must be a sequence of ints"
        )
    if not items:
        return None  # an empty list counts as absent, as an empty tensor does
    if not all(type(item) is int for item in items):  # plain ints need no further look
        for item in items:
            _require_int("actual_seq_lengths", item, True, "")
    if len(items) not in (1, batch):
        raise ParamInvalidError("actual_seq_lengths", items, f"must hold 1 or B={batch} lengths")
    lengths = [int(cast(numbers.Integral, x)) for x in items]
    require("actual_seq_lengths", lengths, min(lengths) >= 0, "lengths must be >= 0")
    return lengths * batch if len(lengths) == 1 else lengths


def _kv_view(t: torch.Tensor, layout: IfaLayout, heads: int, dim: int) -> torch.Tensor:
    """View one KV tensor ``(b, ...)`` of ``layout`` as ``(b, N_kv, S, D)`` without copying."""
    if layout is IfaLayout.BNSD:
        return t
    if layout is IfaLayout.BSH:
        t = t.view(t.shape[0], t.shape[1], heads, dim)
    return t.permute(0, 2, 1, 3)


def _kv_dims(layout: IfaLayout, heads: int, dim: int) -> tuple[int, int, str]:
    """Return the KV layout's sequence axis, its head axis (-1 for BSH) and its shape in words."""
    if layout is IfaLayout.BSH:
        return 1, -1, f"(B, S, {heads * dim}) for BSH: H = numKeyValueHeads * D"
    if layout is IfaLayout.BSND:
        return 1, 2, f"(B, S, {heads}, {dim}) for BSND"
    return 2, 1, f"(B, {heads}, S, {dim}) for BNSD"


def _check_kv_shape(
    param: str, t: torch.Tensor, layout: IfaLayout, batch: int, heads: int, dim: int
) -> int:
    """Check a dense KV tensor's shape against the layout; return its S."""
    rank = 3 if layout is IfaLayout.BSH else 4
    require_rank(param, t, (rank,))
    seq_axis, _, words = _kv_dims(layout, heads, dim)
    expected = list(t.shape)
    expected[0] = batch
    if layout is IfaLayout.BSH:
        expected[2] = heads * dim
    else:
        expected[1 if layout is IfaLayout.BNSD else 2] = heads
        expected[3] = dim
    require(f"{param}.shape", tuple(t.shape), list(t.shape) == expected, f"must be {words}")
    return int(t.shape[seq_axis])


def _antiquant(
    scale_in: object,
    offset_in: object,
    kv_int8: bool,
    query_dtype: torch.dtype,
    heads: int,
    dim: int,
) -> tuple[Antiquant | None, Antiquant | None]:
    """Check antiquant_scale/offset; return the key's and the value's dequantization."""
    if not kv_int8:
        for name, t in (("antiquant_scale", scale_in), ("antiquant_offset", offset_in)):
            require(name, t, t is None, "must be None unless key and value are INT8")
        return None, None
    if scale_in is None:
        raise ParamNullptrError(
            "antiquant_scale", None, "is required when key and value are INT8 (KV antiquant)"
        )
    scale = _tensor("antiquant_scale", scale_in)
    require_dtype("antiquant_scale", scale, (query_dtype,))
    shapes = [(2,), (2, heads, 1, dim), (2, heads, dim), (2, heads * dim)]
    require(
        "antiquant_scale.shape",
        tuple(scale.shape),
        tuple(scale.shape) in shapes,
        f"must be one of {shapes}: (2,) per-tensor or per-channel with N = numKeyValueHeads",
    )
    offset = None if offset_in is None else _tensor("antiquant_offset", offset_in)
    if offset is not None:
        require_dtype("antiquant_offset", offset, (scale.dtype,))
        require(
            "antiquant_offset.shape",
            tuple(offset.shape),
            offset.shape == scale.shape,
            f"must equal antiquant_scale's shape {tuple(scale.shape)}",
        )
    per = (1, 1, 1, 1) if scale.dim() == 1 else (1, heads, 1, dim)
    scale32 = scale.float().reshape(2, *per)
    offset32 = None if offset is None else offset.float().reshape(2, *per)
    return (
        Antiquant(scale=scale32[0], offset=None if offset32 is None else offset32[0]),
        Antiquant(scale=scale32[1], offset=None if offset32 is None else offset32[1]),
    )


def _quant2(
    scale_in: object,
    offset_in: object,
    query_dtype: torch.dtype,
    heads: int,
    dim: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check quant_scale2/quant_offset2; return them as float32 (1, 1) or (N, D)."""
    if scale_in is None:
        if offset_in is not None:
            raise ParamNullptrError(
                "quant_scale2", None, "is required when quant_offset2 is given (INT8 output)"
            )
        return None, None
    scale = _tensor("quant_scale2", scale_in)
    require_dtype("quant_scale2", scale, _QUANT_DTYPES)
    require(
        "quant_scale2.dtype",
        "bfloat16",
        scale.dtype != torch.bfloat16 or query_dtype == torch.bfloat16,
        "may be bfloat16 only when query is bfloat16; use float32",
    )
    channels = heads * dim
    require(
        "quant_scale2.shape",
        tuple(scale.shape),
        scale.numel() in (1, channels),
        f"must hold 1 (per-tensor) or N*D={channels} (per-channel) elements",
    )
    offset = None if offset_in is None else _tensor("quant_offset2", offset_in)
    if offset is not None:
        require_dtype("quant_offset2", offset, (scale.dtype,))
        require(
            "quant_offset2.shape",
            tuple(offset.shape),
            offset.shape == scale.shape,
            f"must equal quant_scale2's shape {tuple(scale.shape)}",
        )
    per = (1, 1) if scale.numel() == 1 else (heads, dim)
    return scale.float().reshape(per), None if offset is None else offset.float().reshape(per)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Cache:
    """Where the keys and values come from, and how long each batch's cache is."""

    key: KVSource
    value: KVSource
    seq_lens: tuple[int, ...]
    """Per batch, the KV positions the tensors hold (page attention: table width * block)."""
    dense: bool
    """One (B, ...) tensor each, the only case where kv_padding_size takes effect."""
    paged: bool
    """Page attention."""
    block_size: int
    """blockSize with page attention, else 1."""


def _dense_or_list_cache(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    layout: IfaLayout,
    batch: int,
    heads: int,
    dim: int,
) -> _Cache:
    """Check contiguous (one tensor) or tensor-list KV; build their readers."""
    if len(keys) == 1 and keys[0].dim() >= 1 and keys[0].shape[0] == batch:
        key, value = keys[0], values[0]
        seq = _check_kv_shape("key", key, layout, batch, heads, dim)
        require(
            "value.shape", tuple(value.shape), value.shape == key.shape, "must equal key's shape"
        )
        return _Cache(
            key=DenseKV(view=_kv_view(key, layout, heads, dim)),
            value=DenseKV(view=_kv_view(value, layout, heads, dim)),
            seq_lens=(seq,) * batch,
            dense=True,
            paged=False,
            block_size=1,
        )
    if len(keys) == 1:
        _check_kv_shape("key", keys[0], layout, batch, heads, dim)  # raises: batch mismatch
    require(
        "key",
        f"list of {len(keys)} tensors",
        len(keys) == batch,
        f"must be one tensor of batch B={batch} or a list of B tensors of batch 1",
    )
    limits.IFA_LIST_BATCH.check("key", batch)
    seq_axis = _kv_dims(layout, heads, dim)[0]
    seq_lens = []
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        seq_lens.append(_check_kv_shape(f"key[{b}]", k, layout, 1, heads, dim))
        require(
            f"value[{b}].shape", tuple(v.shape), v.shape == k.shape, f"must equal key[{b}]'s shape"
        )
        same = [d for i, d in enumerate(k.shape) if i != seq_axis]
        first = [d for i, d in enumerate(keys[0].shape) if i != seq_axis]
        require(f"key[{b}].shape", tuple(k.shape), same == first, "must equal key[0]'s but for S")
    return _Cache(
        key=ListKV(views=tuple(_kv_view(k, layout, heads, dim)[0] for k in keys)),
        value=ListKV(views=tuple(_kv_view(v, layout, heads, dim)[0] for v in values)),
        seq_lens=tuple(seq_lens),
        dense=False,
        paged=False,
        block_size=1,
    )


def _paged_cache(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    block_table: object,
    block_size: object,
    lengths: list[int] | None,
    layout: IfaLayout,
    batch: int,
    heads: int,
    dim: int,
) -> _Cache:
    """Check a page-attention cache, its block table and the lengths; build their readers."""
    kv_int8 = keys[0].dtype == torch.int8
    align = limits.IFA_BLOCK_ALIGN["int8" if kv_int8 else "float"]
    size = limits.IFA_BLOCK_SIZE.check("block_size", block_size)
    if size % align:
        limits.require_multiple(
            "block_size",
            size,
            align,
            f"{align} with {'INT8' if kv_int8 else 'FLOAT16/BFLOAT16'} KV",
        )
    table = _tensor("block_table", block_table)
    require_dtype("block_table", table, (torch.int32,))
    require_rank("block_table", table, (2,))
    if table.shape[0] != batch:
        raise ParamInvalidError(
            "block_table.shape", tuple(table.shape), f"must be (B={batch}, maxBlockNumPerSeq)"
        )
    if len(keys) != 1:
        raise ParamInvalidError(
            "key", f"list of {len(keys)} tensors", "must be one cache tensor with page attention"
        )
    key, value = keys[0], values[0]
    require_rank("key", key, (3, 4))
    heads_first = key.dim() == 4
    if heads_first:
        require(
            "key.shape",
            tuple(key.shape),
            layout is IfaLayout.BNSD,
            "a (blocknum, N_kv, blockSize, D) cache needs input_layout BNSD; "
            "use (blocknum, blockSize, H) with BSH and BSND",
        )
        expected: tuple[int, ...] = (key.shape[0], heads, size, dim)
    else:
        expected = (key.shape[0], size, heads * dim)
    key_shape = tuple(key.shape)
    if key_shape != expected:
        words = (
            f"(blocknum, {heads}, blockSize={size}, {dim})"
            if heads_first
            else f"(blocknum, blockSize={size}, H={heads * dim})"
        )
        raise ParamInvalidError("key.shape", key_shape, f"must be {words}")
    require("value.shape", tuple(value.shape), value.shape == key.shape, "must equal key's shape")
    if not heads_first:
        # with a (blocknum, blockSize, H) cache; the (blocknum, N_kv, blockSize, D) one is free
        limits.IFA_PAGED_HIDDEN.check("num_key_value_heads * D", heads * dim)
    if lengths is None:
        raise ParamNullptrError(
            "actual_seq_lengths", None, "is required with page attention (block_table given)"
        )

    blocknum = int(key.shape[0])
    needed = blocks_needed(lengths, size)
    if table.shape[1] < max(needed):
        raise ParamInvalidError(
            "block_table.shape",
            tuple(table.shape),
            f"second dim must be >= maxBlockNumPerSeq={max(needed)}, "
            "ceil(max actual_seq_lengths / blockSize)",
        )
    if blocknum < sum(needed):
        raise ParamInvalidError(
            "key.shape",
            key_shape,
            f"blocknum must be >= {sum(needed)}, the sum over batches of "
            "ceil(actual_seq_lengths[b] / blockSize)",
        )
    check_table_entries(table, needed, blocknum)
    pages = PageTable(table, tuple(lengths), size, blocknum)
    readers = [
        PagedKV(
            cache=t if heads_first else t.view(blocknum, size, heads, dim),
            heads_first=heads_first,
            pages=pages,
            block_size=size,
        )
        for t in (key, value)
    ]
    return _Cache(
        key=readers[0],
        value=readers[1],
        seq_lens=(int(table.shape[1]) * size,) * batch,
        dense=False,
        paged=True,
        block_size=size,
    )


_CHECKED_TABLES: dict[
    int, tuple[weakref.ref[torch.Tensor], tuple[object, ...], tuple[int, ...]]
] = {}
"""Block tables whose entries were checked: ``id(table)`` -> (a weak reference to it, what
identifies its contents, per batch how many leading entries were found valid)."""
_CHECKED_TABLES_MAX = 256
"""At most this many tables are remembered (the oldest is forgotten first)."""


_ALWAYS_READ = frozenset({"cpu"})
"""Device types whose tables are read on every call, never remembered: reading a CPU table
costs no synchronization, and a numpy view of it could change it unseen."""


def _table_state(table: torch.Tensor, blocknum: int) -> tuple[object, ...] | None:
    """What must be unchanged for a check of ``table`` against ``blocknum`` blocks to hold.

    ``None`` for a table never remembered: on a device of :data:`_ALWAYS_READ`, or without a
    version counter (an inference-mode tensor).
    """
    if table.device.type in _ALWAYS_READ:
        return None
    try:
        version = table._version
    except RuntimeError:
        return None
    return (version, table.data_ptr(), tuple(table.shape), table.stride(), table.device, blocknum)


def check_table_entries(table: torch.Tensor, needed: list[int], blocknum: int) -> None:
    """Check that the entries each batch's length reaches are block indices in [0, blocknum).

    The values are read on the host: a copy of the ``(B, max(needed))`` entries in use, which
    on an accelerator waits for every kernel queued before it. A decode step calls the
    attention once per layer with the same table, so a table off the CPU found valid is
    remembered (by identity, weakly) with its version counter, data pointer, shape, strides,
    device and ``blocknum``, and how many leading entries of each batch were checked; a later
    call whose entries in use lie within those is not checked again. Any in-place change
    through torch (``table[b, j] = x``, ``copy_``, ``fill_``, ...) bumps the version and is
    checked again; a write that bypasses torch's version counter (through ``data_ptr`` or
    DLPack) is not seen here: the fused CUDA kernel clamps every entry it reads into
    [0, blocknum), and the torch composition, which reads the entries on the host anyway
    (:meth:`~mc2sim.kernels._ifa_sources.PageTable.resolve`), checks them again there, so
    such a table cannot make either read outside the cache. A CPU table is read on every
    call (:data:`_ALWAYS_READ`).

    Args:
        table: INT32 ``(B, >= max(needed))``.
        needed: per batch, the entries its length reaches.
        blocknum: blocks in the cache.

    Raises:
        ParamInvalidError: an entry in use is out of range, naming ``block_table[b][j]``.
    """
    state = _table_state(table, blocknum)
    entry = _CHECKED_TABLES.get(id(table))
    if (
        state is not None
        and entry is not None
        and entry[0]() is table
        and entry[1] == state
        and all(n <= c for n, c in zip(needed, entry[2], strict=True))
    ):
        return
    check_entries(_read_entries(table, max(needed)), needed, blocknum)
    if state is None:
        return
    key = id(table)
    checked = tuple(needed)
    if entry is not None and entry[0]() is table and entry[1] == state:
        checked = tuple(max(n, c) for n, c in zip(needed, entry[2], strict=True))
    ref = weakref.ref(table, lambda _, key=key: _forget(key))  # type: ignore[misc]
    # the re-checked table becomes the newest: it is the last to be forgotten
    put_bounded(
        _CHECKED_TABLES, key, (ref, state, checked), _CHECKED_TABLES_MAX, move_to_newest=True
    )


def _read_entries(table: torch.Tensor, used: int) -> torch.Tensor:
    """The table's first ``used`` columns as int64 on the host (a synchronization off it)."""
    return table[:, :used].to(device="cpu", dtype=torch.int64)


def _forget(key: int) -> None:
    """Drop a collected table from the remembered ones (its id may be reused)."""
    entry = _CHECKED_TABLES.get(key)
    if entry is not None and entry[0]() is None:
        del _CHECKED_TABLES[key]


def _check_mask(mask: object, batch: int, need: int) -> torch.Tensor:
    """Check atten_mask; return it as (B, S_mask)."""
    t = _tensor("atten_mask", mask)
    require_dtype("atten_mask", t, _MASK_DTYPES)
    require_rank("atten_mask", t, (2, 3, 4))
    shape = tuple(t.shape)
    require(
        "atten_mask.shape",
        shape,
        shape[0] == batch and all(d == 1 for d in shape[1:-1]),
        f"must be (B, S), (B, 1, S) or (B, 1, 1, S) with B={batch}",
    )
    require(
        "atten_mask.shape",
        shape,
        shape[-1] >= need,
        f"S must be >= {need}, the KV positions attended "
        "(maxBlockNumPerSeq * blockSize with page attention)",
    )
    flat = t.reshape(batch, shape[-1])
    if t.dtype != torch.bool:
        require("atten_mask", "values", bool(((flat == 0) | (flat == 1)).all()), "must be 0 or 1")
    return flat


def _check_pse(
    pse: object, query_dtype: torch.dtype, batch: int, heads: int, need: int
) -> torch.Tensor:
    """Check pse_shift; return it as (1 or B, N, S_pse)."""
    t = _tensor("pse_shift", pse)
    require_dtype("pse_shift", t, (query_dtype,))
    require_rank("pse_shift", t, (4,))
    shape = tuple(t.shape)
    require(
        "pse_shift.shape",
        shape,
        shape[0] in (1, batch) and shape[1] == heads and shape[2] == 1,
        f"must be (B={batch}, N={heads}, 1, S) or (1, N={heads}, 1, S)",
    )
    require(
        "pse_shift.shape",
        shape,
        shape[3] >= need,
        f"S must be >= {need}, the KV cache length "
        "(maxBlockNumPerSeq * blockSize with page attention)",
    )
    return t[:, :, 0]


def _windows(
    cache: _Cache, lengths: list[int] | None, kv_padding_size: object, batch: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return each batch's attended KV window [start, end)."""
    padding = None
    if kv_padding_size is not None:
        t = _tensor("kv_padding_size", kv_padding_size)
        require_dtype("kv_padding_size", t, (torch.int64,))
        require("kv_padding_size.shape", tuple(t.shape), t.numel() == 1, "must hold 1 element")
        padding = max(0, int(t.reshape(-1)[0]))
    if lengths is None:
        return (0,) * batch, cache.seq_lens
    if not cache.paged and max(lengths) > min(cache.seq_lens):
        for b, (n, s) in enumerate(zip(lengths, cache.seq_lens, strict=True)):
            require(
                f"actual_seq_lengths[{b}]", n, n <= s, f"must be <= {s}, the S of key and value"
            )
    # Left padding takes effect only with one contiguous KV tensor and actual_seq_lengths, as
    # in the operator's tiling (CheckSupportKVLeftPadding); otherwise it is ignored.
    if padding is None or not cache.dense:
        return (0,) * batch, tuple(lengths)
    smax = cache.seq_lens[0]
    starts = tuple(smax - padding - n for n in lengths)
    ends = tuple(smax - padding if s >= 0 else 0 for s in starts)
    return tuple(max(s, 0) for s in starts), ends


def _query_words(layout: IfaLayout, heads: int) -> str:
    """The query's shape for ``layout``, in words (for the error message)."""
    if layout is IfaLayout.BSH:
        return f"(B, 1, H) with H a positive multiple of num_heads={heads}"
    if layout is IfaLayout.BSND:
        return f"(B, 1, N={heads}, D)"
    return f"(B, N={heads}, 1, D)"


def _same_device(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    optional: tuple[object, ...],
) -> None:
    """Raise, naming the first input on another device than the query."""
    names = (
        "atten_mask",
        "pse_shift",
        "antiquant_scale",
        "antiquant_offset",
        "block_table",
        "quant_scale2",
        "quant_offset2",
        "kv_padding_size",
    )
    same_device(
        ("query", q),
        *((f"key[{i}]" if len(keys) > 1 else "key", t) for i, t in enumerate(keys)),
        *((f"value[{i}]" if len(values) > 1 else "value", t) for i, t in enumerate(values)),
        *(
            (name, t if isinstance(t, torch.Tensor) else None)
            for name, t in zip(names, optional, strict=True)
        ),
    )


def plan_incre_flash_attention(
    query: object,
    key: object,
    value: object,
    *,
    padding_mask: object,
    atten_mask: object,
    pse_shift: object,
    actual_seq_lengths: object,
    antiquant_scale: object,
    antiquant_offset: object,
    block_table: object,
    dequant_scale1: object,
    quant_scale1: object,
    dequant_scale2: object,
    quant_scale2: object,
    quant_offset2: object,
    kv_padding_size: object,
    num_heads: object,
    scale_value: object,
    input_layout: object,
    num_key_value_heads: object,
    block_size: object,
    inner_precise: object,
) -> IfaPlan:
    """Check every input of incre_flash_attention and resolve them into a plan.

    Args:
        query: see :func:`mc2sim.kernels.ifa.incre_flash_attention`; so are the others.
        key: as above.
        value: as above.
        padding_mask: as above.
        atten_mask: as above.
        pse_shift: as above.
        actual_seq_lengths: as above.
        antiquant_scale: as above.
        antiquant_offset: as above.
        block_table: as above.
        dequant_scale1: as above.
        quant_scale1: as above.
        dequant_scale2: as above.
        quant_scale2: as above.
        quant_offset2: as above.
        kv_padding_size: as above.
        num_heads: as above.
        scale_value: as above.
        input_layout: as above.
        num_key_value_heads: as above.
        block_size: as above.
        inner_precise: as above.

    Returns:
        The resolved plan.

    Raises:
        ParamNullptrError: a required input is missing.
        ParamInvalidError: any other rule is broken.

    """
    # Optional inputs accept empty tensors, which count as absent.
    padding_mask, atten_mask, pse_shift = (
        _present(t) for t in (padding_mask, atten_mask, pse_shift)
    )
    antiquant_scale, antiquant_offset = _present(antiquant_scale), _present(antiquant_offset)
    block_table, kv_padding_size = _present(block_table), _present(kv_padding_size)
    quant_scale2, quant_offset2 = _present(quant_scale2), _present(quant_offset2)

    require(
        "padding_mask",
        padding_mask,
        padding_mask is None,
        "is reserved and not used by the operator: must be None",
    )
    for name, t in (
        ("dequant_scale1", dequant_scale1),
        ("quant_scale1", quant_scale1),
        ("dequant_scale2", dequant_scale2),
    ):
        require(name, t, _present(t) is None, "must be None: fully INT8 attention is not supported")

    if isinstance(input_layout, IfaLayout):
        layout = input_layout
    elif isinstance(input_layout, str) and input_layout in _LAYOUTS:
        layout = _LAYOUTS[input_layout]
    else:
        raise ParamInvalidError(
            "input_layout", input_layout, f"must be one of {', '.join(IfaLayout)}"
        )
    precise = _require_int(
        "inner_precise", inner_precise, inner_precise in (0, 1), "must be 0 or 1"
    )
    heads = limits.IFA_HEADS.check("num_heads", num_heads)
    kv_heads = _require_int("num_key_value_heads", num_key_value_heads, True, "")
    if kv_heads == 0:  # 0 means numHeads
        kv_heads = heads
    require(
        "num_key_value_heads",
        kv_heads,
        0 < kv_heads <= heads and heads % kv_heads == 0,
        f"must be 0 or a positive divisor of num_heads={heads}",
    )
    limits.IFA_GROUP.check("num_heads / num_key_value_heads", heads // kv_heads)
    scale_ok = type(scale_value) is float or (
        isinstance(scale_value, numbers.Real) and not isinstance(scale_value, bool)
    )
    require("scale_value", scale_value, scale_ok, "must be a real number")

    require_not_none("query", query)
    q = _tensor("query", query)
    keys = _tensor_list("key", key)
    values = _tensor_list("value", value)
    if len(values) != len(keys):
        raise ParamInvalidError(
            "value",
            f"list of {len(values)} tensors",
            f"must hold as many tensors as key ({len(keys)})",
        )
    # (the messages of the checks on this path are built only when a check fails: a decode
    # step calls the attention once per layer, and the host time counts)
    kv_dtype = keys[0].dtype
    for param, items in (("key", keys), ("value", values)):
        for i, t in enumerate(items):
            if t.dtype != kv_dtype:
                raise ParamInvalidError(
                    f"{param}[{i}].dtype" if len(items) > 1 else f"{param}.dtype",
                    str(t.dtype).removeprefix("torch."),
                    f"must equal key's dtype {str(kv_dtype).removeprefix('torch.')}",
                )
    require(
        "query.dtype",
        "int8",
        not (q.dtype == torch.int8 and kv_dtype == torch.int8),
        "query, key and value all INT8 (fully quantized attention) is not supported",
    )
    require_dtype("query", q, _FLOAT_DTYPES)
    require_dtype("key", keys[0], _KV_DTYPES)
    if kv_dtype not in (q.dtype, torch.int8):
        raise ParamInvalidError(
            "key.dtype",
            str(kv_dtype).removeprefix("torch."),
            f"must equal query's dtype {str(q.dtype).removeprefix('torch.')} or be int8",
        )

    device = q.device
    optional = (
        atten_mask,
        pse_shift,
        antiquant_scale,
        antiquant_offset,
        block_table,
        quant_scale2,
        quant_offset2,
        kv_padding_size,
    )
    if (
        any(t.device != device for t in keys)
        or any(t.device != device for t in values)
        or any(isinstance(t, torch.Tensor) and t.device != device for t in optional)
    ):
        _same_device(q, keys, values, optional)  # raises, naming the parameter
    require_rank("query", q, (3,) if layout is IfaLayout.BSH else (4,))
    shape = tuple(q.shape)
    if layout is IfaLayout.BSH:
        ok = shape[1] == 1 and shape[2] % heads == 0 and shape[2] > 0
    elif layout is IfaLayout.BSND:
        ok = shape[1] == 1 and shape[2] == heads
    else:
        ok = shape[1] == heads and shape[2] == 1
    if not ok:
        raise ParamInvalidError(
            "query.shape",
            shape,
            f"must be {_query_words(layout, heads)} for {layout}: query S must be 1",
        )
    batch = shape[0]
    dim = shape[2] // heads if layout is IfaLayout.BSH else shape[3]
    limits.IFA_BATCH.check("query.shape", batch)
    limits.IFA_HEAD_DIM.check("query.shape", dim)

    anti = _antiquant(
        antiquant_scale, antiquant_offset, kv_dtype == torch.int8, q.dtype, kv_heads, dim
    )
    q_scale2, q_offset2 = _quant2(quant_scale2, quant_offset2, q.dtype, heads, dim)

    lengths = _parse_lengths(actual_seq_lengths, batch)
    if block_table is not None:
        cache = _paged_cache(
            keys, values, block_table, block_size, lengths, layout, batch, kv_heads, dim
        )
    else:
        cache = _dense_or_list_cache(keys, values, layout, batch, kv_heads, dim)

    starts, ends = _windows(cache, lengths, kv_padding_size, batch)
    attended = max((e for s, e in zip(starts, ends, strict=True) if e > s), default=0)
    step = cache.block_size
    length = math.ceil(attended / step) * step
    if cache.paged:
        mask_need = pse_need = cache.seq_lens[0]
    else:
        mask_need, pse_need = attended, max(cache.seq_lens)
    mask = None if atten_mask is None else _check_mask(atten_mask, batch, mask_need)
    pse = None if pse_shift is None else _check_pse(pse_shift, q.dtype, batch, heads, pse_need)

    return IfaPlan(
        batch=batch,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
        query=q,
        key=cache.key,
        value=cache.value,
        key_antiquant=anti[0],
        value_antiquant=anti[1],
        inner_precise=precise,
        starts=starts,
        ends=ends,
        length=length,
        block_size=step,
        atten_mask=mask,
        pse_shift=pse,
        scale_value=float(scale_value),  # type: ignore[arg-type]
        quant_scale2=q_scale2,
        quant_offset2=q_offset2,
        out_dtype=torch.int8 if q_scale2 is not None else q.dtype,
        out_shape=shape,
    )


def call_key(
    query: object,
    key: object,
    value: object,
    block_table: object,
    actual_seq_lengths: object,
    num_heads: object,
    scale_value: object,
    input_layout: object,
    num_key_value_heads: object,
    block_size: object,
    inner_precise: object,
) -> tuple[object, ...] | None:
    """Everything the checks read of a call whose other optional inputs are None, or None.

    :func:`plan_incre_flash_attention` reads the tensors' dtypes, shapes, strides and
    devices, the scalar arguments and the lengths, and nothing else of them but the block
    table's entries (:func:`check_table_entries`, which a caller of this key must still
    run). So a call whose key equals that of a call that passed its checks, with padding_mask,
    atten_mask, pse_shift, the antiquant, quant and dequant inputs and kv_padding_size all
    None, passes the same checks and resolves into a plan of the same shapes, strides,
    windows and scale: only the tensors' addresses and data differ (a decode step's layers,
    each with its own cache).

    Args:
        query: as :func:`plan_incre_flash_attention` takes it; so are the others.
        key: as above.
        value: as above.
        block_table: as above.
        actual_seq_lengths: as above.
        num_heads: as above.
        scale_value: as above.
        input_layout: as above.
        num_key_value_heads: as above.
        block_size: as above.
        inner_precise: as above.

    Returns:
        The key; None where it would not tell the checks' outcome: a tensor of a subclass, a
        list of tensors, lengths given as a tensor (read from it), a number of another type
        than a plain int (or float, for ``scale_value``: ``True`` equals 1 as a key, not to
        the checks), a layout that is not a string.
    """
    if not (type(query) is torch.Tensor and type(key) is torch.Tensor):
        return None
    if type(value) is not torch.Tensor:
        return None
    if block_table is not None and type(block_table) is not torch.Tensor:
        return None
    if not (
        type(num_heads) is int
        and type(num_key_value_heads) is int
        and type(block_size) is int
        and type(inner_precise) is int
        and (type(scale_value) is float or type(scale_value) is int)
        and (type(input_layout) is str or type(input_layout) is IfaLayout)
    ):
        return None
    lengths: tuple[int, ...] | None = None
    if actual_seq_lengths is not None:
        if type(actual_seq_lengths) is not list and type(actual_seq_lengths) is not tuple:
            return None
        lengths = tuple(actual_seq_lengths)
        if not all(type(n) is int for n in lengths):
            return None
    table = None
    if block_table is not None:
        table = (block_table.dtype, block_table.shape, block_table.stride(), block_table.device)
    return (
        (query.dtype, query.shape, query.stride(), query.device),
        (key.dtype, key.shape, key.stride(), key.device),
        (value.dtype, value.shape, value.stride(), value.device),
        table,
        lengths,
        num_heads,
        scale_value,
        math.copysign(1.0, scale_value),  # -0.0 == 0.0 as a key
        input_layout,
        num_key_value_heads,
        block_size,
        inner_precise,
    )
