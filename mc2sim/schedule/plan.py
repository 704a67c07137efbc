"""The ``Plan`` of one fused-op call on one rank: a DAG of compute tiles and comm chunks.

A plan is built from the problem's shapes, dtypes and counts alone (no tensor data), so the
same object feeds the real executor (:mod:`mc2sim.schedule.executor`) and the cost-model
simulator. Tasks are listed in issue order, a topological order of the DAG: the order the
fused kernel issues them on the hardware.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from mc2sim._compat import StrEnum
from mc2sim.errors import ParamInvalidError

__all__ = [
    "FIGURE_LIMIT",
    "AlltoAllvLoads",
    "Plan",
    "PlanArrays",
    "Resource",
    "SideLoads",
    "SparseCounts",
    "SparseSplits",
    "Task",
    "TaskKind",
    "check_figures",
]


class SparseSplits(Sequence[int]):
    """Rows to or from each of ``world`` ranks, only the non-zero ones stored.

    A ``Sequence[int]`` of length ``world`` (so the executor and the communicators take it
    like a list), whose ``peers`` and ``counts`` arrays let the simulator handle thousands of
    ranks without dense per-peer lists.
    """

    __slots__ = ("_total", "counts", "peers", "world")

    def __init__(self, world: int, peers: np.ndarray, counts: np.ndarray) -> None:
        keep = np.asarray(counts) != 0
        self.world = int(world)
        self.peers: np.ndarray = np.asarray(peers, dtype=np.int64)[keep]
        self.counts: np.ndarray = np.asarray(counts, dtype=np.int64)[keep]
        self._total: int | None = None

    @classmethod
    def _nonzero(
        cls, world: int, peers: np.ndarray, counts: np.ndarray, total: int
    ) -> SparseSplits:
        """Wrap int64 ``peers`` and ``counts`` that hold no zero count, and their ``total``."""
        splits = cls.__new__(cls)
        splits.world, splits.peers, splits.counts, splits._total = world, peers, counts, total
        return splits

    def __len__(self) -> int:
        return self.world

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> Any:
        dense = self.dense()
        return dense[index] if isinstance(index, int) else tuple(dense[index])

    def __iter__(self) -> Iterator[int]:
        return iter(self.dense())

    def dense(self) -> list[int]:
        """Every rank's count, as a list."""
        out = np.zeros(self.world, dtype=np.int64)
        out[self.peers] = self.counts
        return [int(c) for c in out]

    def total(self, *, without: int | None = None) -> int:
        """The sum of the counts, optionally leaving out one rank."""
        if without is None:
            if self._total is None:
                self._total = int(self.counts.sum())
            return self._total
        return int(self.counts[self.peers != without].sum())

    def __repr__(self) -> str:
        return f"SparseSplits(world={self.world}, nonzero={len(self.peers)}, total={self.total()})"


@dataclass(frozen=True, slots=True)
class SparseCounts:
    """MoE send/recv counts, indexed ``peer * e + expert``, only the non-zero ones stored."""

    size: int
    """The dense length: ``world * e``."""
    index: np.ndarray
    """Positions of the non-zero counts (int64, ascending)."""
    values: np.ndarray
    """The counts there (int64)."""
    _experts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """``e`` -> every expert's (peers, counts), split once: plans ask for each expert in turn."""

    def total(self) -> int:
        """All rows."""
        return int(self.values.sum())

    def dense(self) -> list[int]:
        """The counts as a dense list of ``size`` ints."""
        out = np.zeros(self.size, dtype=np.int64)
        out[self.index] = self.values
        return [int(c) for c in out]

    def expert(self, j: int, e: int) -> SparseSplits:
        """Expert ``j``'s count for every peer (peers ascending)."""
        split = self._experts.get(e)
        if split is None:  # one stable sort by expert instead of a scan per expert
            which = self.index % e
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(e + 1))
            peers, values = self.index[order] // e, self.values[order]
            split = [
                (peers[bounds[k] : bounds[k + 1]], values[bounds[k] : bounds[k + 1]])
                for k in range(e)
            ]
            self._experts[e] = split
        if not 0 <= j < e:
            return SparseSplits(self.size // e, self.index[:0], self.values[:0])
        return SparseSplits(self.size // e, *split[j])

    def expert_parts(self, e: int, parts: int) -> list[SparseSplits]:
        """Every expert's counts cut in ``parts`` sub-tiles, entry ``j * parts + p``.

        Sub-tile ``p`` of expert ``j`` gets, from each peer, that peer's count for ``j`` split
        as :func:`mc2sim.schedule.tiling.even_split` splits it (the larger parts first):
        what ``expert(j, e)`` gives, cut for all experts and sub-tiles at once.
        """
        index = np.asarray(self.index, dtype=np.int64)
        peers = index // e  # floor division by a scalar is fast, % is not: which by subtraction
        which = index - peers * e
        # a stable sort by expert (a radix sort where the experts fit 16 bits): peers ascend
        order = np.argsort(which.astype(np.uint16) if e <= 1 << 16 else which, kind="stable")
        which, peers, values = which[order], peers[order], np.asarray(self.values, np.int64)[order]
        base = values // parts
        extra = values - base * parts
        # row p: every count's sub-tile p; kept in (part, expert, peer) order, cut by group
        counts = base + (np.arange(parts)[:, None] < extra)
        keep = counts != 0
        group = (np.arange(parts)[:, None] * e + which)[keep]
        kept_peers, kept_counts = np.broadcast_to(peers, counts.shape)[keep], counts[keep]
        bounds = np.searchsorted(group, np.arange(parts * e + 1)).tolist()
        sums = np.concatenate([[0], np.cumsum(kept_counts)])[bounds].tolist()
        world, out = self.size // e, []
        for j in range(e):
            for g in range(j, parts * e, e):
                lo, hi = bounds[g], bounds[g + 1]
                out.append(
                    SparseSplits._nonzero(
                        world, kept_peers[lo:hi], kept_counts[lo:hi], sums[g + 1] - sums[g]
                    )
                )
        return out

    def per_peer(self, e: int) -> SparseSplits:
        """Every peer's count summed over its ``e`` experts."""
        peers = np.asarray(self.index, dtype=np.int64) // e  # ascending, as the index is
        starts = np.flatnonzero(np.diff(peers, prepend=-1))
        values = np.asarray(self.values, dtype=np.int64)  # sums in int64, whatever the counts'
        sums = np.add.reduceat(values, starts) if len(starts) else values[:0]
        return SparseSplits(self.size // e, peers[starts], sums)


class Resource(StrEnum):
    """What a task occupies while it runs.

    Glossary: ``compute`` is the matrix unit (a tile's matmul); ``comm`` is the
    communication engine (a chunk's collective). One task of each can run at a time, so a
    comm chunk in flight overlaps the next compute tile.
    """

    COMPUTE = "compute"
    COMM = "comm"


class TaskKind(StrEnum):
    """The operation of a task.

    Glossary: compute kinds ``matmul`` (dense, the shared expert too), ``grouped_matmul``
    (one or more experts' rows), ``quant_matmul`` (int8 x int8), ``weight_quant_matmul``
    (float x int8/int4), ``attention`` (incremental flash attention of some batches),
    ``reduce`` (summing received partials), ``pack`` (copying a chunk's rows into one send
    buffer: a collective sends one contiguous block per peer); comm kinds ``allreduce``,
    ``alltoallv``, ``allgather``, ``reduce_scatter``.
    """

    MATMUL = "matmul"
    GROUPED_MATMUL = "grouped_matmul"
    QUANT_MATMUL = "quant_matmul"
    WEIGHT_QUANT_MATMUL = "weight_quant_matmul"
    ATTENTION = "attention"
    REDUCE = "reduce"
    PACK = "pack"
    ALLREDUCE = "allreduce"
    ALLTOALLV = "alltoallv"
    ALLGATHER = "allgather"
    REDUCE_SCATTER = "reduce_scatter"

    @property
    def resource(self) -> Resource:
        """The resource this kind of task occupies."""
        return _RESOURCE_OF[self]


FIGURE_LIMIT = 2**62
"""A task's FLOPs and bytes must be below this: the simulator and the timelines count them in
64-bit integers (numpy ``int64``), and sums of a few such figures must fit too."""


def check_figures(param: str, flops: object, nbytes: object) -> None:
    """Refuse FLOPs or bytes of a task (or an array of them) at or above :data:`FIGURE_LIMIT`.

    Args:
        param: what errors name (``tasks[3]`` of a plan; ``flops`` of plan arrays).
        flops: a task's FLOPs, or an array of them.
        nbytes: its bytes, or an array of them.

    Raises:
        ParamInvalidError: a figure is too large to simulate (a shape whose product of
            sizes overflows the simulator's integers), negative or not finite.
    """
    for what, value in (("FLOPs", flops), ("bytes", nbytes)):
        values = np.atleast_1d(np.asarray(value, dtype=np.float64))
        bad = ~np.isfinite(values) | (values < 0) | (values >= FIGURE_LIMIT)
        if bad.any():
            raise ParamInvalidError(
                param,
                f"{values[bad][0]:.6g} {what}",
                "a task's FLOPs and bytes must be in [0, 2**62): the shape is too large "
                "(mc2sim counts them in 64-bit integers)",
            )


_COMM_KINDS = (TaskKind.ALLREDUCE, TaskKind.ALLTOALLV, TaskKind.ALLGATHER, TaskKind.REDUCE_SCATTER)
_RESOURCE_OF = {k: Resource.COMM if k in _COMM_KINDS else Resource.COMPUTE for k in TaskKind}
"""Each task kind's resource (asked once per task by the simulator: a lookup, not a set)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    """One compute tile or comm chunk of a plan."""

    id: int
    """Position in the plan (issue order); dependencies point to smaller ids."""
    name: str
    """Short label, e.g. ``matmul[2]`` or ``alltoallv[e3]``."""
    kind: TaskKind
    """What the task does; its resource follows."""
    deps: tuple[int, ...] = ()
    """Tasks that must finish before this one starts."""
    flops: int = 0
    """Floating-point (or integer multiply-add x 2) operations of a compute task."""
    bytes: int = 0
    """Bytes this rank sends in a comm task; bytes read and written by a compute task."""
    rows: tuple[int, int] | None = None
    """``[start, stop)`` rows of the op's tile frame this task covers, if it is a row tile."""
    expert: int | None = None
    """The local expert of an MoE chunk, if any."""
    part: int = 0
    """Sub-tile number inside an expert or a rank chunk."""
    peer: int | None = None
    """For rank-chunked plans: the rank whose data this chunk carries."""
    send_splits: tuple[int, ...] | SparseSplits = ()
    """For alltoallv chunks: rows this rank sends to each rank."""
    recv_splits: tuple[int, ...] | SparseSplits = ()
    """For alltoallv chunks: rows this rank receives from each rank."""
    row_bytes: int = 0
    """For alltoallv chunks: bytes per row."""

    @property
    def resource(self) -> Resource:
        """The resource the task occupies."""
        return self.kind.resource


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The tasks of one fused-op call on one rank, in issue order."""

    op: str
    """The fused op, e.g. ``mm_all_reduce``."""
    tiling: str
    """The tiling in words, e.g. ``hardware(tiles=3)``, ``serial``, ``tiles=4``."""
    rank: int
    """The rank this plan runs on (MoE plans differ per rank)."""
    world_size: int
    """Ranks in the group."""
    tasks: tuple[Task, ...]
    """Every task, in issue order (a topological order)."""
    dtype: str = "float16"
    """The compute dtype the matrix unit multiplies in (``int8`` for quant matmuls)."""
    meta: tuple[tuple[str, object], ...] = field(default=())
    """Shapes and other facts of the call, as (key, value) pairs."""

    def __post_init__(self) -> None:
        for position, task in enumerate(self.tasks):
            if task.id != position:
                raise ParamInvalidError(
                    "tasks",
                    task.name,
                    f"task ids must be 0..n-1 in order; got {task.id} at {position}",
                )
            if not 0 <= task.flops < FIGURE_LIMIT or not 0 <= task.bytes < FIGURE_LIMIT:
                check_figures(f"tasks[{task.id}] ({task.name})", task.flops, task.bytes)
            for dep in task.deps:
                if not 0 <= dep < task.id:
                    raise ParamInvalidError(
                        f"tasks[{task.id}].deps",
                        task.deps,
                        "dependencies must point to earlier tasks (the plan must be acyclic)",
                    )

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def of(self, resource: Resource) -> list[Task]:
        """Return the tasks on ``resource``, in issue order."""
        return [t for t in self.tasks if t.resource is resource]

    @property
    def flops(self) -> int:
        """Total FLOPs of the compute tasks."""
        return sum(t.flops for t in self.tasks if t.resource is Resource.COMPUTE)

    @property
    def comm_bytes(self) -> int:
        """Total bytes this rank sends."""
        return sum(t.bytes for t in self.tasks if t.resource is Resource.COMM)

    def dependents(self, task_id: int) -> list[int]:
        """Return the ids of the tasks that depend on ``task_id``."""
        return [t.id for t in self.tasks if task_id in t.deps]

    def meta_value(self, key: str, default: object = None) -> object:
        """Return a meta value by key."""
        return dict(self.meta).get(key, default)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SideLoads:
    """One side (send or receive) of an AlltoAllv, every rank's load on every dimension.

    What the cost model reads of the side's pairs (:func:`mc2sim.model.cost.loads_alltoallv_time`):
    entry ``[d, r]`` is rank r's traffic over network dimension d (the outermost in which it
    and the peer differ), the rank itself left out.
    """

    total: np.ndarray
    """(dims, ranks) float64: bytes over the dimension, summed over its peers there."""
    largest: np.ndarray
    """(dims, ranks) float64: bytes to its busiest single peer there."""
    peers: np.ndarray
    """(dims, ranks) float64: how many peers it talks to there (an expectation may be
    fractional)."""


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class AlltoAllvLoads:
    """An AlltoAllv chunk of every rank, as loads rather than pairs (thousands of ranks)."""

    send: SideLoads
    """What each rank sends."""
    recv: SideLoads
    """What each rank receives."""


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PlanArrays:
    """Every rank's plan of one call at once: one task structure, each rank's figures.

    Where every rank's plan has the same tasks (an op's plans do: the kinds, names and
    dependencies follow from the shapes and tiling; the counts only change the figures),
    ``template`` holds them and the arrays hold what differs by rank: row ``i`` is task
    ``i``, column ``r`` rank ``r``. An AlltoAllv's traffic is its :class:`AlltoAllvLoads`.
    No object per task and rank is made: what simulating thousands of ranks needs.
    """

    template: Plan
    """The tasks (names, kinds, dependencies, row bytes); their own figures are unused."""
    world_size: int
    """Ranks."""
    flops: np.ndarray
    """(tasks, ranks) FLOPs of each compute task (float64: an expectation may be fractional)."""
    bytes: np.ndarray
    """(tasks, ranks) bytes: a compute task's traffic, a comm task's bytes sent to other ranks."""
    loads: Mapping[int, AlltoAllvLoads]
    """Task id -> its AlltoAllv's loads, for every AlltoAllv task."""
    intra: np.ndarray
    """(tasks, ranks) bytes a comm task sends within its rank's node (0 for compute)."""
    inter: np.ndarray
    """(tasks, ranks) bytes a comm task sends to other nodes."""

    def __post_init__(self) -> None:
        check_figures(f"{self.template.op} plan arrays", self.flops, self.bytes)


def row_tiles(total: int, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Return consecutive ``[start, stop)`` row ranges of the given lengths covering ``total``.

    Raises:
        ParamInvalidError: the lengths are not positive or do not add up to ``total``.
    """
    if any(n <= 0 for n in lengths) or sum(lengths) != total:
        raise ParamInvalidError(
            "tile lengths", list(lengths), f"must be positive and sum to {total}"
        )
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out
