"""Tile runners of the tensor-parallel ops: row tiles and rank chunks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mc2sim.comm import Communicator, Completed, Work
from mc2sim.schedule.plan import Task, TaskKind

__all__ = ["AllGatherMatmulRunner", "AllReduceRunner", "ReduceScatterRunner"]


def _span(task: Task) -> tuple[int, int]:
    if task.rows is None:  # every tiled task of these plans names its rows
        raise ValueError(f"task {task.name} has no rows")
    return task.rows


def _peer(task: Task) -> int:
    if task.peer is None:  # every rank chunk of these plans names its peer
        raise ValueError(f"task {task.name} has no peer")
    return task.peer


class AllReduceRunner:
    """MatmulAllReduce: tile i's local product, then its AllReduce straight into the output."""

    def __init__(
        self,
        *,
        comm: Communicator,
        local: Callable[[int, int], torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        """Args: ``local(start, stop)`` computes rows [start, stop) of this rank's product."""
        self.comm, self.local, self.out = comm, local, out
        self.tiles: dict[int, torch.Tensor] = {}

    def compute(self, task: Task) -> None:
        self.tiles[task.id] = self.local(*_span(task))

    def start(self, task: Task) -> Work:
        start, stop = _span(task)
        return self.comm.iallreduce(self.tiles.pop(task.deps[0]), out=self.out[start:stop])

    def land(self, task: Task, result: torch.Tensor) -> None:
        """The AllReduce wrote into the output already."""


class AllGatherMatmulRunner:
    """AllGatherMatmul: own chunk at once, each peer's chunk as it arrives (ring order)."""

    def __init__(
        self,
        *,
        comm: Communicator,
        x1: torch.Tensor,
        multiply: Callable[[torch.Tensor], torch.Tensor],
        n: int,
    ) -> None:
        self.comm, self.x1, self.multiply = comm, x1, multiply
        m, world = x1.shape[0], comm.size
        self.m = m
        self.gathered = torch.empty((world * m, x1.shape[1]), dtype=x1.dtype, device=x1.device)
        self.gathered[comm.rank * m : (comm.rank + 1) * m] = x1
        self.out: torch.Tensor | None = None
        self.n = n

    def _rows(self, peer: int, task: Task) -> slice:
        start, stop = _span(task)
        return slice(peer * self.m + start, peer * self.m + stop)

    def start(self, task: Task) -> Work:
        if task.kind is TaskKind.ALLGATHER:
            return Completed(self.comm.allgather(self.x1))
        start, stop = _span(task)
        return self.comm.ialltoallv(self.x1[start:stop], task.send_splits, task.recv_splits)

    def land(self, task: Task, result: torch.Tensor) -> None:
        if task.kind is TaskKind.ALLGATHER:
            self.gathered = result
        else:
            self.gathered[self._rows(_peer(task), task)] = result

    def compute(self, task: Task) -> None:
        if task.peer is None:  # serial: the whole gathered matrix at once
            self.out = self.multiply(self.gathered)
            return
        if self.out is None:
            self.out = torch.empty(
                (self.gathered.shape[0], self.n), dtype=self.x1.dtype, device=self.x1.device
            )
        rows = self._rows(task.peer, task)
        self.out[rows] = self.multiply(self.gathered[rows])


class ReduceScatterRunner:
    """MatmulReduceScatter: partials of each destination's rows, exchanged, summed at home."""

    def __init__(
        self,
        *,
        comm: Communicator,
        x1: torch.Tensor,
        multiply: Callable[[torch.Tensor], torch.Tensor],
        n: int,
    ) -> None:
        self.comm, self.x1, self.multiply, self.n = comm, x1, multiply, n
        self.block = x1.shape[0] // comm.size
        self.partials: dict[int, torch.Tensor] = {}
        self.arrived: dict[tuple[int, int], torch.Tensor] = {}  # (rows start in block, source)
        self.out: torch.Tensor | None = None

    def compute(self, task: Task) -> None:
        if task.kind is TaskKind.REDUCE:
            self._reduce()
            return
        if task.peer is None:  # serial: the whole product, then one ReduceScatter
            self.partials[task.id] = self.multiply(self.x1)
            return
        start, stop = _span(task)
        partial = self.multiply(self.x1[start:stop])
        if task.peer == self.comm.rank:  # this rank's own block: no exchange
            self.arrived[(start - self.comm.rank * self.block, self.comm.rank)] = partial
        self.partials[task.id] = partial

    def start(self, task: Task) -> Work:
        if task.kind is TaskKind.REDUCE_SCATTER:
            return Completed(self.comm.reduce_scatter(self.partials.pop(task.deps[0])))
        return self.comm.ialltoallv(
            self.partials.pop(task.deps[0]), task.send_splits, task.recv_splits
        )

    def land(self, task: Task, result: torch.Tensor) -> None:
        if task.kind is TaskKind.REDUCE_SCATTER:
            self.out = result
            return
        source = next(r for r, rows in enumerate(task.recv_splits) if rows)
        self.arrived[(_span(task)[0], source)] = result

    def _reduce(self) -> None:
        """Sum every source's partial of this rank's block, in float32, rounded once."""
        starts = sorted({start for start, _ in self.arrived})
        rows = []
        for start in starts:
            parts = [self.arrived[(start, r)] for r in range(self.comm.size)]
            total = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
            for part in parts:
                total += part.float()
            rows.append(total.to(self.x1.dtype))
        self.out = torch.cat(rows)
