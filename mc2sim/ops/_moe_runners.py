"""Tile runners of the MoE ops: which rows each expert chunk computes, sends and receives."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mc2sim.comm import Communicator, Work
from mc2sim.kernels import grouped_matmul, matmul
from mc2sim.kernels._device import from_host
from mc2sim.ops._layout import transpose_blocks
from mc2sim.schedule.plan import Task, TaskKind
from mc2sim.schedule.tiling import even_split

__all__ = [
    "CombineRunner",
    "DispatchRunner",
    "SharedExpert",
    "chunk_rows",
    "split_by_source",
]


def chunk_rows(
    counts: np.ndarray, block_start: np.ndarray, peers: range, part: int, parts: int
) -> torch.Tensor:
    """Row numbers of one sub-tile: part ``part`` of each peer's block, peers in order.

    Args:
        counts: rows of each peer's block, indexed like ``block_start``.
        block_start: first row of each peer's block in the source tensor.
        peers: the peers, in the order their rows are wanted.
        part: which sub-tile.
        parts: how many sub-tiles each block is split into (``even_split``).

    Returns:
        int64 row numbers.
    """
    pieces = []
    for q in peers:
        sizes = even_split(int(counts[q]), parts)
        start = int(block_start[q]) + sum(sizes[:part])
        pieces.append(torch.arange(start, start + sizes[part]))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def split_by_source(
    rows: torch.Tensor, by_source: np.ndarray, expert: int, part: int, parts: int
) -> list[torch.Tensor]:
    """Cut a received chunk into the pieces of each source rank (its part of ``expert``)."""
    sizes = [even_split(int(c), parts)[part] for c in by_source[:, expert]]
    return list(torch.split(rows, sizes))


class SharedExpert:
    """The shared-expert matmul that runs alongside the routed experts."""

    def __init__(
        self, mm_x: torch.Tensor | None, mm_weight: torch.Tensor | None, trans: bool
    ) -> None:
        self.mm_x, self.mm_weight, self.trans = mm_x, mm_weight, trans
        self.result: torch.Tensor | None = None

    def run(self) -> None:
        if self.mm_x is not None and self.mm_weight is not None:
            weight = self.mm_weight.t() if self.trans else self.mm_weight
            self.result = matmul(self.mm_x, weight)


def _take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]``, rows gathered into a new tensor by ``index_select``.

    The same rows as indexing, 2 to 8x faster on the CPU (a block reorder of 6430 x 1024
    bfloat16 rows: 1.1 to 1.3 against 2.7 to 9.9 ms, docs/BENCHMARKS.md).
    """
    return t.index_select(0, from_host(index, t.device))


class _ExpertChunks:
    """What both MoE runners know of a call: counts, layouts, inputs, the shared expert."""

    def __init__(
        self,
        *,
        comm: Communicator,
        gmm_x: torch.Tensor,
        gmm_weight: torch.Tensor,
        trans_gmm_weight: bool,
        send: list[int],
        recv: list[int],
        e: int,
        parts: int,
        shared: SharedExpert,
    ) -> None:
        self.comm, self.x, self.weight, self.trans = comm, gmm_x, gmm_weight, trans_gmm_weight
        self.e, self.parts, self.shared = e, parts, shared
        self.world = len(send) // e
        self.by_dest = np.asarray(send, dtype=np.int64).reshape(self.world, e)  # [q, j]
        self.by_source = np.asarray(recv, dtype=np.int64).reshape(self.world, e)  # [r, j]


class CombineRunner(_ExpertChunks):
    """GroupedMatMulAlltoAllv: expert GMM chunks, each sent back to the tokens' ranks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # expert-major gmm_x: block (j, q) starts after all experts < j and peers < q of j
        flat = self.by_dest.T.reshape(-1)
        self.starts = (np.cumsum(flat) - flat).reshape(self.e, self.world)  # [j, q]
        self.outputs: dict[int, torch.Tensor] = {}
        self.received: dict[tuple[int, int], torch.Tensor] = {}
        self.whole: torch.Tensor | None = None

    def compute(self, task: Task) -> None:
        if task.kind is TaskKind.MATMUL:
            self.shared.run()
        elif task.kind is TaskKind.PACK:  # serial: the GMM's output back to rank-major
            gmm_y = self.outputs.pop(task.deps[0])
            self.outputs[task.id] = _take_rows(gmm_y, transpose_blocks(self.by_dest.T))
        elif task.expert is None:  # serial: every expert at once
            self.outputs[task.id] = grouped_matmul(
                self.x, self.weight, self.by_dest.sum(axis=0).tolist(), trans_weight=self.trans
            )
        else:
            j = task.expert
            if self.parts == 1:
                start = int(self.starts[j, 0])
                rows = self.x[start : start + int(self.by_dest[:, j].sum())]
            else:
                idx = chunk_rows(
                    self.by_dest[:, j], self.starts[j], range(self.world), task.part, self.parts
                )
                rows = _take_rows(self.x, idx)
            self.outputs[task.id] = grouped_matmul(
                rows, self.weight[j : j + 1], [rows.shape[0]], trans_weight=self.trans
            )

    def start(self, task: Task) -> Work:
        return self.comm.ialltoallv(
            self.outputs.pop(task.deps[0]), task.send_splits, task.recv_splits
        )

    def land(self, task: Task, result: torch.Tensor) -> None:
        if task.expert is None:
            self.whole = result
        else:
            self.received[(task.expert, task.part)] = result

    def y(self) -> torch.Tensor:
        """The output, ordered by (source rank, expert)."""
        if self.whole is not None:
            return self.whole
        by_chunk = {
            (j, p): split_by_source(rows, self.by_source, j, p, self.parts)
            for (j, p), rows in self.received.items()
        }
        pieces = [
            by_chunk[(j, p)][r]
            for r in range(self.world)
            for j in range(self.e)
            for p in range(self.parts)
        ]
        return torch.cat(pieces)


class DispatchRunner(_ExpertChunks):
    """AlltoAllvGroupedMatMul: every expert chunk's rows sent first, each GMM once arrived."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        flat = self.by_dest.reshape(-1)
        self.starts = (np.cumsum(flat) - flat).reshape(self.world, self.e)  # rank-major [q, j]
        self.received: dict[int, torch.Tensor] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.packed: dict[int, torch.Tensor] = {}
        self.whole: tuple[torch.Tensor, torch.Tensor] | None = None

    def start(self, task: Task) -> Work:
        rows = self.x if task.expert is None else self.packed.pop(task.deps[0])
        return self.comm.ialltoallv(rows, task.send_splits, task.recv_splits)

    def land(self, task: Task, result: torch.Tensor) -> None:
        self.received[task.id] = result

    def compute(self, task: Task) -> None:
        if task.kind is TaskKind.MATMUL:
            self.shared.run()
            return
        if task.kind is TaskKind.PACK and task.expert is None:  # serial: to expert-major
            arrived = self.received.pop(task.deps[0])
            self.packed[task.id] = _take_rows(arrived, transpose_blocks(self.by_source))
            return
        if task.kind is TaskKind.PACK:  # expert j's sub-tile rows, destination by destination
            j = task.expert
            self.packed[task.id] = _take_rows(
                self.x,
                chunk_rows(
                    self.by_dest[:, j], self.starts[:, j], range(self.world), task.part, self.parts
                ),
            )
            return
        if task.expert is None:  # serial: every expert at once, on the permuted rows
            permuted = self.packed.pop(task.deps[0])
            gmm_y = grouped_matmul(
                permuted, self.weight, self.by_source.sum(axis=0).tolist(), trans_weight=self.trans
            )
            self.whole = (gmm_y, permuted)
        else:
            arrived = self.received.pop(task.deps[0])
            j = task.expert
            self.inputs[(j, task.part)] = arrived
            self.outputs[(j, task.part)] = grouped_matmul(
                arrived, self.weight[j : j + 1], [arrived.shape[0]], trans_weight=self.trans
            )

    def _expert_major(self, chunks: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        pieces: list[torch.Tensor] = []
        for j in range(self.e):
            splits = {
                p: split_by_source(chunks[(j, p)], self.by_source, j, p, self.parts)
                for p in range(self.parts)
            }
            pieces.extend(splits[p][r] for r in range(self.world) for p in range(self.parts))
        return torch.cat(pieces)

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gmm_y, permute_out)``, both expert-major."""
        if self.whole is not None:
            return self.whole
        return self._expert_major(self.outputs), self._expert_major(self.inputs)
