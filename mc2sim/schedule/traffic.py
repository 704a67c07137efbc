"""A comm task's bytes split by level: sent to ranks of the same node, or to other nodes.

A :class:`Placement` gives every rank its node: the host a real rank runs on, or
``Topology.node_of`` in the simulator. From it and a task of a plan, :func:`level_bytes`
says how many of the bytes the rank sends stay inside its node and how many cross to other
nodes, counted as the plans count bytes (a 16-bit element is two bytes, even where a CPU
MPI reduces it in float32):

* AlltoAllv: exactly, from the task's send splits.
* AllReduce, ReduceScatter, AllGather: as the hierarchical algorithm of the cost model moves
  them (:mod:`mc2sim.model.cost`): a reduce-scatter inside the node, then across nodes on
  ``1 / ranks_per_node`` of the data, and an all-gather back; an AllGather gathers across
  nodes first. With ``p`` ranks per node and ``q`` nodes, an AllReduce of ``n`` bytes sends
  ``2 (p - 1) / p * n`` inside the node and ``2 (q - 1) / q * n / p`` across, which is also
  what MPICH's reduce-scatter + all-gather (Rabenseifner) algorithm sends when ranks are
  placed by node. Recursive doubling, which the model picks for small messages, sends more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mc2sim.schedule.plan import Resource, SparseSplits, Task, TaskKind

__all__ = ["AlltoAllvPairs", "Placement", "alltoallv_pairs", "level_bytes", "sent_by_level"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Which node each rank of a group is on."""

    nodes: np.ndarray
    """``nodes[r]``: rank ``r``'s node index (int64, nodes numbered from 0)."""
    sizes: np.ndarray
    """``sizes[i]``: how many ranks node ``i`` holds."""

    @classmethod
    def of(cls, nodes: Sequence[int] | np.ndarray) -> Placement:
        """The placement giving rank ``r`` node ``nodes[r]`` (indices from 0)."""
        array = np.asarray(nodes, dtype=np.int64)
        return cls(nodes=array, sizes=np.bincount(array))

    @classmethod
    def of_hosts(cls, hosts: Sequence[str]) -> Placement:
        """The placement of ranks on the given host names, nodes numbered by first rank."""
        index: dict[str, int] = {}
        return cls.of([index.setdefault(h, len(index)) for h in hosts])

    @property
    def node_count(self) -> int:
        """How many nodes hold ranks."""
        return int(np.count_nonzero(self.sizes))


def level_bytes(task: Task, rank: int, where: Placement) -> tuple[int, int]:
    """Bytes ``rank`` sends in ``task`` within its node and across nodes.

    Args:
        task: a task of ``rank``'s plan (a compute task sends nothing).
        rank: the rank running it.
        where: every rank's node.

    Returns:
        ``(intra, inter)`` bytes, as the plans count bytes.
    """
    if task.resource is not Resource.COMM:
        return 0, 0
    mine = int(where.nodes[rank])
    if task.kind is TaskKind.ALLTOALLV:
        return _alltoallv(task, rank, where.nodes)
    per_node = int(where.sizes[mine])  # p: ranks on this rank's node
    count = where.node_count  # q: nodes
    n = task.bytes
    if task.kind is TaskKind.ALLGATHER:  # n is this rank's share: across nodes first
        return n * count * (per_node - 1), n * (count - 1)
    phases = 2 if task.kind is TaskKind.ALLREDUCE else 1  # reduce-scatter (+ all-gather)
    intra = phases * n * (per_node - 1) // per_node
    inter = phases * n * (count - 1) // (count * per_node)
    return intra, inter


def _alltoallv(task: Task, rank: int, nodes: np.ndarray) -> tuple[int, int]:
    """An AlltoAllv's sent bytes to peers on this rank's node and on others."""
    pairs = alltoallv_pairs([task], ranks=[rank], side="send_splits")
    intra, inter = sent_by_level(pairs, nodes, [task.row_bytes])
    return int(intra[0]), int(inter[0])


@dataclass(frozen=True, slots=True)
class AlltoAllvPairs:
    """One side (send or receive) of several ranks' AlltoAllv chunks, as pairs of ranks.

    Pair ``i`` moves ``counts[i]`` rows between ``ranks[i]`` and ``peers[i]``; the pairs are
    grouped by position in the chunks given (``sizes[j]`` pairs of chunk ``j``), in peer
    order within each; no pair has a zero count or a rank with itself.
    """

    ranks: np.ndarray
    """The rank of each pair's chunk (int32 below 2**31 ranks, else int64)."""
    peers: np.ndarray
    """The peer of each pair (as ``ranks``)."""
    counts: np.ndarray
    """Rows each pair moves (int64, > 0)."""
    sizes: np.ndarray
    """How many pairs each chunk has (int64), in the order of the chunks given."""

    def bytes(self, row_bytes: Sequence[int]) -> np.ndarray:
        """Bytes of each pair, chunk ``j``'s rows being ``row_bytes[j]`` bytes each (int64)."""
        return self.counts * np.repeat(np.asarray(row_bytes, dtype=np.int64), self.sizes)


def alltoallv_pairs(
    tasks: Sequence[Task], ranks: Sequence[int], side: str = "send_splits"
) -> AlltoAllvPairs:
    """The pairs of one side of AlltoAllv chunks: ``tasks[j]`` run by ``ranks[j]``.

    Args:
        tasks: AlltoAllv comm tasks (sparse or dense splits).
        ranks: the rank running each.
        side: ``"send_splits"`` or ``"recv_splits"``.

    Returns:
        Every chunk's non-zero counts to or from ranks other than its own.
    """
    peers, counts = [], []
    for task in tasks:
        splits = getattr(task, side)
        if isinstance(splits, SparseSplits):
            peers.append(splits.peers)
            counts.append(splits.counts)
        else:
            dense = np.asarray(splits, dtype=np.int64)
            at = np.flatnonzero(dense)
            peers.append(at)
            counts.append(dense[at])
    sizes = np.fromiter((len(p) for p in peers), dtype=np.int64, count=len(peers))
    world = max((len(getattr(task, side)) for task in tasks), default=0)
    narrow = np.int32 if world < 1 << 31 else np.int64  # half the memory traffic of int64
    owners = np.repeat(np.asarray(ranks, dtype=narrow), sizes)
    every_peer = (
        np.concatenate(peers, dtype=narrow, casting="same_kind")
        if peers
        else np.zeros(0, dtype=narrow)
    )
    every_count = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    keep = every_peer != owners
    if keep.all():
        return AlltoAllvPairs(ranks=owners, peers=every_peer, counts=every_count, sizes=sizes)
    chunk = np.repeat(np.arange(len(peers)), sizes)[keep]
    return AlltoAllvPairs(
        ranks=owners[keep],
        peers=every_peer[keep],
        counts=every_count[keep],
        sizes=np.bincount(chunk, minlength=len(peers)).astype(np.int64),
    )


def sent_by_level(
    pairs: AlltoAllvPairs, nodes: np.ndarray, row_bytes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk's sent bytes to peers on its rank's node and on others.

    Args:
        pairs: the send side of the chunks (:func:`alltoallv_pairs`).
        nodes: every rank's node.
        row_bytes: each chunk's bytes per row.

    Returns:
        ``(intra, inter)``: int64 bytes per chunk, in the order of the chunks.
    """
    local = nodes[pairs.peers] == nodes[pairs.ranks]
    ends = np.cumsum(pairs.sizes)
    rows = np.asarray(row_bytes, dtype=np.int64)
    out = []
    for counts in (np.where(local, pairs.counts, 0), np.where(local, 0, pairs.counts)):
        total = np.concatenate(([0], np.cumsum(counts)))
        out.append((total[ends] - total[ends - pairs.sizes]) * rows)
    return out[0], out[1]
