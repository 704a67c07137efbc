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

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Antiquant", "BlockIndex", "DenseKV", "KVSource", "ListKV", "PagedKV"]


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


@dataclass(frozen=True, kw_only=True, slots=True)
class PagedKV:
    """A page-attention cache: physical blocks gathered through a block table."""

    cache: torch.Tensor
    """``(blocknum, blockSize, N_kv, D)``, or ``(blocknum, N_kv, blockSize, D)`` if heads_first."""
    heads_first: bool
    """Whether the cache puts the KV heads before the block positions."""
    table: torch.Tensor
    """int64 ``(B, used blocks)``: physical block of each logical block, every entry valid."""
    block_size: int
    """Tokens per block; chunk bounds are multiples of it."""
    blocks: BlockIndex | None = None
    """Set when every block in use belongs to one batch and they fill at least half the cache:
    the accelerator path then reads the cache in place, block by block."""

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
