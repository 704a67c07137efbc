"""Row layouts of the MoE ops: reorder blocks of rows between expert-major and rank-major."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["transpose_blocks"]


def transpose_blocks(counts: np.ndarray) -> torch.Tensor:
    """Return the row index that reorders blocks from (p, q) order to (q, p) order.

    Rows are laid out as blocks ``(p, q)`` in p-major order, block ``(p, q)`` holding
    ``counts[p, q]`` rows. ``rows[index]`` lists the same blocks in q-major order, each
    block's rows kept in order. Used for the unpermute of GroupedMatMulAlltoAllv
    (expert-major to rank-major) and the permute of AlltoAllvGroupedMatMul (the reverse).

    Args:
        counts: ``(P, Q)`` non-negative block sizes.

    Returns:
        int64 tensor of ``counts.sum()`` row numbers.
    """
    counts = np.asarray(counts, dtype=np.int64)
    starts = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)
    lengths = counts.T.ravel()
    firsts = starts.T.ravel()
    # each output row = its block's first input row + its position inside the block
    block_of_row = np.repeat(np.arange(lengths.size), lengths)
    position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return torch.from_numpy(firsts[block_of_row] + position)
