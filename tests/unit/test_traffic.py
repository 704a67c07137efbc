"""Bytes by level: what a rank sends inside its node and across nodes, measured and simulated.

Oracles: hand counts of small AlltoAllv splits; the textbook traffic of the ring algorithms
at the two extremes of a placement (all ranks on one node: a ring AllReduce sends
``2 (p - 1) / p * n``; one rank per node: the same across nodes); conservation (an
AlltoAllv's levels add up to the bytes it sends); and the cost model's own by-hand figures
for the float32 wire of a CPU MPI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from mc2sim.model import allreduce_time, reduce_scatter_time, simulate
from mc2sim.schedule import Task, TaskKind, plan_gmm_alltoallv, plan_mm_all_reduce, tiling_of
from mc2sim.schedule.builders import MatmulShape, MoeShape
from mc2sim.schedule.plan import SparseSplits
from mc2sim.schedule.traffic import Placement, alltoallv_pairs, level_bytes, sent_by_level
from mc2sim.timeline import Stream
from mc2sim.topology import (
    Contention,
    Device,
    Efficiency,
    LinkKind,
    NetworkDim,
    Topology,
    builtin,
)

TWO_BY_TWO = Placement.of([0, 0, 1, 1])


def comm_task(kind: TaskKind, nbytes: int = 0, **fields: Any) -> Task:
    return Task(id=0, name=str(kind), kind=kind, bytes=nbytes, **fields)


def test_placement_numbers_hosts_by_their_first_rank() -> None:
    where = Placement.of_hosts(["b", "b", "a", "a", "c"])
    assert where.nodes.tolist() == [0, 0, 1, 1, 2]
    assert where.sizes.tolist() == [2, 2, 1]
    assert where.node_count == 3


def test_alltoallv_levels_by_hand() -> None:
    # rank 0 of 2 x 2 sends 5 rows to itself, 3 to rank 1 (its node), 2 and 7 to the other
    send = (5, 3, 2, 7)
    dense = comm_task(TaskKind.ALLTOALLV, send_splits=send, row_bytes=4)
    assert level_bytes(dense, 0, TWO_BY_TWO) == (3 * 4, (2 + 7) * 4)
    sparse = dataclasses.replace(
        dense, send_splits=SparseSplits(4, np.array([0, 1, 2, 3]), np.array(send))
    )
    assert level_bytes(sparse, 0, TWO_BY_TWO) == (12, 36)
    # rank 3 sends the same splits: 2 rows to rank 2 stay on its node, rank 3's own 7 never leave
    assert level_bytes(dense, 3, TWO_BY_TWO) == (2 * 4, (5 + 3) * 4)


@pytest.mark.parametrize(
    ("kind", "one_node", "one_per_node"),
    [
        # p = 4 ranks on a ring: the textbook 2 (p - 1) / p * n and (p - 1) / p * n
        (TaskKind.ALLREDUCE, 2 * 3 * 400 // 4, 2 * 3 * 400 // 4),
        (TaskKind.REDUCE_SCATTER, 3 * 400 // 4, 3 * 400 // 4),
        # an AllGather of 400 bytes per rank: (p - 1) * 400
        (TaskKind.ALLGATHER, 3 * 400, 3 * 400),
    ],
)
def test_phased_collectives_reduce_to_the_ring_at_both_extremes(
    kind: TaskKind, one_node: int, one_per_node: int
) -> None:
    task = comm_task(kind, 400)
    for rank in range(4):
        assert level_bytes(task, rank, Placement.of([0, 0, 0, 0])) == (one_node, 0)
        assert level_bytes(task, rank, Placement.of([0, 1, 2, 3])) == (0, one_per_node)


def test_phased_collectives_on_two_by_two_by_hand() -> None:
    # AllReduce of 400 B: reduce-scatter in the node sends 200, across nodes 100 of the 200
    # left, and the all-gather sends them again
    assert level_bytes(comm_task(TaskKind.ALLREDUCE, 400), 1, TWO_BY_TWO) == (400, 200)
    assert level_bytes(comm_task(TaskKind.REDUCE_SCATTER, 400), 2, TWO_BY_TWO) == (200, 100)
    # AllGather of 100 B per rank: 100 to the other node, then 2 x 100 to the node peer
    assert level_bytes(comm_task(TaskKind.ALLGATHER, 100), 0, TWO_BY_TWO) == (200, 100)


def test_compute_tasks_send_nothing() -> None:
    task = Task(id=0, name="mm", kind=TaskKind.MATMUL, flops=10, bytes=99)
    assert level_bytes(task, 0, TWO_BY_TWO) == (0, 0)


def test_topology_knows_its_ranks_per_node() -> None:
    topo = builtin("atlas_a2_multinode")
    assert topo.ranks_per_node == 8
    assert [topo.node_of(r) for r in (0, 7, 8, 31)] == [0, 0, 1, 3]
    one_node = builtin("atlas_a2_8p")
    assert one_node.ranks_per_node == one_node.world_size == 8


DEVICE = Device(
    name="hand",
    matrix_tflops={"float16": 1.0},
    vector_tflops=1.0,
    memory_gbps=1.0,
    launch_us=0.0,
    efficiency=Efficiency(small_util=1.0, large_util=1.0, half_flops=0.0),
)


def two_by_two(*, wide: bool = False) -> Topology:
    """2 ranks per node on a mesh (10 GB/s), 2 nodes on a switch (1 GB/s), no latency."""
    return Topology(
        name="two_by_two",
        description="hand-built",
        device=dataclasses.replace(DEVICE, reductions_in_float32=wide),
        network=(
            NetworkDim(kind=LinkKind.FULL_MESH, ranks=2, bandwidth_gbps=10.0, latency_us=0.0),
            NetworkDim(kind=LinkKind.SWITCH, ranks=2, bandwidth_gbps=1.0, latency_us=0.0),
        ),
        contention=Contention(),
        source="tests",
    )


def test_float32_reductions_move_twice_the_bytes_of_the_plan() -> None:
    narrow, wide = two_by_two(), two_by_two(wide=True)
    # reduce-scatter + all-gather: a 4 MB chunk over the mesh each way, then a 2 MB chunk
    # of the 4 MB left across the switch each way
    assert allreduce_time(narrow, 8e6) == pytest.approx(2 * 4e6 / 10e9 + 2 * 2e6 / 1e9)
    assert allreduce_time(wide, 8e6) == pytest.approx(2 * allreduce_time(narrow, 8e6))
    assert reduce_scatter_time(wide, 8e6) == pytest.approx(2 * reduce_scatter_time(narrow, 8e6))


def test_simulated_records_split_their_bytes_by_node() -> None:
    shape = MatmulShape(k=64, n=256, in_bytes=2, w_bytes=2, out_bytes=2)
    plans = {
        r: plan_mm_all_reduce(
            m=64, shape=shape, kind=TaskKind.MATMUL, tiling=tiling_of(2), rank=r, world_size=4
        )
        for r in range(4)
    }
    comm = [r for r in simulate(plans, two_by_two()).records if r.stream is Stream.COMM]
    assert len(comm) == 8
    for record in comm:  # each chunk AllReduces 32 rows x 256 x 2 B = 16 KiB
        assert record.bytes == 16384
        assert (record.intra_bytes, record.inter_bytes) == (16384, 8192)
    alone = simulate(plans, builtin("atlas_a2_8p")).records  # one node: nothing crosses
    # one node of 4: the ring's 2 x 3/4 of each chunk, nothing across
    assert {(r.intra_bytes, r.inter_bytes) for r in alone if r.stream is Stream.COMM} == {
        (24576, 0)
    }


def test_simulated_alltoallv_levels_add_up_to_the_bytes_sent() -> None:
    counts = np.array([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3]])
    plans = {}
    for r in range(4):
        send, recv = tuple(int(c) for c in counts[r]), tuple(int(c) for c in counts[:, r])
        shape = MoeShape(e=1, h1=8, n1=4, send=send, recv=recv, elem_bytes=2)
        plans[r] = plan_gmm_alltoallv(shape=shape, tiling=tiling_of("serial"), rank=r)
    records = [r for r in simulate(plans, two_by_two()).records if r.stream is Stream.COMM]
    row = 4 * 2  # N1 columns of 2 bytes
    for record in records:
        assert record.intra_bytes + record.inter_bytes == record.bytes
        r = record.rank
        peer = r ^ 1  # the other rank of its node
        assert record.intra_bytes == counts[r, peer] * row


def test_gathered_pairs_and_levels_match_a_loop_over_dense_splits() -> None:
    """Oracle: a plain loop over every rank's dense splits, pair by pair."""
    rng = np.random.default_rng(7)
    world, nodes = 6, Placement.of([0, 0, 0, 1, 1, 2])
    tasks, dense, rows = [], [], []
    for rank in range(world):
        send = rng.integers(0, 3, world) * (rng.random(world) < 0.6)
        send[rank] = rng.integers(1, 3)  # a rank's own rows: never a pair
        recv = rng.integers(0, 3, world)
        row_bytes = int(rng.integers(1, 9)) * 2
        splits: dict[str, Any] = {
            "send_splits": tuple(int(c) for c in send),
            "recv_splits": tuple(int(c) for c in recv),
        }
        if rank % 2:  # sparse and dense splits mixed
            splits = {
                k: SparseSplits(world, np.arange(world), np.array(v)) for k, v in splits.items()
            }
        tasks.append(comm_task(TaskKind.ALLTOALLV, row_bytes=row_bytes, **splits))
        dense.append(send)
        rows.append(row_bytes)
    pairs = alltoallv_pairs(tasks, range(world), "send_splits")
    expected = [(r, q, int(dense[r][q])) for r in range(world) for q in range(world)]
    expected = [(r, q, c) for r, q, c in expected if q != r and c > 0]
    got = list(zip(pairs.ranks.tolist(), pairs.peers.tolist(), pairs.counts.tolist(), strict=True))
    assert got == expected
    assert pairs.sizes.tolist() == [sum(1 for e in expected if e[0] == r) for r in range(world)]
    assert pairs.bytes(rows).tolist() == [c * rows[r] for r, _, c in expected]
    intra, inter = sent_by_level(pairs, nodes.nodes, rows)
    for r in range(world):
        same = sum(c for s, q, c in expected if s == r and nodes.nodes[q] == nodes.nodes[r])
        other = sum(c for s, q, c in expected if s == r and nodes.nodes[q] != nodes.nodes[r])
        assert (int(intra[r]), int(inter[r])) == (same * rows[r], other * rows[r])
