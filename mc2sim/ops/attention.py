"""Incremental flash attention on every rank of a tensor-parallel decode layer.

Each rank attends its own heads (``num_heads`` and ``num_key_value_heads`` are per rank) of
every batch's one query token against its paged KV cache; nothing crosses ranks. Run through
the overlap scheduler, the batch is cut into tiles, each a kernel launch on a batch range, and
every tile lands in the timeline like the compute tiles of the fused ops.

The ranks of one decode layer still agree, before any work, on what must be the same on all of
them: the dtype, the tiling (their timelines pair runs by op and tiling), the batch and the
heads' shape (each rank holds an equal share of the layer's heads).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch

from mc2sim.comm import Communicator, Work, agreed
from mc2sim.comm.watchdog import in_op
from mc2sim.errors import AclnnRuntimeError, ParamInvalidError
from mc2sim.kernels import incre_flash_attention
from mc2sim.kernels._ifa_plan import plan_incre_flash_attention
from mc2sim.kernels._validate import require
from mc2sim.schedule.builders import IfaShape, plan_ifa
from mc2sim.schedule.executor import execute, progress_mode
from mc2sim.schedule.plan import Task
from mc2sim.schedule.tiling import Tiling, tiling_of

__all__ = ["ifa_decode"]

#: The kernel's optional inputs this op does not take (masks, quantisation, padding).
_ABSENT: dict[str, None] = dict.fromkeys(
    (
        "padding_mask", "atten_mask", "pse_shift", "antiquant_scale", "antiquant_offset",
        "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
        "kv_padding_size",
    )
)  # fmt: skip


class _IfaRunner:
    """Batch tiles: tile i attends batches [start, stop) and writes their output rows."""

    def __init__(self, *, attend: Callable[[int, int], torch.Tensor], out: torch.Tensor) -> None:
        self.attend, self.out = attend, out

    def compute(self, task: Task) -> None:
        if task.rows is None:  # every task of an ifa plan names its batches
            raise AclnnRuntimeError("task", task.name, "has no batch range")
        start, stop = task.rows
        self.out[start:stop] = self.attend(start, stop)

    def start(self, task: Task) -> Work:
        raise AclnnRuntimeError("task", task.name, "an ifa plan has no communication tasks")

    def land(self, task: Task, result: torch.Tensor) -> None:
        raise AclnnRuntimeError("task", task.name, "an ifa plan has no communication tasks")


def _lengths(actual_seq_lengths: Sequence[int]) -> list[int]:
    """``actual_seq_lengths`` as ints, each an integer (a float would be cut short).

    Checked inside the agreement, so a bad list on one rank fails every rank alike.
    """
    try:
        return [operator.index(n) for n in actual_seq_lengths]
    except TypeError:
        listed = isinstance(actual_seq_lengths, (list, tuple))
        shown = actual_seq_lengths if listed else type(actual_seq_lengths).__name__
        raise ParamInvalidError(
            "actual_seq_lengths", shown, "must be a sequence of integers, one per batch"
        ) from None


@in_op("ifa_decode")
def ifa_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    comm: Communicator,
    *,
    block_table: torch.Tensor,
    actual_seq_lengths: Sequence[int],
    num_heads: int,
    num_key_value_heads: int,
    block_size: int,
    scale_value: float = 1.0,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> torch.Tensor:
    """Decode attention with page attention on this rank's heads (IncreFlashAttention, BSH).

    The arguments are :func:`mc2sim.kernels.incre_flash_attention`'s with ``input_layout``
    BSH and a paged cache; every rank of ``comm`` calls it with its own heads and cache.
    Parameters are checked on every rank before any work: a bad one on any rank raises the
    same error on all of them.

    Args:
        query: FLOAT16 or BFLOAT16 ``(B, 1, N * D)``.
        key_cache: the query's dtype, ``(blocknum, block_size, N_kv * D)``.
        value_cache: like ``key_cache``.
        comm: the ranks of the layer.
        block_table: INT32 ``(B, maxBlockNumPerSeq)``, batch b's logical block j in physical
            block ``block_table[b][j]``.
        actual_seq_lengths: B KV lengths.
        num_heads: N, this rank's query heads.
        num_key_value_heads: N_kv, this rank's KV heads.
        block_size: tokens per block.
        scale_value: multiplies q k^T, usually ``1 / sqrt(D)``.
        tiling: ``None``/``"hardware"`` and ``"serial"`` (one launch) or N batch tiles.
        progress: the executor's progress mode (no communication to progress here).

    Returns:
        ``(B, 1, N * D)`` in the query's dtype.

    Raises:
        ParamNullptrError: as the kernel.
        ParamInvalidError: as the kernel, or a bad ``tiling``.
    """
    with agreed(comm) as same:
        progress_mode(progress)  # here, not in execute: one rank's bad mode fails every rank
        lengths = _lengths(actual_seq_lengths)
        require("block_table", block_table, block_table is not None, "is required (page attention)")
        plan = plan_incre_flash_attention(
            query,
            key_cache,
            value_cache,
            block_table=block_table,
            actual_seq_lengths=lengths,
            num_heads=num_heads,
            num_key_value_heads=num_key_value_heads,
            block_size=block_size,
            scale_value=scale_value,
            input_layout="BSH",
            inner_precise=1,
            **_ABSENT,
        )
        chosen = tiling_of(tiling)
        layer = "every rank attends an equal share of one layer's heads for the same batch"
        same("query.dtype", str(query.dtype).removeprefix("torch."), layer)
        same("B", plan.batch, layer)
        same("num_heads", plan.num_heads, layer)
        same("num_key_value_heads", plan.num_kv_heads, layer)
        same("D", plan.head_dim, layer)
        same("tiling", chosen.describe(), "the ranks' timelines pair their runs by tiling")
    batch = plan.batch
    shape = IfaShape(
        heads=plan.num_heads,
        kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        kv_len=math.ceil(sum(lengths) / max(len(lengths), 1)),
        elem_bytes=query.element_size(),
        dtype=str(query.dtype).removeprefix("torch."),
    )
    schedule = plan_ifa(
        batch=batch, shape=shape, tiling=chosen, rank=comm.rank, world_size=comm.size
    )

    def attend(start: int, stop: int) -> torch.Tensor:
        return incre_flash_attention(
            query[start:stop],
            key_cache,
            value_cache,
            block_table=block_table[start:stop],
            actual_seq_lengths=lengths[start:stop],
            num_heads=num_heads,
            num_key_value_heads=num_key_value_heads,
            block_size=block_size,
            scale_value=scale_value,
            input_layout="BSH",
        )

    out = torch.empty_like(query)
    execute(
        schedule, comm, _IfaRunner(attend=attend, out=out), progress=progress, device=out.device
    )
    return out
