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

__all__ = ["Placement", "level_bytes"]


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
        return _alltoallv(task, rank, where.nodes, mine)
    per_node = int(where.sizes[mine])  # p: ranks on this rank's node
    count = where.node_count  # q: nodes
    n = task.bytes
    if task.kind is TaskKind.ALLGATHER:  # n is this rank's share: across nodes first
        return n * count * (per_node - 1), n * (count - 1)
    phases = 2 if task.kind is TaskKind.ALLREDUCE else 1  # reduce-scatter (+ all-gather)
    intra = phases * n * (per_node - 1) // per_node
    inter = phases * n * (count - 1) // (count * per_node)
    return intra, inter


def _alltoallv(task: Task, rank: int, nodes: np.ndarray, mine: int) -> tuple[int, int]:
    """An AlltoAllv's sent bytes to peers on this rank's node and on others."""
    send = task.send_splits
    if isinstance(send, SparseSplits):
        peers, counts = send.peers, send.counts
    else:
        dense = np.asarray(send, dtype=np.int64)
        peers = np.flatnonzero(dense)
        counts = dense[peers]
    keep = peers != rank
    peers, counts = peers[keep], counts[keep]
    local = nodes[peers] == mine
    intra = int(counts[local].sum()) * task.row_bytes
    inter = int(counts[~local].sum()) * task.row_bytes
    return intra, inter
