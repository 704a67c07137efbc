"""Key/value readers of incre_flash_attention: one chunk of KV positions at a time.

Every reader returns positions ``[c0, c1)`` of all batches laid out ``(B, N_kv, c1 - c0, D)``,
with the cache's own values (int8 caches stay integers: the attention applies their
antiquant itself). Given a buffer (the CPU path: a float32 buffer reused from chunk to chunk,
so the attention never holds a float32 copy of the whole cache) the reader converts into it;
without one it returns the cache's dtype on the cache's device, a strided view where the
layout allows (the accelerator path: no copy of a dense cache at all). Positions a batch does
not have (past the end of its tensor-list entry) are zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mc2sim.errors import ParamInvalidError
from mc2sim.kernels._device import from_host

__all__ = [
    "Antiquant",
    "BlockIndex",
    "DenseKV",
    "KVSource",
    "ListKV",
    "PageTable",
    "PagedKV",
    "block_index",
    "blocks_needed",
    "check_entries",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Antiquant:
    """The int8 dequantization ``kv = (kv_int8 + offset) * scale`` of one of key and value."""

    scale: torch.Tensor
    """float32, ``(1, 1, 1, 1)`` per-tensor or ``(1, N_kv, 1, D)`` per-channel."""
    offset: torch.Tensor | None
    """float32, same shape as ``scale``; ``None`` means 0."""


class KVSource(Protocol):
    """Something that reads KV positions ``[c0, c1)`` of every batch."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Return positions ``[c0, c1)`` as ``(B, N_kv, c1 - c0, D)``.

        With a ``(B, N_kv, >= c1 - c0, D)`` buffer, fill and return its first ``c1 - c0``
        positions (converting to the buffer's dtype); without, return the cache's dtype.
        """
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class DenseKV:
    """One tensor holding every batch, seen as ``(B, N_kv, S, D)`` whatever its layout."""

    view: torch.Tensor
    """``(B, N_kv, S, D)``, a strided view of the caller's tensor (no copy)."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Positions ``[c0, c1)`` (see :class:`KVSource`); without a buffer, a view."""
        if buffer is None:
            return self.view[:, :, c0:c1]
        chunk = buffer[:, :, : c1 - c0]
        chunk.copy_(self.view[:, :, c0:c1])
        return chunk


@dataclass(frozen=True, kw_only=True, slots=True)
class ListKV:
    """A tensor list, one entry per batch, each seen as ``(N_kv, S_b, D)``."""

    views: tuple[torch.Tensor, ...]
    """Per-batch ``(N_kv, S_b, D)`` strided views of the caller's tensors."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Positions ``[c0, c1)`` (see :class:`KVSource`); zeros past an entry's end."""
        n = c1 - c0
        if buffer is None:
            first = self.views[0]
            buffer = torch.empty(
                (len(self.views), first.shape[0], n, first.shape[2]),
                dtype=first.dtype,
                device=first.device,
            )
        chunk = buffer[:, :, :n]
        for b, view in enumerate(self.views):
            have = max(0, min(n, view.shape[1] - c0))
            if have > 0:
                chunk[b, :, :have].copy_(view[:, c0 : c0 + have])
            if have < n:
                chunk[b, :, have:].zero_()
        return chunk


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockIndex:
    """Where each batch's blocks lie in a page cache whose blocks each belong to one batch.

    Lets the attention read the cache block by block in place (no gathered copy): in use
    are the table entries ``(use_b[i], use_j[i])``, physical block ``use_p[i]``.
    """

    owner: torch.Tensor
    """int64 ``(blocknum,)``: the batch whose table holds each block (0 for unused blocks)."""
    in_use: torch.Tensor
    """bool ``(B, used blocks)``: which table entries a batch's length reaches."""
    use_b: torch.Tensor
    """int64: batch of each entry in use."""
    use_j: torch.Tensor
    """int64: logical block of each entry in use."""
    use_p: torch.Tensor
    """int64: physical block of each entry in use."""
    partial_p: torch.Tensor
    """int64: the physical blocks a batch's window ends inside of."""
    partial_valid: tuple[int, ...]
    """For each of ``partial_p``, how many of its positions the window covers."""


class PageTable:
    """A page-attention block table whose entries in use were checked, read on the host lazily.

    The checks need only the entries' validity; the torch composition also needs them on the
    host (a copy, and a synchronization with an accelerator), the fused CUDA kernel does not.
    So the host copy is made the first time :meth:`resolve` is asked, once for key and value.
    """

    __slots__ = ("_resolved", "blocknum", "block_size", "lengths", "needed", "raw")

    def __init__(
        self, raw: torch.Tensor, lengths: tuple[int, ...], block_size: int, blocknum: int
    ) -> None:
        """Wrap a checked table.

        Args:
            raw: the caller's INT32 ``(B, maxBlockNumPerSeq)`` table, on the cache's device;
                the entries each batch's length reaches are block indices in ``[0, blocknum)``.
            lengths: per-batch KV lengths.
            block_size: tokens per block.
            blocknum: blocks in the cache.
        """
        self.raw = raw
        self.lengths = lengths
        self.block_size = block_size
        self.blocknum = blocknum
        self.needed = blocks_needed(lengths, block_size)  # per batch, the entries it reaches
        self._resolved: tuple[torch.Tensor, BlockIndex | None] | None = None

    def resolve(self) -> tuple[torch.Tensor, BlockIndex | None]:
        """Return the int64 ``(B, used)`` table with unused entries 0, and the block index."""
        if self._resolved is None:
            size = self.block_size
            table64 = self.raw[:, : max(self.needed)].to(device="cpu", dtype=torch.int64)
            # checked when the call was planned, unless a check of this table was remembered
            # and it changed since unseen (a write through data_ptr or DLPack): the entries
            # are on the host now, so checking them again costs nothing, and an index out of
            # the cache never reaches a gather on the device
            in_use = check_entries(table64, self.needed, self.blocknum)
            # Entries past a batch's last block are never read by the operator; any valid
            # index will do for the gather, and the attention zeroes what they bring in.
            safe = torch.where(in_use, table64, torch.zeros_like(table64))
            device = self.raw.device
            blocks = block_index(table64, in_use, list(self.lengths), size, self.blocknum, device)
            self._resolved = (from_host(safe, device), blocks)
        return self._resolved


def blocks_needed(lengths: Sequence[int], block_size: int) -> list[int]:
    """Per batch, the block table entries its length reaches: ``ceil(length / block_size)``."""
    return [-(-n // block_size) for n in lengths]


def check_entries(table: torch.Tensor, needed: Sequence[int], blocknum: int) -> torch.Tensor:
    """Check that the block table's entries in use are block indices in [0, blocknum).

    Args:
        table: int64 ``(B, max(needed))`` on the host, the block table's first columns.
        needed: per batch, the entries its length reaches (:func:`blocks_needed`).
        blocknum: blocks in the cache.

    Returns:
        bool ``(B, max(needed))``: which entries are in use.

    Raises:
        ParamInvalidError: the first entry in use out of range (row-major), naming
            ``block_table[b][j]``.
    """
    in_use = torch.arange(table.shape[1]).unsqueeze(0) < torch.tensor(list(needed)).unsqueeze(1)
    bad = in_use & ((table < 0) | (table >= blocknum))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ParamInvalidError(
            f"block_table[{b}][{j}]",
            int(table[b, j]),
            f"must be a block index in [0, blocknum={blocknum})",
        )
    return in_use


def block_index(
    table: torch.Tensor,
    in_use: torch.Tensor,
    lengths: list[int],
    size: int,
    blocknum: int,
    device: torch.device,
) -> BlockIndex | None:
    """Index the blocks in use when each belongs to one batch and they fill half the cache.

    Args:
        table: int64 ``(B, used)`` on the host, the block table's entries in use or not.
        in_use: bool ``(B, used)``, which entries a batch's length reaches.
        lengths: per-batch KV lengths.
        size: the block size.
        blocknum: blocks in the cache.
        device: where the attention runs.

    Returns:
        The index, or None (shared blocks, or a cache mostly of other batches' blocks).
    """
    use_b, use_j = in_use.nonzero(as_tuple=True)
    use_p = table[use_b, use_j]
    if use_p.numel() * 2 < blocknum or len(set(use_p.tolist())) != use_p.numel():
        return None
    owner = torch.zeros(blocknum, dtype=torch.int64)
    owner[use_p] = use_b
    ends = [(b, n // size, n % size) for b, n in enumerate(lengths) if n % size]
    return BlockIndex(
        owner=from_host(owner, device),
        in_use=from_host(in_use, device),
        use_b=from_host(use_b, device),
        use_j=from_host(use_j, device),
        use_p=from_host(use_p, device),
        partial_p=from_host(table[[b for b, _, _ in ends], [j for _, j, _ in ends]], device),
        partial_valid=tuple(valid for _, _, valid in ends),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class PagedKV:
    """A page-attention cache: physical blocks gathered through a block table."""

    cache: torch.Tensor
    """``(blocknum, blockSize, N_kv, D)``, or ``(blocknum, N_kv, blockSize, D)`` if heads_first."""
    heads_first: bool
    """Whether the cache puts the KV heads before the block positions."""
    pages: PageTable
    """The checked block table (shared by key and value)."""
    block_size: int
    """Tokens per block; chunk bounds are multiples of it."""

    @property
    def table(self) -> torch.Tensor:
        """int64 ``(B, used blocks)``: physical block of each logical block, every entry valid."""
        return self.pages.resolve()[0]

    @property
    def blocks(self) -> BlockIndex | None:
        """The in-place block index, or None (the gathered path).

        Set when every block in use belongs to one batch and they fill at least half the
        cache: the accelerator path then reads the cache in place, block by block.
        """
        return self.pages.resolve()[1]

    def load(self, c0: int, c1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Gather the blocks covering ``[c0, c1)`` (multiples of the block size).

        Into ``buffer`` if given; else a fresh gather in the cache's dtype, returned as a
        strided view for the ``(blocknum, blockSize, N_kv, D)`` cache.
        """
        batch = self.table.shape[0]
        heads, dim = (
            (self.cache.shape[1], self.cache.shape[3])
            if self.heads_first
            else (self.cache.shape[2], self.cache.shape[3])
        )
        j0, j1 = c0 // self.block_size, c1 // self.block_size
        blocks = j1 - j0
        gathered = self.cache.index_select(0, self.table[:, j0:j1].reshape(-1))
        if self.heads_first:
            src = gathered.view(batch, blocks, heads, self.block_size, dim).permute(0, 2, 1, 3, 4)
            if buffer is None:
                return src.reshape(batch, heads, blocks * self.block_size, dim)
            chunk = buffer[:, :, : c1 - c0]
            chunk.view(batch, heads, blocks, self.block_size, dim).copy_(src)
            return chunk
        src = gathered.view(batch, blocks * self.block_size, heads, dim).permute(0, 2, 1, 3)
        if buffer is None:
            return src
        chunk = buffer[:, :, : c1 - c0]
        chunk.copy_(src)
        return chunk
