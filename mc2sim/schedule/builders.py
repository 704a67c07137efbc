"""Plans of the five fused ops and of decode attention, from shapes, dtypes and counts alone.

Each builder mirrors how the fused kernel pipelines its op (OPS.md, "How the fused kernel
overlaps"): compute of tile i runs while tile i-1's chunk communicates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mc2sim.errors import ParamInvalidError
from mc2sim.schedule.plan import (
    AlltoAllvLoads,
    Plan,
    PlanArrays,
    SideLoads,
    SparseCounts,
    SparseSplits,
    Task,
    TaskKind,
    row_tiles,
)
from mc2sim.schedule.tiling import (
    Tiling,
    TilingMode,
    hardware_mm_all_reduce_tiles,
    tile_lengths,
)

if TYPE_CHECKING:
    from mc2sim.routing import ExpectedRouting

__all__ = [
    "IfaShape",
    "moe_arrays",
    "plan_all_gather_matmul",
    "plan_alltoallv_gmm",
    "plan_gmm_alltoallv",
    "plan_ifa",
    "plan_matmul_reduce_scatter",
    "plan_mm_all_reduce",
]


class _Tasks:
    """Accumulates tasks with consecutive ids."""

    def __init__(self) -> None:
        self.items: list[Task] = []

    def add(self, name: str, kind: TaskKind, **fields: object) -> int:
        task = Task(id=len(self.items), name=name, kind=kind, **fields)  # type: ignore[arg-type]
        self.items.append(task)
        return task.id


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulShape:
    """The dense part of a tile: rows x k times k x n."""

    k: int
    """Reduction dim."""
    n: int
    """Output columns."""
    in_bytes: int
    """Bytes per element of the left input."""
    w_bytes: float
    """Bytes per element of the weight (0.5 for int4)."""
    out_bytes: int
    """Bytes per element of the output."""
    dtype: str = "float16"
    """The dtype the matrix unit multiplies in."""

    def flops(self, rows: int) -> int:
        """2 * rows * k * n."""
        return 2 * rows * self.k * self.n

    def traffic(self, rows: int) -> int:
        """Bytes a tile reads and writes: its rows of x, the whole weight, its output rows."""
        return int(
            rows * self.k * self.in_bytes
            + self.k * self.n * self.w_bytes
            + rows * self.n * self.out_bytes
        )


def plan_mm_all_reduce(
    *,
    m: int,
    shape: MatmulShape,
    kind: TaskKind,
    tiling: Tiling,
    rank: int,
    world_size: int,
) -> Plan:
    """Plan MatmulAllReduce: M tiles, each a matmul then an AllReduce of its rows.

    Args:
        m: rows of the output (batch dims flattened).
        shape: k, n and element sizes.
        kind: ``matmul``, ``weight_quant_matmul`` or ``quant_matmul``.
        tiling: hardware (the default policy), serial (one tile) or N equal tiles.
        rank: this rank.
        world_size: ranks in the group.

    Returns:
        The plan; task ``rows`` give each tile's rows.
    """
    if tiling.mode is TilingMode.SERIAL:
        lengths = [m]
        described = "serial"
    elif tiling.mode is TilingMode.HARDWARE:
        lengths = hardware_mm_all_reduce_tiles(m, shape.k, shape.n, shape.out_bytes)
        described = f"hardware(tiles={len(lengths)})"
    else:
        lengths = tile_lengths(m, tiling.count)
        described = tiling.describe()
    tasks = _Tasks()
    for i, (start, stop) in enumerate(row_tiles(m, lengths)):
        rows = stop - start
        mm = tasks.add(
            f"{kind}[{i}]",
            kind,
            rows=(start, stop),
            part=i,
            flops=shape.flops(rows),
            bytes=shape.traffic(rows),
        )
        tasks.add(
            f"allreduce[{i}]",
            TaskKind.ALLREDUCE,
            rows=(start, stop),
            part=i,
            deps=(mm,),
            bytes=rows * shape.n * shape.out_bytes,
        )
    return Plan(
        dtype=shape.dtype,
        op="mm_all_reduce",
        tiling=described,
        rank=rank,
        world_size=world_size,
        tasks=tuple(tasks.items),
        meta=(("m", m), ("k", shape.k), ("n", shape.n)),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class MoeShape:
    """The shapes and counts of one rank's MoE call."""

    e: int
    """Local experts per rank."""
    send: tuple[int, ...] | SparseCounts
    """send_counts (``q*e + j``); sparse for simulations of thousands of ranks."""
    recv: tuple[int, ...] | SparseCounts
    """recv_counts (``r*e + j``)."""
    h1: int
    """Hidden size of the routed experts."""
    n1: int
    """Output size of the routed experts."""
    elem_bytes: int
    """Bytes per element (float16/bfloat16: 2)."""
    shared: tuple[int, int, int] | None = None
    """(BS, H2, N2) of the shared expert, if any."""
    dtype: str = "float16"
    """The dtype the matrix unit multiplies in."""

    @property
    def world(self) -> int:
        """Ranks in the group."""
        size = self.send.size if isinstance(self.send, SparseCounts) else len(self.send)
        return size // self.e

    def expert_parts(
        self, counts: tuple[int, ...] | SparseCounts, parts: int
    ) -> Sequence[tuple[int, ...] | SparseSplits]:
        """Rows of every expert's sub-tiles for each peer, entry ``j * parts + p``.

        Sub-tile ``p`` of expert ``j`` is part ``p`` of
        :func:`~mc2sim.schedule.tiling.even_split` of each peer's count for ``j``, read off
        the count's quotient and remainder (both sides of an exchange split alike).
        """
        if isinstance(counts, SparseCounts):
            return counts.expert_parts(self.e, parts)
        e, world = self.e, self.world
        split: list[tuple[int, ...]] = []
        for j in range(e):  # each count divided once, its sub-tiles read off (even_split's)
            column = [divmod(counts[q * e + j], parts) for q in range(world)]
            split.extend(tuple(base + (p < extra) for base, extra in column) for p in range(parts))
        return split

    def per_peer(self, counts: tuple[int, ...] | SparseCounts) -> tuple[int, ...] | SparseSplits:
        """Rows per peer over all experts."""
        if isinstance(counts, SparseCounts):
            return counts.per_peer(self.e)
        e = self.e
        return tuple(sum(counts[q * e : (q + 1) * e]) for q in range(self.world))

    @staticmethod
    def total(counts: tuple[int, ...] | SparseCounts) -> int:
        """All rows."""
        return counts.total() if isinstance(counts, SparseCounts) else sum(counts)


def _moe_parts(tiling: Tiling) -> tuple[int, str]:
    if tiling.mode is TilingMode.TILES:
        return tiling.count, f"experts x {tiling.count}"
    return 1, "hardware(per expert)"


def _shared_task(tasks: _Tasks, shape: MoeShape) -> None:
    if shape.shared is not None:
        bs, h2, n2 = shape.shared
        tasks.add(
            "matmul[shared]",
            TaskKind.MATMUL,
            flops=2 * bs * h2 * n2,
            bytes=(bs * h2 + h2 * n2 + bs * n2) * shape.elem_bytes,
        )


def _gmm_fields(rows: int, shape: MoeShape, experts: int) -> dict[str, int]:
    """FLOPs and bytes of a grouped matmul of ``rows``."""
    traffic = rows * (shape.h1 + shape.n1) + experts * shape.h1 * shape.n1
    return {"flops": 2 * rows * shape.h1 * shape.n1, "bytes": traffic * shape.elem_bytes}


def _gather_bytes(rows: int, row_bytes: int) -> int:
    """Bytes of a pack task gathering ``rows`` of ``row_bytes`` into a new buffer.

    Each row is read and written once: a dispatch chunk's rows copied into its send buffer,
    or a serial (non-fused) MoE pipeline's reorder between rank-major and expert-major, a
    kernel of its own apart from the grouped matmul.
    """
    return 2 * rows * row_bytes


def plan_gmm_alltoallv(*, shape: MoeShape, tiling: Tiling, rank: int) -> Plan:
    """Plan GroupedMatMulAlltoAllv: per expert (x sub-tiles) a GMM, then its AlltoAllv.

    The hardware keeps one AlltoAllv handle per local expert: GMM of expert j, then commit
    its AlltoAllv; the shared-expert matmul runs after the loop. ``serial``: one GMM of all
    experts, the unpermute of its output to rank-major (a pack task), one AlltoAllv, then the
    shared matmul.
    """
    tasks = _Tasks()
    row_bytes = shape.n1 * shape.elem_bytes
    world = shape.world
    if tiling.mode is TilingMode.SERIAL:
        rows = shape.total(shape.send)
        gmm = tasks.add(
            "grouped_matmul[all]", TaskKind.GROUPED_MATMUL, **_gmm_fields(rows, shape, shape.e)
        )
        # its output, expert-major, back to rank-major
        unpermute = tasks.add(
            "unpermute[all]", TaskKind.PACK, deps=(gmm,), bytes=_gather_bytes(rows, row_bytes)
        )
        send = shape.per_peer(shape.send)
        recv = shape.per_peer(shape.recv)
        tasks.add(
            "alltoallv[all]",
            TaskKind.ALLTOALLV,
            row_bytes=row_bytes,
            deps=(unpermute,),
            send_splits=send,
            recv_splits=recv,
            bytes=_sent_bytes(send, rank, row_bytes),
        )
        _shared_task(tasks, shape)
        described = "serial"
    else:
        parts, described = _moe_parts(tiling)
        sends, recvs = shape.expert_parts(shape.send, parts), shape.expert_parts(shape.recv, parts)
        for j in range(shape.e):
            for p in range(parts):
                send, recv = sends[j * parts + p], recvs[j * parts + p]
                gmm = tasks.add(
                    f"grouped_matmul[e{j}.{p}]",
                    TaskKind.GROUPED_MATMUL,
                    expert=j,
                    part=p,
                    **_gmm_fields(_rows(send), shape, 1),
                )
                tasks.add(
                    f"alltoallv[e{j}.{p}]",
                    TaskKind.ALLTOALLV,
                    row_bytes=row_bytes,
                    expert=j,
                    part=p,
                    deps=(gmm,),
                    send_splits=send,
                    recv_splits=recv,
                    bytes=_sent_bytes(send, rank, row_bytes),
                )
        _shared_task(tasks, shape)
    return Plan(
        dtype=shape.dtype,
        op="gmm_alltoallv",
        tiling=described,
        rank=rank,
        world_size=world,
        tasks=tuple(tasks.items),
        meta=(("e", shape.e), ("h1", shape.h1), ("n1", shape.n1)),
    )


def plan_alltoallv_gmm(*, shape: MoeShape, tiling: Tiling, rank: int) -> Plan:
    """Plan AlltoAllvGroupedMatMul: every expert's AlltoAllv first, then each expert's GMM.

    The hardware issues all per-expert AlltoAllv, runs the shared matmul, then for each
    expert waits for its rows and multiplies. Each chunk's rows lie apart in the rank-major
    input (one block per destination and expert), so a pack task first copies them into one
    send buffer (read and write of every row the chunk sends). ``serial``: one AlltoAllv of
    the input as it is, the shared matmul, the permute of the received rows to expert-major
    (a pack task), one GMM.
    """
    tasks = _Tasks()
    row_bytes = shape.h1 * shape.elem_bytes
    world = shape.world
    if tiling.mode is TilingMode.SERIAL:
        send = shape.per_peer(shape.send)
        recv = shape.per_peer(shape.recv)
        a2a = tasks.add(
            "alltoallv[all]",
            TaskKind.ALLTOALLV,
            row_bytes=row_bytes,
            send_splits=send,
            recv_splits=recv,
            bytes=_sent_bytes(send, rank, row_bytes),
        )
        _shared_task(tasks, shape)
        rows = shape.total(shape.recv)
        # the received rows, rank-major, to expert-major
        permute = tasks.add(
            "permute[all]", TaskKind.PACK, deps=(a2a,), bytes=_gather_bytes(rows, row_bytes)
        )
        tasks.add(
            "grouped_matmul[all]",
            TaskKind.GROUPED_MATMUL,
            deps=(permute,),
            **_gmm_fields(rows, shape, shape.e),
        )
        described = "serial"
    else:
        parts, described = _moe_parts(tiling)
        chunks = []
        sends, recvs = shape.expert_parts(shape.send, parts), shape.expert_parts(shape.recv, parts)
        for j in range(shape.e):
            for p in range(parts):
                send, recv = sends[j * parts + p], recvs[j * parts + p]
                pack = tasks.add(
                    f"pack[e{j}.{p}]",
                    TaskKind.PACK,
                    expert=j,
                    part=p,
                    bytes=_gather_bytes(_rows(send), row_bytes),
                )
                a2a = tasks.add(
                    f"alltoallv[e{j}.{p}]",
                    TaskKind.ALLTOALLV,
                    row_bytes=row_bytes,
                    expert=j,
                    part=p,
                    deps=(pack,),
                    send_splits=send,
                    recv_splits=recv,
                    bytes=_sent_bytes(send, rank, row_bytes),
                )
                chunks.append((j, p, a2a, _rows(recv)))
        _shared_task(tasks, shape)
        for j, p, a2a, rows in chunks:
            tasks.add(
                f"grouped_matmul[e{j}.{p}]",
                TaskKind.GROUPED_MATMUL,
                expert=j,
                part=p,
                deps=(a2a,),
                **_gmm_fields(rows, shape, 1),
            )
    return Plan(
        dtype=shape.dtype,
        op="alltoallv_gmm",
        tiling=described,
        rank=rank,
        world_size=world,
        tasks=tuple(tasks.items),
        meta=(("e", shape.e), ("h1", shape.h1), ("n1", shape.n1)),
    )


def _rows(splits: tuple[int, ...] | SparseSplits) -> int:
    return splits.total() if isinstance(splits, SparseSplits) else sum(splits)


def _sent_bytes(send: tuple[int, ...] | SparseSplits, rank: int, row_bytes: int) -> int:
    """Bytes that leave this rank: rows to every peer but itself."""
    if isinstance(send, SparseSplits):
        return send.total(without=rank) * row_bytes
    return sum(c for q, c in enumerate(send) if q != rank) * row_bytes


DENSE_SHIFT_LIMIT = 64
"""Above this many ranks a ring step's splits are kept sparse (one peer each way): a dense
list per step and rank grows as the square of the ranks; the counts are the same."""


def _shift(
    world: int, rank: int, step: int, rows: int
) -> tuple[tuple[int, ...] | SparseSplits, tuple[int, ...] | SparseSplits]:
    """Splits of a ring step: send ``rows`` to rank+step, receive ``rows`` from rank-step."""
    to, frm = (rank + step) % world, (rank - step) % world
    if world > DENSE_SHIFT_LIMIT:
        one = np.array([rows], dtype=np.int64)
        return (
            SparseSplits(world, np.array([to], dtype=np.int64), one),
            SparseSplits(world, np.array([frm], dtype=np.int64), one),
        )
    send = [0] * world
    recv = [0] * world
    send[to] = rows
    recv[frm] = rows
    return tuple(send), tuple(recv)


def _rank_parts(tiling: Tiling) -> tuple[int, str]:
    if tiling.mode is TilingMode.TILES:
        return tiling.count, f"ranks x {tiling.count}"
    return 1, "hardware(per rank)"


def plan_all_gather_matmul(
    *, m: int, shape: MatmulShape, tiling: Tiling, rank: int, world_size: int
) -> Plan:
    """Plan AllGatherMatmul: each rank's chunk of x1 multiplied as soon as it arrives.

    The local chunk is multiplied first, while the others travel in ring order: step s brings
    the chunk of rank - s (each step an AlltoAllv shifting every rank's x1 by s), and its
    matmul overlaps step s + 1. ``serial``: one AllGather, then one matmul.
    """
    tasks = _Tasks()
    row_bytes = shape.k * shape.in_bytes
    if tiling.mode is TilingMode.SERIAL:
        gather = tasks.add("allgather[all]", TaskKind.ALLGATHER, bytes=m * row_bytes)
        rows = m * world_size
        tasks.add(
            "matmul[all]",
            TaskKind.MATMUL,
            deps=(gather,),
            flops=shape.flops(rows),
            bytes=shape.traffic(rows),
        )
        described = "serial"
    else:
        parts, described = _rank_parts(tiling)
        spans = row_tiles(m, tile_lengths(m, parts))
        arrivals: dict[int, list[tuple[int, tuple[int, int]]]] = {}

        def issue(step: int) -> None:
            source = (rank - step) % world_size
            arrivals[step] = []
            for p, (start, stop) in enumerate(spans):
                send, recv = _shift(world_size, rank, step, stop - start)
                task = tasks.add(
                    f"alltoallv[r{source}.{p}]",
                    TaskKind.ALLTOALLV,
                    row_bytes=row_bytes,
                    peer=source,
                    part=p,
                    rows=(start, stop),
                    send_splits=send,
                    recv_splits=recv,
                    bytes=(stop - start) * row_bytes,
                )
                arrivals[step].append((task, (start, stop)))

        def multiply(step: int) -> None:
            chunks = (
                [((c,), span) for c, span in arrivals[step]] if step else [((), s) for s in spans]
            )
            _matmul_chunks(tasks, shape, (rank - step) % world_size, chunks)

        if world_size > 1:
            issue(1)
        multiply(0)  # the local chunk overlaps the first step
        for step in range(2, world_size):
            issue(step)
            multiply(step - 1)
        if world_size > 1:
            multiply(world_size - 1)
    return Plan(
        dtype=shape.dtype,
        op="all_gather_matmul",
        tiling=described,
        rank=rank,
        world_size=world_size,
        tasks=tuple(tasks.items),
        meta=(("m", m), ("k", shape.k), ("n", shape.n)),
    )


def _matmul_chunks(
    tasks: _Tasks,
    shape: MatmulShape,
    peer: int,
    chunks: Sequence[tuple[tuple[int, ...], tuple[int, int]]],
) -> None:
    for p, (deps, (start, stop)) in enumerate(chunks):
        tasks.add(
            f"matmul[r{peer}.{p}]",
            TaskKind.MATMUL,
            peer=peer,
            part=p,
            rows=(start, stop),
            deps=deps,
            flops=shape.flops(stop - start),
            bytes=shape.traffic(stop - start),
        )


def plan_matmul_reduce_scatter(
    *, m: int, shape: MatmulShape, tiling: Tiling, rank: int, world_size: int
) -> Plan:
    """Plan MatmulReduceScatter: the partial product of each destination's rows, sent as made.

    Rank chunks in ring order: step s computes this rank's partial for block rank + s and
    sends it there (an AlltoAllv shifting by s), receiving rank - s's partial of this rank's
    block; the matmul of step s + 1 overlaps that exchange. This rank's own partial comes
    last, then a reduce task sums the received partials. ``serial``: one matmul, then one
    ReduceScatter.
    """
    if m % world_size:
        raise ParamInvalidError("m", m, f"must be a multiple of world_size ({world_size})")
    tasks = _Tasks()
    block = m // world_size
    row_bytes = shape.n * shape.out_bytes
    if tiling.mode is TilingMode.SERIAL:
        mm = tasks.add("matmul[all]", TaskKind.MATMUL, flops=shape.flops(m), bytes=shape.traffic(m))
        tasks.add("reduce_scatter[all]", TaskKind.REDUCE_SCATTER, deps=(mm,), bytes=m * row_bytes)
        described = "serial"
    else:
        parts, described = _rank_parts(tiling)
        pieces = tile_lengths(block, parts)
        exchanges = []
        for step in [*range(1, world_size), 0]:
            dest = (rank + step) % world_size
            for p, (start, stop) in enumerate(row_tiles(block, pieces)):
                rows = (dest * block + start, dest * block + stop)
                mm = tasks.add(
                    f"matmul[r{dest}.{p}]",
                    TaskKind.MATMUL,
                    peer=dest,
                    part=p,
                    rows=rows,
                    flops=shape.flops(stop - start),
                    bytes=shape.traffic(stop - start),
                )
                if step:
                    send, recv = _shift(world_size, rank, step, stop - start)
                    exchanges.append(
                        tasks.add(
                            f"alltoallv[r{dest}.{p}]",
                            TaskKind.ALLTOALLV,
                            row_bytes=row_bytes,
                            peer=dest,
                            part=p,
                            rows=(start, stop),
                            deps=(mm,),
                            send_splits=send,
                            recv_splits=recv,
                            bytes=(stop - start) * row_bytes,
                        )
                    )
                else:
                    exchanges.append(mm)
        tasks.add(
            "reduce[own]",
            TaskKind.REDUCE,
            deps=tuple(exchanges),
            flops=world_size * block * shape.n,
            bytes=(world_size + 1) * block * row_bytes,
        )
    return Plan(
        dtype=shape.dtype,
        op="matmul_reduce_scatter",
        tiling=described,
        rank=rank,
        world_size=world_size,
        tasks=tuple(tasks.items),
        meta=(("m", m), ("k", shape.k), ("n", shape.n)),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class IfaShape:
    """One rank's incremental flash attention (decode): its heads of every batch's token."""

    heads: int
    """Query heads on this rank (numHeads)."""

    kv_heads: int
    """Key/value heads on this rank (numKeyValueHeads); divides ``heads``."""

    head_dim: int
    """D."""

    kv_len: int
    """KV positions each batch attends (its actual sequence length)."""

    elem_bytes: int
    """Bytes per query, key, value and output element."""

    dtype: str
    """The compute dtype, e.g. ``"bfloat16"``."""

    def flops(self, batches: int) -> int:
        """``q.k`` and ``p.v``: two multiply-adds per head, position and D element."""
        return 4 * batches * self.heads * self.kv_len * self.head_dim

    def traffic(self, batches: int) -> int:
        """Bytes moved: the batches' keys and values, their queries and outputs."""
        cache = 2 * batches * self.kv_len * self.kv_heads * self.head_dim
        return (cache + 2 * batches * self.heads * self.head_dim) * self.elem_bytes


def plan_ifa(*, batch: int, shape: IfaShape, tiling: Tiling, rank: int, world_size: int) -> Plan:
    """Plan incremental flash attention on one rank: batch tiles, compute only.

    Every rank attends its own heads; nothing is communicated. ``serial`` and ``hardware``
    are one task (the kernel spreads batches and KV heads over its cores within one launch);
    N tiles are N launches of equal batch ranges, the cut a fused attention-then-projection
    kernel would pipeline.

    Args:
        batch: B, the decode batch.
        shape: this rank's heads and the cache length.
        tiling: hardware, serial or N tiles.
        rank: this rank.
        world_size: ranks in the group.

    Returns:
        The plan; task ``rows`` give each tile's batches.
    """
    if tiling.mode is TilingMode.TILES:
        lengths = tile_lengths(batch, tiling.count)
        described = tiling.describe()
    else:
        lengths = [batch]
        described = "serial" if tiling.mode is TilingMode.SERIAL else "hardware(tiles=1)"
    tasks = _Tasks()
    for i, (start, stop) in enumerate(row_tiles(batch, lengths)):
        tasks.add(
            f"attention[{i}]",
            TaskKind.ATTENTION,
            rows=(start, stop),
            part=i,
            flops=shape.flops(stop - start),
            bytes=shape.traffic(stop - start),
        )
    return Plan(
        dtype=shape.dtype,
        op="ifa",
        tiling=described,
        rank=rank,
        world_size=world_size,
        tasks=tuple(tasks.items),
        meta=(("batch", batch), ("heads", shape.heads), ("kv_len", shape.kv_len)),
    )


def _level_sums(values: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(len(dims), W): per dimension d, the sum of ``values`` over each rank's peers there.

    A rank's peers over dimension d are the ranks of its block of ``dims[0] * ... * dims[d]``
    consecutive ranks outside its block of the dimensions inside d (itself left out).
    """
    out = np.empty((len(dims), values.size))
    inner, size = values.astype(np.float64), 1
    for d, ranks in enumerate(dims):
        size *= ranks
        block = np.repeat(values.reshape(-1, size).sum(axis=1), size)
        out[d] = block - inner
        inner = block
    return out


def _level_max(values: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(len(dims), W): per dimension d, the largest of ``values`` over each rank's peers there."""
    out = np.zeros((len(dims), values.size))
    size = 1
    for d, ranks in enumerate(dims):
        if ranks > 1:  # each inner block's largest; the largest of the others in its block
            sub = values.reshape(-1, ranks, size).max(axis=2)  # (outer blocks, ranks)
            order = np.sort(sub, axis=1)
            top, second = order[:, -1:], order[:, -2:-1]
            others = np.where(sub == top, second, top)  # ties: the top is another's too
            others = np.where((sub == top).sum(axis=1, keepdims=True) > 1, top, others)
            out[d] = np.repeat(others.ravel(), size)
        size *= ranks
    return out


def _peers_per_level(dims: Sequence[int]) -> np.ndarray:
    """(len(dims), 1): how many peers every rank has over each dimension."""
    inside = np.cumprod([1, *dims])
    return (inside[1:] - inside[:-1]).astype(np.float64)[:, None]


def _normal(rng: np.random.Generator, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """A draw of each ``Normal(mean, var)``, at least 0."""
    out: np.ndarray = np.maximum(mean + np.sqrt(var) * rng.standard_normal(mean.shape), 0.0)
    return out


def _owner_side(
    rows: np.ndarray, nonzero: np.ndarray, dims: Sequence[int], row_bytes: int,
    rng: np.random.Generator,
) -> SideLoads:  # fmt: skip
    """The expert owners' side: rank q's ``rows[q]`` (over all ranks) from every rank alike.

    Each peer's share is ``rows[q] / W``; how many peers have any is drawn (binomial).
    """
    peers = _peers_per_level(dims)
    each = rows / math.prod(dims)  # a peer's share of the rows over all ranks
    count = rng.binomial(np.broadcast_to(peers, (len(dims), rows.size)).astype(np.int64), nonzero)
    # the rows of a peer that has any
    given = np.divide(each, nonzero, out=np.zeros_like(each), where=nonzero > 0)
    return SideLoads(
        total=peers * each * row_bytes,
        largest=np.where(count > 0, given * row_bytes, 0.0),
        peers=count.astype(np.float64),
    )


def _token_side(
    rows: np.ndarray, var: np.ndarray, nonzero: np.ndarray, dims: Sequence[int],
    row_bytes: int, rng: np.random.Generator,
) -> SideLoads:  # fmt: skip
    """The token owners' side: rows from (or to) every expert owner q, independent of each other.

    A rank's sum over its peers on a dimension, and how many of them it talks to, are drawn
    from their normal approximations (the peers' means and variances summed).
    """
    given = np.divide(rows, nonzero, out=np.zeros_like(rows), where=nonzero > 0)
    count = _normal(rng, _level_sums(nonzero, dims), _level_sums(nonzero * (1 - nonzero), dims))
    count = np.minimum(np.rint(count), _peers_per_level(dims))
    return SideLoads(
        total=_normal(rng, _level_sums(rows, dims), _level_sums(var, dims)) * row_bytes,
        largest=np.where(count > 0, _level_max(given, dims) * row_bytes, 0.0),
        peers=count,
    )


def moe_arrays(
    *,
    op: str,
    expected: ExpectedRouting,
    shape: MoeShape,
    tiling: Tiling,
    dims: Sequence[int],
) -> PlanArrays:
    """Every rank's MoE plan at once from the routing's law (thousands of ranks).

    The tasks are :func:`plan_gmm_alltoallv`'s (``op`` ``gmm_alltoallv``) or
    :func:`plan_alltoallv_gmm`'s, built once. Each rank's figures come from the law of its
    count for each expert (:class:`mc2sim.routing.ExpectedRouting`), cut in sub-tiles as the
    plans cut counts, with the same FLOPs and bytes of each task: an expert owner's rows over
    all ranks are drawn from their normal approximation, each peer's share alike, how many
    peers have any binomial; a token owner's rows to (or from) the owners of one expert
    index and how many of them it talks to, summed per network dimension (``dims``: ranks
    per dimension, innermost first, the node innermost), from theirs. The draws are seeded
    by the routing's seed, per tiling and task.

    Args:
        op: ``gmm_alltoallv`` (combine: expert owners send) or ``alltoallv_gmm`` (dispatch).
        expected: the routing in expectation.
        shape: the call's shapes (its counts unused).
        tiling: the tiling.
        dims: the topology's dimensions.

    Returns:
        The plans as arrays.
    """
    world, e = expected.world_size, expected.experts_per_rank
    combine = op == "gmm_alltoallv"
    empty = SparseCounts(size=world * e, index=np.zeros(0, np.int64), values=np.zeros(0, np.int64))
    blank = MoeShape(
        e=e, send=empty, recv=empty, h1=shape.h1, n1=shape.n1, elem_bytes=shape.elem_bytes,
        shared=shape.shared, dtype=shape.dtype,
    )  # fmt: skip
    builder = plan_gmm_alltoallv if combine else plan_alltoallv_gmm
    template = builder(shape=blank, tiling=tiling, rank=0)
    row_bytes = (shape.n1 if combine else shape.h1) * shape.elem_bytes
    parts = 1 if tiling.mode is TilingMode.SERIAL else _moe_parts(tiling)[0]
    means, variances, nonzeros = (a.reshape(-1, world, e) for a in expected.parts(parts))
    ones, ones_var, _ = (a.reshape(world, e) for a in expected.parts(1))
    # a serial chunk's per peer: all of rank q's experts at once
    whole, whole_var, any_rows = ones.sum(axis=1), ones_var.sum(axis=1), 1.0 - expected.none_of()
    tasks = template.tasks
    flops = np.zeros((len(tasks), world))
    nbytes = np.zeros((len(tasks), world))
    intra = np.zeros((len(tasks), world))
    loads: dict[int, AlltoAllvLoads] = {}
    owned: dict[tuple[int | None, int], np.ndarray] = {}  # an expert sub-tile's drawn rows

    def rows_of(task: Task) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance, nonzero) of one rank's rows to each expert owner, and theirs.

        The owners' rows over all ranks are drawn once per sub-tile, shared by its tasks.
        """
        if task.expert is None:
            mean, var, nonzero = whole, whole_var, any_rows
        else:
            j, p = task.expert, task.part
            mean, var, nonzero = means[p, :, j], variances[p, :, j], nonzeros[p, :, j]
        key = (task.expert, task.part)
        if key not in owned:
            draw = expected.rng(1, parts, 0 if task.expert is None else task.expert + 1, task.part)
            owned[key] = _normal(draw, world * mean, world * var)
        return mean, var, nonzero, owned[key]

    for task in tasks:
        if task.kind is TaskKind.MATMUL:  # the shared expert: the same on every rank
            flops[task.id], nbytes[task.id] = task.flops, task.bytes
            continue
        mean, var, nonzero, total = rows_of(task)
        if task.kind is TaskKind.GROUPED_MATMUL:  # an expert owner's rows from every rank
            experts = e if task.expert is None else 1
            fields = _gmm_fields(total, shape, experts)  # type: ignore[arg-type]
            flops[task.id], nbytes[task.id] = fields["flops"], fields["bytes"]
        elif task.kind is TaskKind.PACK and task.expert is None:  # a serial plan's (un)permute
            nbytes[task.id] = _gather_bytes(total, row_bytes)  # type: ignore[arg-type]
        elif task.kind is TaskKind.PACK:  # a token owner's rows to every expert owner
            nbytes[task.id] = _gather_bytes(mean.sum(), row_bytes)
        elif task.kind is TaskKind.ALLTOALLV:
            draw = expected.rng(2, parts, task.id)
            owners = _owner_side(total, nonzero, dims, row_bytes, draw)
            tokens = _token_side(mean, var, nonzero, dims, row_bytes, draw)
            send, recv = (owners, tokens) if combine else (tokens, owners)
            loads[task.id] = AlltoAllvLoads(send=send, recv=recv)
            nbytes[task.id] = send.total.sum(axis=0)
            intra[task.id] = send.total[0]
        else:
            raise ParamInvalidError("op", op, f"has a {task.kind} task the arrays cannot cost")
    return PlanArrays(
        template=template, world_size=world, flops=flops, bytes=nbytes, loads=loads,
        intra=intra, inter=nbytes - intra,
    )  # fmt: skip
