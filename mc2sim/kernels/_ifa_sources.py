"""Key/value readers of incre_flash_attention: one chunk of KV positions, in float32, at a time.

Every reader writes positions ``[c0, c1)`` of all batches into a caller's float32 buffer laid
out ``(B, N_kv, c1 - c0, D)``, converting the dtype, reordering the axes and applying the int8
antiquant in the same few passes, so the attention never holds a float32 copy of the whole
cache. Positions a batch does not have (past the end of its tensor-list entry) are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Antiquant", "DenseKV", "KVSource", "ListKV", "PagedKV"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Antiquant:
    """The int8 dequantization ``kv = (kv_int8 + offset) * scale`` of one of key and value."""

    scale: torch.Tensor
    """float32, ``(1, 1, 1, 1)`` per-tensor or ``(1, N_kv, 1, D)`` per-channel."""
    offset: torch.Tensor | None
    """float32, same shape as ``scale``; ``None`` means 0."""

    def apply(self, chunk: torch.Tensor) -> None:
        """Dequantize ``chunk`` (float32, ``(B, N_kv, n, D)``) in place."""
        if self.offset is not None:
            chunk.add_(self.offset)
        chunk.mul_(self.scale)


class KVSource(Protocol):
    """Something that reads KV positions ``[c0, c1)`` of every batch as float32."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Fill and return ``buffer[:, :, : c1 - c0]`` of a ``(B, N_kv, >= c1 - c0, D)`` buffer."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class DenseKV:
    """One tensor holding every batch, seen as ``(B, N_kv, S, D)`` whatever its layout."""

    view: torch.Tensor
    """``(B, N_kv, S, D)``, a strided view of the caller's tensor (no copy)."""
    antiquant: Antiquant | None = None
    """Dequantization of an int8 cache, else ``None``."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Copy positions ``[c0, c1)`` into ``buffer`` (see :class:`KVSource`)."""
        chunk = buffer[:, :, : c1 - c0]
        chunk.copy_(self.view[:, :, c0:c1])
        if self.antiquant is not None:
            self.antiquant.apply(chunk)
        return chunk


@dataclass(frozen=True, kw_only=True, slots=True)
class ListKV:
    """A tensor list, one entry per batch, each seen as ``(N_kv, S_b, D)``."""

    views: tuple[torch.Tensor, ...]
    """Per-batch ``(N_kv, S_b, D)`` strided views of the caller's tensors."""
    antiquant: Antiquant | None = None
    """Dequantization of an int8 cache, else ``None``."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Copy positions ``[c0, c1)`` into ``buffer``; zeros past an entry's end."""
        n = c1 - c0
        chunk = buffer[:, :, :n]
        for b, view in enumerate(self.views):
            have = max(0, min(n, view.shape[1] - c0))
            if have > 0:
                chunk[b, :, :have].copy_(view[:, c0 : c0 + have])
            if have < n:
                chunk[b, :, have:].zero_()
        if self.antiquant is not None:
            self.antiquant.apply(chunk)
        return chunk


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
    antiquant: Antiquant | None = None
    """Dequantization of an int8 cache, else ``None``."""

    def load(self, c0: int, c1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Gather the blocks covering ``[c0, c1)`` (multiples of the block size) into ``buffer``."""
        batch, heads, _, dim = buffer.shape
        j0, j1 = c0 // self.block_size, c1 // self.block_size
        blocks = j1 - j0
        chunk = buffer[:, :, : c1 - c0]
        gathered = self.cache.index_select(0, self.table[:, j0:j1].reshape(-1))
        if self.heads_first:
            src = gathered.view(batch, blocks, heads, self.block_size, dim).permute(0, 2, 1, 3, 4)
            chunk.view(batch, heads, blocks, self.block_size, dim).copy_(src)
        else:
            src = gathered.view(batch, blocks * self.block_size, heads, dim).permute(0, 2, 1, 3)
            chunk.copy_(src)
        if self.antiquant is not None:
            self.antiquant.apply(chunk)
        return chunk
