"""The cost model and the simulator: hand-computed task times, sanity laws, engine invariants.

Oracles are hand arithmetic on small topologies built in the test (one or two network
dimensions whose alpha-beta figures make the expected seconds easy to write down), and laws
that must hold whatever the numbers: a one-tile plan takes its compute plus its comm, more
bandwidth never slows anything down, tiling never changes the work, and the engine runs
every task once, in order, without overlapping a resource.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from mc2sim.errors import ParamInvalidError
from mc2sim.model import (
    allgather_time,
    allreduce_time,
    alltoallv_time,
    compute_time,
    reduce_scatter_time,
    simulate,
)
from mc2sim.model.cost import rank_alltoallv_time, separating_dims
from mc2sim.routing import (
    Direction,
    RoutingConfig,
    RoutingKind,
    SparseRouting,
    route,
)
from mc2sim.schedule import (
    Plan,
    Resource,
    Task,
    TaskKind,
    plan_all_gather_matmul,
    plan_alltoallv_gmm,
    plan_gmm_alltoallv,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
    tiling_of,
)
from mc2sim.schedule.builders import MatmulShape, MoeShape
from mc2sim.schedule.plan import SparseCounts, SparseSplits
from mc2sim.schedule.tiling import even_split
from mc2sim.timeline import RunKey, Source, Stream, Timeline
from mc2sim.topology import (
    Contention,
    Device,
    Efficiency,
    LinkKind,
    NetworkDim,
    Topology,
    builtin,
)

# ---------------------------------------------------------------- small hand-built machines

FLAT = Efficiency(small_util=1.0, large_util=1.0, half_flops=0.0)
DEVICE = Device(
    name="toy",
    matrix_tflops={"float16": 100.0, "int8": 400.0},
    vector_tflops=10.0,
    memory_gbps=1000.0,
    efficiency=FLAT,
    launch_us=1.0,
    reduce_gbps=5000.0,
)
"""100 TFLOP/s fp16 (bf16 by the half-precision fallback), 400 TOP/s int8, 10 TFLOP/s vector,
1000 GB/s memory, 1 us launch, collectives reducing at 5000 GB/s, full utilisation at every
size."""


def dim(kind: str, ranks: int, gbps: float, us: float) -> NetworkDim:
    return NetworkDim(kind=LinkKind(kind), ranks=ranks, bandwidth_gbps=gbps, latency_us=us)


def machine(
    *dims: NetworkDim,
    device: Device = DEVICE,
    compute_slowdown: float = 1.0,
    comm_slowdown: float = 1.0,
    concurrent: bool = False,
) -> Topology:
    return Topology(
        name="hand",
        description="hand-built for the tests",
        device=replace(device, concurrent_collectives=concurrent),
        network=dims,
        contention=Contention(compute_slowdown=compute_slowdown, comm_slowdown=comm_slowdown),
        source="tests",
    )


def task(kind: TaskKind, flops: int = 0, nbytes: int = 0) -> Task:
    return Task(id=0, name=str(kind), kind=kind, flops=flops, bytes=nbytes)


def two_level() -> Topology:
    """8 ranks: 4 on a full mesh (100 GB/s, 1 us), times 2 over a switch (10 GB/s, 10 us)."""
    return machine(dim("full_mesh", 4, 100.0, 1.0), dim("switch", 2, 10.0, 10.0))


# ---------------------------------------------------------------- plans of every op

OPS = ("mm_all_reduce", "all_gather_matmul", "matmul_reduce_scatter")
MOE_OPS = ("gmm_alltoallv", "alltoallv_gmm")
SHAPE = MatmulShape(k=256, n=128, in_bytes=2, w_bytes=2, out_bytes=2)


def dense_plans(op: str, tiling: str | int | None, world: int, m: int = 64) -> dict[int, Plan]:
    """Every rank's plan of a dense op (MatmulReduceScatter needs ``m`` divisible by world)."""
    spec = tiling_of(tiling)
    out: dict[int, Plan] = {}
    for r in range(world):
        if op == "mm_all_reduce":
            out[r] = plan_mm_all_reduce(
                m=m, shape=SHAPE, kind=TaskKind.MATMUL, tiling=spec, rank=r, world_size=world
            )
        elif op == "all_gather_matmul":
            out[r] = plan_all_gather_matmul(m=m, shape=SHAPE, tiling=spec, rank=r, world_size=world)
        else:
            out[r] = plan_matmul_reduce_scatter(
                m=m, shape=SHAPE, tiling=spec, rank=r, world_size=world
            )
    return out


def sparse_routing(world: int, e: int, *, seed: int = 0, skew: float = 1.2) -> SparseRouting:
    return route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=seed, skew=skew),
        world_size=world,
        experts_per_rank=e,
        tokens_per_rank=24,
        top_k=3,
        sparse=True,
    )


def moe_plans(
    op: str,
    tiling: str | int | None,
    routing: SparseRouting,
    *,
    dense: bool = False,
    shared: tuple[int, int, int] | None = (24, 64, 32),
) -> dict[int, Plan]:
    """Every rank's MoE plan from a sparse routing, its counts sparse or made dense."""
    spec = tiling_of(tiling)
    direction = Direction.COMBINE if op == "gmm_alltoallv" else Direction.DISPATCH
    builder = plan_gmm_alltoallv if op == "gmm_alltoallv" else plan_alltoallv_gmm
    out: dict[int, Plan] = {}
    for r in range(routing.world_size):
        send: tuple[int, ...] | SparseCounts = routing.send_counts(r, direction)
        recv: tuple[int, ...] | SparseCounts = routing.recv_counts(r, direction)
        if dense:
            assert isinstance(send, SparseCounts) and isinstance(recv, SparseCounts)
            send, recv = tuple(send.dense()), tuple(recv.dense())
        shape = MoeShape(
            e=routing.experts_per_rank,
            send=send,
            recv=recv,
            h1=64,
            n1=48,
            elem_bytes=2,
            shared=shared,
            dtype="bfloat16",
        )
        out[r] = builder(shape=shape, tiling=spec, rank=r)
    return out


# ---------------------------------------------------------------- compute_time by hand


@pytest.mark.parametrize(
    ("kind", "flops", "nbytes", "dtype", "expected"),
    [
        # flops-bound: 4e12 / 100e12 = 40 ms beats 1e9 B / 1000 GB/s = 1 ms
        (TaskKind.MATMUL, 4 * 10**12, 10**9, "float16", 0.04),
        # bytes-bound: 4e9 B / 1000 GB/s = 4 ms beats 2e9 / 100e12 = 20 us
        (TaskKind.MATMUL, 2 * 10**9, 4 * 10**9, "float16", 0.004),
        # bfloat16 runs at the float16 figure (the only half-precision one given)
        (TaskKind.GROUPED_MATMUL, 4 * 10**12, 0, "bfloat16", 0.04),
        (TaskKind.WEIGHT_QUANT_MATMUL, 4 * 10**12, 0, "float16", 0.04),
        # quant_matmul multiplies on the int8 peak (400 TOP/s) whatever the plan's dtype
        (TaskKind.QUANT_MATMUL, 4 * 10**12, 0, "int8", 0.01),
        (TaskKind.QUANT_MATMUL, 4 * 10**12, 0, "float16", 0.01),
        # reduce runs on the vector unit: 1e11 / 10e12 = 10 ms
        (TaskKind.REDUCE, 10**11, 10**6, "float16", 0.01),
        # a reduce that moves more than it adds is memory-bound: 2e10 B -> 20 ms
        (TaskKind.REDUCE, 10**9, 2 * 10**10, "float16", 0.02),
    ],
)
def test_compute_time_is_the_roofline_plus_launch(
    kind: TaskKind, flops: int, nbytes: int, dtype: str, expected: float
) -> None:
    seconds = compute_time(task(kind, flops, nbytes), machine(dim("switch", 2, 1.0, 0.0)), dtype)
    assert seconds == pytest.approx(expected + 1e-6, rel=1e-12)


def test_compute_time_applies_the_small_tile_curve_to_matrix_work_only() -> None:
    curve = Efficiency(small_util=0.5, large_util=1.0, half_flops=1e9)
    topo = machine(dim("switch", 2, 1.0, 0.0), device=replace(DEVICE, efficiency=curve))
    # at half_flops the utilisation is half-way, 0.75: 1e9 / (100e12 * 0.75)
    mm = compute_time(task(TaskKind.MATMUL, 10**9), topo, "float16")
    assert mm == pytest.approx(1e9 / 75e12 + 1e-6, rel=1e-12)
    # a vanishing task runs at small_util (plus its launch)
    tiny = compute_time(task(TaskKind.MATMUL, 1000), topo, "float16")
    assert tiny == pytest.approx(1000 / 50e12 + 1e-6, rel=1e-9)
    # the vector unit has no such curve
    red = compute_time(task(TaskKind.REDUCE, 10**9), topo, "float16")
    assert red == pytest.approx(1e9 / 10e12 + 1e-6, rel=1e-12)


def test_compute_time_adds_memory_when_the_device_does_not_overlap_it() -> None:
    serial = machine(dim("switch", 2, 1.0, 0.0), device=replace(DEVICE, memory_overlap=False))
    # 4e12 / 100e12 = 40 ms of arithmetic, then 1e9 B / 1000 GB/s = 1 ms of memory
    seconds = compute_time(task(TaskKind.MATMUL, 4 * 10**12, 10**9), serial, "float16")
    assert seconds == pytest.approx(0.04 + 0.001 + 1e-6, rel=1e-12)


def test_compute_time_refuses_comm_tasks_and_unknown_dtypes() -> None:
    topo = machine(dim("switch", 2, 1.0, 0.0))
    with pytest.raises(ParamInvalidError) as err:
        compute_time(task(TaskKind.ALLREDUCE, 0, 10), topo, "float16")
    assert err.value.param == "task.kind"
    with pytest.raises(ParamInvalidError) as err:
        compute_time(task(TaskKind.MATMUL, 10), topo, "float32")  # the toy gives no fp32
    assert err.value.param == "dtype"


# ---------------------------------------------------------------- collectives by hand

US = 1e-6


def adds(nbytes: float, rounds: float) -> float:
    """A collective's reduction: ``rounds`` x ``nbytes`` consumed at the device's 5000 GB/s."""
    return rounds * nbytes / 5000e9


@pytest.mark.parametrize(
    ("network", "nbytes", "expected"),
    [
        # full mesh of 8, 10 GB/s, 5 us, 8 MB: reduce-scatter and all-gather each send a
        # 1 MB chunk to every peer at once: 2 * (5 us + 1e6 / 1e10), plus adding the 7/8 of
        # the message the rank receives
        ((dim("full_mesh", 8, 10.0, 5.0),), 8e6, 2 * (5 * US + 1e-4) + adds(8e6, 7 / 8)),
        # ring of 4: 2 phases of 3 steps of (5 us + 2 MB / 10 GB/s)
        ((dim("ring", 4, 10.0, 5.0),), 8e6, 2 * 3 * (5 * US + 2e-4) + adds(8e6, 3 / 4)),
        # a switch of 4 runs the same ring over its ports
        ((dim("switch", 4, 10.0, 5.0),), 8e6, 2 * 3 * (5 * US + 2e-4) + adds(8e6, 3 / 4)),
        # two levels, 4 x 2: full mesh phases on 8 MB (chunk 2 MB at 100 GB/s, 1 us), then
        # the outer ring of 2 on the 2 MB left (one step: 10 us + 1 MB / 10 GB/s)
        (
            two_level().network,
            8e6,
            2 * (1 * US + 2e-5) + 2 * (10 * US + 1e-4) + adds(8e6, 7 / 8),
        ),
        # tiny message on a ring of 8: recursive doubling, 3 steps of 5 us + 8 B / 10 GB/s
        # (adding the whole message at each), beats the ring's 2 * 7 latencies
        ((dim("ring", 8, 10.0, 5.0),), 8.0, 3 * (5 * US + 8 / 1e10) + adds(8, 3)),
    ],
    ids=["full_mesh", "ring", "switch", "two_level", "doubling"],
)
def test_allreduce_time_by_hand(
    network: tuple[NetworkDim, ...], nbytes: float, expected: float
) -> None:
    assert allreduce_time(machine(*network), nbytes) == pytest.approx(expected, rel=1e-12)


def test_allreduce_picks_the_cheaper_algorithm() -> None:
    ring = machine(dim("ring", 8, 10.0, 5.0))
    hierarchical = 2 * 7 * (5 * US + 8 / 8 / 1e10) + adds(8, 7 / 8)
    doubling = 3 * (5 * US + 8 / 1e10) + adds(8, 3)
    assert doubling < hierarchical
    assert allreduce_time(ring, 8) == pytest.approx(doubling, rel=1e-12)
    # large message: the ring wins (doubling would send all 80 MB three times)
    big = 8e7
    ring_s = 2 * 7 * (5 * US + 1e7 / 1e10) + adds(big, 7 / 8)
    assert allreduce_time(ring, big) == pytest.approx(ring_s, rel=1e-12)
    assert ring_s < 3 * (5 * US + big / 1e10) + adds(big, 3)


def test_a_tiny_allreduce_over_two_levels_beats_the_hierarchical_latencies() -> None:
    # 4 x 4: the hierarchy pays 2 latencies on the mesh and 2 x 3 ring steps of 10 us on the
    # switch; recursive doubling needs log2(16) = 4 steps, none slower than 10 us + 8 B
    topo = machine(dim("full_mesh", 4, 100.0, 1.0), dim("switch", 4, 10.0, 10.0))
    assert allreduce_time(topo, 8) < 2 * 1 * US + 2 * 3 * 10 * US
    assert allreduce_time(topo, 8) <= 4 * (10 * US + 8 / 1e10) + adds(8, 4) + 1e-15


def test_a_faster_dimension_never_slows_an_allreduce() -> None:
    # the recursive-doubling estimate runs on "the slowest dimension", picked by bandwidth
    # alone: speeding up the outer dimension (2 -> 4 GB/s, 0 us) makes the inner one
    # (3 GB/s, 1 us) the slowest, and doubling pays its latency at every step
    before = machine(dim("full_mesh", 2, 3.0, 1.0), dim("full_mesh", 2, 2.0, 0.0))
    after = machine(dim("full_mesh", 2, 3.0, 1.0), dim("full_mesh", 2, 4.0, 0.0))
    assert allreduce_time(after, 1024) <= allreduce_time(before, 1024)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(LinkKind)),
            st.integers(1, 8),
            st.floats(1.0, 500.0),
            st.floats(0.0, 20.0),
        ),
        min_size=1,
        max_size=3,
    ),
    st.integers(0, 2),
    st.floats(1.0, 1e9),
)
def test_collective_times_never_grow_with_bandwidth(
    dims: list[tuple[LinkKind, int, float, float]], which: int, nbytes: float
) -> None:
    which = min(which, len(dims) - 1)
    slow = machine(*(dim(str(k), r, g, u) for k, r, g, u in dims))
    fast = machine(
        *(dim(str(k), r, 2 * g if i == which else g, u) for i, (k, r, g, u) in enumerate(dims))
    )
    for collective in (allreduce_time, allgather_time, reduce_scatter_time):
        assert collective(fast, nbytes) <= collective(slow, nbytes), collective.__name__


def test_no_collective_costs_anything_alone_or_empty() -> None:
    alone = machine(dim("switch", 1, 10.0, 5.0))
    assert allreduce_time(alone, 1e6) == 0.0
    assert allgather_time(alone, 1e6) == 0.0
    assert reduce_scatter_time(alone, 1e6) == 0.0
    assert allreduce_time(two_level(), 0) == 0.0
    assert allgather_time(two_level(), 0) == 0.0
    assert reduce_scatter_time(two_level(), 0) == 0.0
    assert alltoallv_time(two_level(), []) == 0.0


@pytest.mark.parametrize(
    ("network", "total", "expected"),
    [
        # each rank ends with 8 MB: full mesh of 8 receives 7 chunks of 1 MB at once
        ((dim("full_mesh", 8, 10.0, 5.0),), 8e6, 5 * US + 1e-4),
        ((dim("ring", 4, 10.0, 5.0),), 8e6, 3 * (5 * US + 2e-4)),
        ((dim("switch", 4, 10.0, 5.0),), 8e6, 3 * (5 * US + 2e-4)),
    ],
    ids=["full_mesh", "ring", "switch"],
)
def test_allgather_time_by_hand(
    network: tuple[NetworkDim, ...], total: float, expected: float
) -> None:
    assert allgather_time(machine(*network), total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("network", "total", "expected"),
    [
        ((dim("full_mesh", 8, 10.0, 5.0),), 8e6, 5 * US + 1e-4 + adds(8e6, 7 / 8)),
        ((dim("ring", 4, 10.0, 5.0),), 8e6, 3 * (5 * US + 2e-4) + adds(8e6, 3 / 4)),
        ((dim("switch", 4, 10.0, 5.0),), 8e6, 3 * (5 * US + 2e-4) + adds(8e6, 3 / 4)),
        # two levels: the mesh scatters 8 MB into 2 MB chunks, the outer ring of 2 then
        # halves the 2 MB each rank holds
        (
            two_level().network,
            8e6,
            (1 * US + 2e6 / 1e11) + (10 * US + 1e6 / 1e10) + adds(8e6, 7 / 8),
        ),
    ],
    ids=["full_mesh", "ring", "switch", "two_level"],
)
def test_reduce_scatter_time_by_hand(
    network: tuple[NetworkDim, ...], total: float, expected: float
) -> None:
    assert reduce_scatter_time(machine(*network), total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["full_mesh", "ring", "switch"])
def test_allreduce_is_reduce_scatter_plus_allgather_on_one_dimension(kind: str) -> None:
    topo = machine(dim(kind, 4, 10.0, 5.0))
    nbytes = 8e7  # large: the hierarchical algorithm wins
    both = reduce_scatter_time(topo, nbytes) + allgather_time(topo, nbytes)
    assert allreduce_time(topo, nbytes) == pytest.approx(both, rel=1e-12)


def test_two_level_allgather_is_the_allgather_half_of_allreduce() -> None:
    # an AllReduce is a ReduceScatter then an AllGather; the AllGather alone must not cost
    # more. Gathering innermost first would carry the whole 8 MB over the slow outer
    # dimension ((1 us + 1 MB / 100 GB/s) + (10 us + 4 MB / 10 GB/s) = 421 us)
    topo = two_level()
    # outer ring of 2 on the 2 MB a rank holds after the mesh, then the mesh on 8 MB
    expected = (10 * US + 1e6 / 1e10) + (1 * US + 2e6 / 1e11)
    assert allgather_time(topo, 8e6) == pytest.approx(expected, rel=1e-12)
    assert allgather_time(topo, 8e6) < allreduce_time(topo, 8e6)


# ---------------------------------------------------------------- AlltoAllv by hand


Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def splits_of(matrix: list[list[float]]) -> list[Splits]:
    """Per rank (send_peers, send_bytes, recv_peers, recv_bytes) of a bytes matrix [src][dst]."""
    m = np.asarray(matrix, dtype=np.float64)
    np.fill_diagonal(m, 0.0)
    out: list[Splits] = []
    for r in range(len(m)):
        sp, rp = np.flatnonzero(m[r]), np.flatnonzero(m[:, r])
        out.append((sp, m[r, sp], rp, m[rp, r]))
    return out


UNEVEN: list[list[float]] = [
    [0, 1e6, 3e6, 0],  # rank 0 sends to two peers
    [2e6, 0, 0, 0],  # rank 1 sends to rank 0
    [0, 0, 0, 0],  # rank 2 only receives
    [0, 0, 0, 0],  # rank 3 neither sends nor receives
]


@pytest.mark.parametrize(
    ("kind", "per_rank"),
    [
        # full mesh: a rank's time is its busiest single link plus one latency per peer
        ("full_mesh", [3e6 / 1e10 + 2 * US, 2e6 / 1e10 + 1 * US, 3e6 / 1e10 + 1 * US, 0.0]),
        # switch: all a rank's bytes share its port
        ("switch", [4e6 / 1e10 + 2 * US, 2e6 / 1e10 + 1 * US, 3e6 / 1e10 + 1 * US, 0.0]),
        # ring of 4: mean hop count (1 + 2 + 1) / 3 over both directions
        (
            "ring",
            [
                4e6 * (4 / 3) / 2 / 1e10 + 2 * US,
                2e6 * (4 / 3) / 2 / 1e10 + 1 * US,
                3e6 * (4 / 3) / 2 / 1e10 + 1 * US,
                0.0,
            ],
        ),
    ],
)
def test_alltoallv_on_uneven_counts_ends_with_its_busiest_rank(
    kind: str, per_rank: list[float]
) -> None:
    topo = machine(dim(kind, 4, 10.0, 1.0))
    splits = splits_of(UNEVEN)
    for r, expected in enumerate(per_rank):
        assert rank_alltoallv_time(topo, r, *splits[r]) == pytest.approx(expected, rel=1e-12)
    assert alltoallv_time(topo, splits) == pytest.approx(max(per_rank), rel=1e-12)
    # rank 3 exchanges nothing: it takes no time, and it does not change the collective
    assert rank_alltoallv_time(topo, 3, *splits[3]) == 0.0


def test_alltoallv_across_the_outer_dimension_uses_its_bandwidth() -> None:
    # ranks 0, 1 share the fast inner switch (100 GB/s, 1 us); 2, 3 are behind the outer
    # one (10 GB/s, 2 us)
    topo = machine(dim("switch", 2, 100.0, 1.0), dim("switch", 2, 10.0, 2.0))
    inner_only = splits_of([[0, 2e6, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    assert alltoallv_time(topo, inner_only) == pytest.approx(2e6 / 1e11 + 1 * US, rel=1e-12)
    outer_only = splits_of([[0, 0, 2e6, 0], [0] * 4, [0] * 4, [0] * 4])
    assert alltoallv_time(topo, outer_only) == pytest.approx(2e6 / 1e10 + 2 * US, rel=1e-12)
    # rank 3 differs from rank 0 in both coordinates: it is reached over the outer dimension
    diagonal = splits_of([[0, 0, 0, 2e6], [0] * 4, [0] * 4, [0] * 4])
    assert alltoallv_time(topo, diagonal) == pytest.approx(2e6 / 1e10 + 2 * US, rel=1e-12)
    # dimensions run at once: half to each side costs the slower side alone
    both = splits_of([[0, 1e6, 1e6, 0], [0] * 4, [0] * 4, [0] * 4])
    assert alltoallv_time(topo, both) == pytest.approx(1e6 / 1e10 + 2 * US, rel=1e-12)


def scalar_alltoallv(topo: Topology, matrix: np.ndarray) -> float:
    """The AlltoAllv's time rank by rank, peer by peer, in plain Python (an oracle)."""
    worst = 0.0
    for r in range(len(matrix)):
        for side in (matrix[r], matrix[:, r]):  # what r sends, what it receives
            for d, nd in enumerate(topo.network):
                loads = [float(side[p]) for p in range(len(matrix))
                         if p != r and side[p] > 0 and topo.dim_of(r, p) == d]  # fmt: skip
                if nd.ranks <= 1 or not loads:
                    continue
                hops = 1.0
                if nd.kind is LinkKind.RING and nd.ranks > 2:
                    hops = sum(min(h, nd.ranks - h) for h in range(1, nd.ranks)) / (nd.ranks - 1)
                seconds_per_byte = 1 / (nd.effective_gbps * 1e9)
                busy = {
                    LinkKind.FULL_MESH: max(loads) * seconds_per_byte,
                    LinkKind.RING: sum(loads) * hops * seconds_per_byte / 2,
                    LinkKind.SWITCH: sum(loads) * seconds_per_byte,
                }[nd.kind]
                worst = max(worst, busy + nd.latency_us * 1e-6 * len(loads))
    return worst


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(
        st.tuples(st.sampled_from(["full_mesh", "ring", "switch"]), st.integers(1, 4)),
        min_size=1, max_size=3,
    ),
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.0, 1.0),
)  # fmt: skip
def test_alltoallv_of_all_ranks_at_once_matches_rank_by_rank(
    shape: list[tuple[str, int]], seed: int, density: float
) -> None:
    topo = machine(*(dim(kind, ranks, 10.0 * (d + 1), 1.0 + d) for d, (kind, ranks) in
                     enumerate(shape)))  # fmt: skip
    world = topo.world_size
    rng = np.random.default_rng(seed)
    matrix = rng.integers(1, 1 << 20, size=(world, world)) * (rng.random((world, world)) < density)
    np.fill_diagonal(matrix, 0)
    splits = splits_of(matrix.tolist())
    expected = scalar_alltoallv(topo, matrix)
    assert alltoallv_time(topo, splits) == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert max((rank_alltoallv_time(topo, r, *splits[r]) for r in range(world)), default=0.0) == (
        pytest.approx(expected, rel=1e-12, abs=1e-18)
    )
    pairs = np.array([(a, b) for a in range(world) for b in range(world)]).reshape(-1, 2)
    assert separating_dims(topo, pairs[:, 0], pairs[:, 1]).tolist() == [
        topo.dim_of(int(a), int(b)) for a, b in pairs
    ]


# ---------------------------------------------------------------- sanity (a): one tile


def serial_case(op: str, world: int) -> tuple[dict[int, Plan], Callable[[Topology], float]]:
    """Serial plans of ``op`` and the hand sum of their compute and comm on a topology."""
    plans = dense_plans(op, "serial", world, m=64)
    plan = plans[0]
    (mm,) = plan.of(Resource.COMPUTE)
    (comm,) = plan.of(Resource.COMM)
    if op == "mm_all_reduce":
        return plans, lambda t: compute_time(mm, t, plan.dtype) + allreduce_time(t, comm.bytes)
    if op == "all_gather_matmul":
        return (
            plans,
            lambda t: allgather_time(t, world * comm.bytes) + compute_time(mm, t, plan.dtype),
        )
    return plans, lambda t: compute_time(mm, t, plan.dtype) + reduce_scatter_time(t, comm.bytes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("topology", ["hand", "atlas_a2_multinode", "h200_8x_nvlink"])
def test_a_one_tile_plan_takes_its_compute_plus_its_comm(op: str, topology: str) -> None:
    topo = two_level() if topology == "hand" else builtin(topology)
    topo = replace(topo, contention=Contention())
    plans, expected = serial_case(op, topo.world_size)
    timeline = simulate(plans, topo)
    assert timeline.source is Source.SIMULATED
    assert timeline.metrics().total_s == expected(topo)  # the same two floats, added once


@pytest.mark.parametrize("op", OPS)
def test_a_one_tile_plan_takes_its_compute_plus_its_comm_in_two_parts(op: str) -> None:
    # collectives in flight together: a latency part, then a transfer part, added
    topo = replace(two_level(), device=replace(DEVICE, concurrent_collectives=True))
    plans, expected = serial_case(op, topo.world_size)
    assert simulate(plans, topo).metrics().total_s == pytest.approx(expected(topo), rel=1e-12)


def test_a_serial_moe_plan_takes_its_gmm_and_unpermute_plus_its_alltoallv() -> None:
    topo = two_level()
    routing = sparse_routing(8, 2)
    plans = moe_plans("gmm_alltoallv", "serial", routing, shared=None)
    splits = []
    for r, plan in plans.items():
        (a2a,) = plan.of(Resource.COMM)
        send = np.asarray(list(a2a.send_splits), dtype=np.float64) * a2a.row_bytes
        recv = np.asarray(list(a2a.recv_splits), dtype=np.float64) * a2a.row_bytes
        send[r] = recv[r] = 0
        sp, rp = np.flatnonzero(send), np.flatnonzero(recv)
        splits.append((sp, send[sp], rp, recv[rp]))
    a2a_s = alltoallv_time(topo, splits)
    ends = {}
    for rec in simulate(plans, topo).records:
        if rec.stream is Stream.COMM:
            ends[rec.rank] = rec.end_s
    # the GMM, then the unpermute of its output (a pack task): the rank's compute before it sends
    before = {
        r: sum(compute_time(t, topo, p.dtype) for t in p.of(Resource.COMPUTE)[:2])
        for r, p in plans.items()
    }
    assert all(
        [t.kind for t in p.of(Resource.COMPUTE)[:2]] == [TaskKind.GROUPED_MATMUL, TaskKind.PACK]
        for p in plans.values()
    )
    # the AlltoAllv starts when the slowest rank's unpermute ends
    for r in plans:
        assert ends[r] == pytest.approx(max(before.values()) + a2a_s, rel=1e-12)


# ---------------------------------------------------------------- sanity (b): bandwidth


@dataclass(frozen=True)
class Scenario:
    """A recipe for plans of one op on a two-level machine (printed compactly on failure)."""

    world: int
    inner: tuple[str, float, float]  # kind, GB/s, us (2 ranks)
    outer: tuple[str, float, float]  # kind, GB/s, us (world / 2 ranks)
    slowdowns: tuple[float, float]  # compute, comm
    op: str
    tiling: str | int | None
    block: int  # dense ops: rows per rank
    moe: tuple[int, int, float, int, int, bool, bool]  # e, seed, skew, tokens, top_k, shared, dense
    faster: int  # which dimension doubles its bandwidth: 0, 1 or 2 (both)
    concurrent: bool = False  # collectives in flight progress together

    def build(self) -> tuple[dict[int, Plan], Topology]:
        inner = dim(self.inner[0], 2, self.inner[1], self.inner[2])
        outer = dim(self.outer[0], self.world // 2, self.outer[1], self.outer[2])
        topo = machine(
            inner,
            outer,
            compute_slowdown=self.slowdowns[0],
            comm_slowdown=self.slowdowns[1],
            concurrent=self.concurrent,
        )
        if self.op in OPS:
            return dense_plans(self.op, self.tiling, self.world, m=self.world * self.block), topo
        e, seed, skew, tokens, top_k, shared, dense = self.moe
        routing = route(
            RoutingConfig(kind=RoutingKind.ZIPF, seed=seed, skew=skew),
            world_size=self.world,
            experts_per_rank=e,
            tokens_per_rank=tokens,
            top_k=min(top_k, self.world * e),  # distinct experts per token
            sparse=True,
        )
        plans = moe_plans(
            self.op, self.tiling, routing, dense=dense, shared=(16, 64, 32) if shared else None
        )
        return plans, topo


link = st.tuples(
    st.sampled_from([k.value for k in LinkKind]), st.floats(1.0, 500.0), st.floats(0.0, 10.0)
)
slowdown = st.sampled_from([1.0, 1.0, 1.5, 3.0])
SCENARIOS = st.builds(
    Scenario,
    world=st.sampled_from([2, 4, 8]),
    inner=link,
    outer=link,
    # contention of 1 or more: processor sharing slows tasks down but must not undo the law
    slowdowns=st.tuples(slowdown, slowdown),
    op=st.sampled_from(OPS + MOE_OPS),
    tiling=st.sampled_from([None, "serial", 1, 2, 3, 4]),
    block=st.integers(1, 48),
    moe=st.tuples(
        st.integers(1, 3),
        st.integers(0, 1000),
        st.floats(0.0, 2.5),
        st.integers(1, 64),
        st.integers(1, 4),
        st.booleans(),
        st.booleans(),
    ),
    faster=st.sampled_from([0, 1, 2]),
    concurrent=st.booleans(),
)


def doubled(topo: Topology, which: int) -> Topology:
    network = tuple(
        replace(d, bandwidth_gbps=2 * d.bandwidth_gbps) if which in (i, 2) else d
        for i, d in enumerate(topo.network)
    )
    return replace(topo, network=network)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: keep failures fast
)
@given(SCENARIOS)
@example(  # the doubling AllReduce estimate switched to a dimension of higher latency
    Scenario(
        world=4,
        inner=("full_mesh", 3.0, 1.0),
        outer=("full_mesh", 2.0, 0.0),
        slowdowns=(1.0, 1.0),
        op="mm_all_reduce",
        tiling="serial",
        block=1,
        moe=(1, 0, 0.0, 1, 1, False, False),
        faster=1,
    )
)
@example(  # a stale end event of a re-rated collective ended the next one early
    Scenario(
        world=4,
        inner=("full_mesh", 1.0, 0.0),
        outer=("full_mesh", 1.0, 0.0),
        slowdowns=(1.0, 1.5),
        op="mm_all_reduce",
        tiling=2,
        block=1,
        moe=(1, 0, 0.0, 1, 1, False, False),
        faster=0,
    )
)
def test_doubling_a_links_bandwidth_never_slows_anything(scenario: Scenario) -> None:
    plans, topo = scenario.build()
    slow = simulate(plans, topo)
    fast = simulate(plans, doubled(topo, scenario.faster))
    # exact without contention (max-plus sums of smaller floats); a rounding's worth of
    # slack where processor sharing re-rates tasks (work left = work - elapsed * rate)
    slack = 0.0 if topo.contention == Contention() else 1e-12
    assert fast.metrics().total_s <= slow.metrics().total_s * (1 + slack)
    slow_end = {(r.rank, r.task): r.end_s for r in slow.records}
    for rec in fast.records:  # no task of any rank ends later
        assert rec.end_s <= slow_end[(rec.rank, rec.task)] * (1 + slack)


# ---------------------------------------------------------------- sanity (c): the work


def test_more_tiles_never_change_the_flops_or_bytes_of_mm_all_reduce() -> None:
    m = 100
    for count in range(1, 17):
        plan = plan_mm_all_reduce(
            m=m,
            shape=SHAPE,
            kind=TaskKind.MATMUL,
            tiling=tiling_of(count),
            rank=0,
            world_size=4,
        )
        assert len(plan.of(Resource.COMM)) == count
        assert plan.flops == 2 * m * SHAPE.k * SHAPE.n
        assert plan.comm_bytes == m * SHAPE.n * SHAPE.out_bytes


@pytest.mark.parametrize("op", MOE_OPS)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_moe_sub_tiles_never_change_the_flops_or_bytes(op: str, dense: bool) -> None:
    world, e = 8, 3
    routing = sparse_routing(world, e, seed=5, skew=1.5)
    direction = Direction.COMBINE if op == "gmm_alltoallv" else Direction.DISPATCH
    serial = moe_plans(op, "serial", routing, dense=dense)
    for rank in (0, 5):
        send = routing.send_counts(rank, direction)
        recv = routing.recv_counts(rank, direction)
        rows = send.total() if op == "gmm_alltoallv" else recv.total()
        # routed rows x H1 x N1 (64 x 48), plus the shared expert (24 x 64 x 32) once
        flops = 2 * rows * 64 * 48 + 2 * 24 * 64 * 32
        row_bytes = (48 if op == "gmm_alltoallv" else 64) * 2
        sent = (send.total() - send.per_peer(e).dense()[rank]) * row_bytes
        assert (serial[rank].flops, serial[rank].comm_bytes) == (flops, sent)
        for tiling in (None, 1, 2, 3, 4):
            plan = moe_plans(op, tiling, routing, dense=dense)[rank]
            assert (plan.flops, plan.comm_bytes) == (flops, sent), plan.tiling


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_rank_chunk_tiles_never_change_the_matmul_flops(op: str) -> None:
    world, m = 4, 32
    matmul_flops = {}
    comm_bytes = set()
    for tiling in ("serial", None, 1, 2, 3, 4, 8):
        plan = dense_plans(op, tiling, world, m=m)[1]
        matmul_flops[tiling] = sum(t.flops for t in plan if t.kind is TaskKind.MATMUL)
        if tiling != "serial":  # the serial plan's collective counts bytes another way
            comm_bytes.add(plan.comm_bytes)
    rows = m * world if op == "all_gather_matmul" else m
    assert set(matmul_flops.values()) == {2 * rows * SHAPE.k * SHAPE.n}
    row_bytes = SHAPE.k * SHAPE.in_bytes if op == "all_gather_matmul" else SHAPE.n * 2
    # every rank's chunk but its own leaves it once
    sent = (world - 1) * (m if op == "all_gather_matmul" else m // world) * row_bytes
    assert comm_bytes == {sent}


# ---------------------------------------------------------------- engine invariants


def check_engine(plans: dict[int, Plan], timeline: Timeline, topology: Topology) -> None:
    """Every invariant of a simulated timeline that holds whatever the durations."""
    contention = topology.contention
    free = contention.compute_slowdown == 1.0
    together = topology.device.concurrent_collectives
    records = timeline.records
    keys = Counter((r.rank, r.task) for r in records)
    expected = {(rank, t.id) for rank, plan in plans.items() for t in plan}
    assert set(keys) == expected and set(keys.values()) == {1}  # every task exactly once
    ends = [r.end_s for r in records]
    assert ends == sorted(ends)  # records come out in event order: time never goes back
    by_key = {(r.rank, r.task): r for r in records}
    collectives: list[list[tuple[float, float]]] = []
    for rank, plan in plans.items():
        for t in plan:
            rec = by_key[(rank, t.id)]
            assert 0.0 <= rec.start_s <= rec.end_s
            assert rec.stream == str(t.resource) and rec.kind == str(t.kind)
            assert (rec.name, rec.flops, rec.bytes) == (t.name, t.flops, t.bytes)
            for d in t.deps:  # never before a dependency ends
                assert rec.start_s >= by_key[(rank, d)].end_s
            if t.resource is Resource.COMPUTE:  # contention stretches a task, never shrinks it
                alone = compute_time(t, topology, plan.dtype)
                took = rec.end_s - rec.start_s
                assert (
                    took == pytest.approx(alone, rel=1e-9) if free else took >= alone * (1 - 1e-9)
                )
                assert took <= alone * contention.compute_slowdown * (1 + 1e-9)
            if t.kind is TaskKind.ALLREDUCE:  # every rank's chunk is the same size here
                alone = allreduce_time(topology, t.bytes)
                took = rec.end_s - rec.start_s
                assert took >= alone * (1 - 1e-9)
                if not together:  # in flight with others, it also shares the links
                    assert took <= alone * contention.comm_slowdown * (1 + 1e-9)
        for resource in Resource:
            mine = [by_key[(rank, t.id)] for t in plan.of(resource)]
            starts = [r.start_s for r in mine]
            assert starts == sorted(starts)  # issued in plan order
            if resource is Resource.COMM and together:
                continue
            for a, b in zip(mine[:-1], mine[1:], strict=True):  # one task at a time per resource
                assert b.start_s >= a.end_s
        comm = [
            (r.start_s, r.end_s) for r in (by_key[(rank, t.id)] for t in plan.of(Resource.COMM))
        ]
        collectives.append(comm)
    # collective k starts and ends at the same time on every rank
    assert all(c == collectives[0] for c in collectives)


PLAN_CASES = [
    *[(op, tiling) for op in OPS for tiling in (None, "serial", 3)],
    *[(op, tiling) for op in MOE_OPS for tiling in (None, "serial", 2)],
]


@pytest.mark.parametrize(("op", "tiling"), PLAN_CASES, ids=lambda v: str(v))
def test_engine_invariants(op: str, tiling: str | int | None) -> None:
    topo = two_level()
    if op in OPS:
        plans = dense_plans(op, tiling, 8, m=64)
    else:
        plans = moe_plans(op, tiling, sparse_routing(8, 3, seed=2))
    timeline = simulate(plans, topo)
    check_engine(plans, timeline, topo)
    assert dict(timeline.meta) == {
        "op": op,
        "tiling": plans[0].tiling,
        "world_size": 8,
        "topology": "hand",
    }
    assert timeline.runs() == [RunKey(op=op, tiling=plans[0].tiling, repetition=0)]


@pytest.mark.parametrize("concurrent", [False, True], ids=["stream", "concurrent"])
def test_engine_invariants_under_contention(concurrent: bool) -> None:
    topo = machine(
        *two_level().network, compute_slowdown=1.7, comm_slowdown=1.3, concurrent=concurrent
    )
    for op, tiling in PLAN_CASES:
        if op in OPS:
            plans = dense_plans(op, tiling, 8, m=64)
        else:
            plans = moe_plans(op, tiling, sparse_routing(8, 3, seed=2))
        check_engine(plans, simulate(plans, topo), topo)


def test_tiles_overlap_compute_and_comm() -> None:
    plans = dense_plans("mm_all_reduce", 4, 8, m=256)
    timeline = simulate(plans, two_level())
    rank0 = sorted(timeline.for_rank(0).records, key=lambda r: r.task)
    # matmul[1] runs while allreduce[0] is in flight
    assert rank0[2].name == "matmul[1]" and rank0[1].name == "allreduce[0]"
    assert rank0[2].start_s == rank0[1].start_s < rank0[1].end_s
    metrics = timeline.metrics()
    assert metrics.total_s < metrics.compute_s + metrics.comm_s


def two_tiles_of_latency(concurrent: bool) -> tuple[Topology, dict[int, Plan], float, float, float]:
    """2 ranks, 2 tiles on a link of 1 ms latency; a tile's compute, AllReduce and latency."""
    link = dim("full_mesh", 2, 1000.0, 1000.0)
    topo = machine(link, concurrent=concurrent)
    plans = dense_plans("mm_all_reduce", 2, 2, m=512)
    mm, ar = plans[0].tasks[0], plans[0].tasks[1]
    # the latency alone: the same link at a bandwidth no transfer registers on, reductions free
    unbounded = machine(replace(link, bandwidth_gbps=1e300), device=replace(DEVICE, reduce_gbps=0))
    latency = allreduce_time(unbounded, ar.bytes)
    c, a = compute_time(mm, topo, "float16"), allreduce_time(topo, ar.bytes)
    assert c < latency < a
    return topo, plans, c, a, latency


def test_collectives_in_flight_together_overlap_their_latencies() -> None:
    topo, plans, c, a, latency = two_tiles_of_latency(concurrent=False)
    assert simulate(plans, topo).metrics().total_s == pytest.approx(c + 2 * a, rel=1e-12)
    topo, plans, c, a, latency = two_tiles_of_latency(concurrent=True)
    timeline = simulate(plans, topo)
    # allreduce[1] starts with its tile, at 2c, while allreduce[0] (from c) is in flight; its
    # transfer follows its latency and allreduce[0]'s end
    transfer = a - latency
    first_end = c + a
    second_end = max(2 * c + latency, first_end) + transfer
    assert timeline.metrics().total_s == pytest.approx(second_end, rel=1e-12)
    ar1 = next(r for r in timeline.for_rank(0).records if r.name == "allreduce[1]")
    assert ar1.start_s == pytest.approx(2 * c, rel=1e-12)
    assert second_end < c + 2 * a  # the second latency is hidden


def test_collectives_in_flight_together_take_turns_on_the_links() -> None:
    # no latency: every collective is all transfer, one at a time in order, as on a stream;
    # only the comm records' starts differ (when every rank has queued it, not when it runs)
    link = dim("full_mesh", 4, 1.0, 0.0)
    for op, tiling in PLAN_CASES:
        if op in OPS:
            plans = dense_plans(op, tiling, 4, m=64)
        else:
            plans = moe_plans(op, tiling, sparse_routing(4, 2, seed=1))
        stream = simulate(plans, machine(link, compute_slowdown=1.5, comm_slowdown=2.0))
        together = machine(link, compute_slowdown=1.5, comm_slowdown=2.0, concurrent=True)
        mine = {(r.rank, r.task): r.end_s for r in simulate(plans, together).records}
        ends = {(r.rank, r.task): r.end_s for r in stream.records}
        assert mine == pytest.approx(ends, rel=1e-12, abs=1e-18)


def test_mismatched_collectives_across_ranks_are_refused() -> None:
    moe = moe_plans("gmm_alltoallv", "serial", sparse_routing(2, 2), shared=None)
    dense = dense_plans("mm_all_reduce", "serial", 2)
    with pytest.raises(ParamInvalidError, match="collective mismatch"):
        simulate({0: moe[0], 1: dense[1]}, machine(dim("switch", 2, 10.0, 1.0)))
    # rank 0 has two allreduces, rank 1 one: rank 0 never finishes
    two = dense_plans("mm_all_reduce", 2, 2)
    with pytest.raises(ParamInvalidError, match="never finished") as err:
        simulate({0: two[0], 1: dense[1]}, machine(dim("switch", 2, 10.0, 1.0)))
    assert err.value.value == [0]


@pytest.mark.parametrize("ranks", [[0, 2], [1, 2], []])
def test_plans_must_cover_ranks_zero_to_n(ranks: list[int]) -> None:
    plan = dense_plans("mm_all_reduce", "serial", 2)[0]
    with pytest.raises(ParamInvalidError) as err:
        simulate(dict.fromkeys(ranks, plan), two_level())
    assert err.value.param == "plans"


def test_a_topology_of_another_size_is_resized() -> None:
    plans = dense_plans("mm_all_reduce", 2, 4)
    eight = builtin("atlas_a2_8p")
    assert eight.world_size == 8
    resized = simulate(plans, eight)
    exact = simulate(plans, eight.with_world(4))
    assert resized.records == exact.records
    assert resized.meta["world_size"] == 4
    # 4 ranks cannot be nodes of 8
    with pytest.raises(ParamInvalidError) as err:
        simulate(plans, builtin("atlas_a2_multinode"))
    assert err.value.param == "world_size"


# ---------------------------------------------------------------- contention


def two_tiles(
    compute_slowdown: float = 1.0, comm_slowdown: float = 1.0
) -> tuple[Topology, dict[int, Plan], float, float]:
    """2 ranks, mm_all_reduce of 2 equal tiles; the tile's compute and AllReduce seconds."""
    topo = machine(
        dim("full_mesh", 2, 100.0, 0.0),
        compute_slowdown=compute_slowdown,
        comm_slowdown=comm_slowdown,
    )
    plans = dense_plans("mm_all_reduce", 2, 2, m=512)
    mm, ar = plans[0].tasks[0], plans[0].tasks[1]
    return topo, plans, compute_time(mm, topo, "float16"), allreduce_time(topo, ar.bytes)


def test_without_contention_the_next_tile_hides_the_allreduce() -> None:
    topo, plans, c, a = two_tiles()
    assert a < c
    # matmul[0] | matmul[1] while allreduce[0] | allreduce[1]
    assert simulate(plans, topo).metrics().total_s == pytest.approx(2 * c + a, rel=1e-12)


def test_compute_slowdown_shares_the_rank_while_a_collective_runs() -> None:
    s = 2.0
    topo, plans, c, a = two_tiles(compute_slowdown=s)
    assert a / s < c  # matmul[1] outlives allreduce[0]
    # matmul[1] runs at 1/s for the a seconds of allreduce[0], then at full speed:
    # it ends at c + a + (c - a / s); allreduce[1] follows
    timeline = simulate(plans, topo)
    assert timeline.metrics().total_s == pytest.approx(2 * c + 2 * a - a / s, rel=1e-12)
    for rank in (0, 1):
        mm1 = next(r for r in timeline.for_rank(rank).records if r.name == "matmul[1]")
        assert mm1.end_s - mm1.start_s == pytest.approx(c + a - a / s, rel=1e-12)


def test_comm_slowdown_shares_the_link_while_a_rank_computes() -> None:
    q = 4.0
    topo, plans, c, a = two_tiles(comm_slowdown=q)
    assert a * q > c > a  # allreduce[0] outlives matmul[1] once slowed
    # allreduce[0] advances c / q while matmul[1] runs, the rest at full speed; allreduce[1]
    # runs alone
    expected = c + c + (a - c / q) + a
    assert simulate(plans, topo).metrics().total_s == pytest.approx(expected, rel=1e-12)


def test_contention_grows_an_overlapping_plan_and_spares_a_serial_one() -> None:
    base = machine(dim("full_mesh", 8, 100.0, 0.5))
    tiled = dense_plans("mm_all_reduce", 8, 8, m=512)
    serial = dense_plans("mm_all_reduce", "serial", 8, m=512)
    t = simulate(tiled, base).metrics().total_s
    s = simulate(serial, base).metrics().total_s
    for factors in ((2.0, 1.0), (1.0, 2.0)):
        slowed = machine(*base.network, compute_slowdown=factors[0], comm_slowdown=factors[1])
        assert simulate(tiled, slowed).metrics().total_s > t, factors
        assert simulate(serial, slowed).metrics().total_s == s, factors


@pytest.mark.parametrize("factors", [(2.0, 1.0), (1.0, 3.0), (1.5, 1.5)])
def test_contention_never_shortens_a_task(factors: tuple[float, float]) -> None:
    # 4 ranks, 4 tiles: every matmul after the first overlaps an AllReduce and is re-rated
    # when it starts and ends; it must still take at least its time alone
    topo = machine(two_level().network[0], compute_slowdown=factors[0], comm_slowdown=factors[1])
    plans = dense_plans("mm_all_reduce", 4, 4, m=256)
    check_engine(plans, simulate(plans, topo), topo)


@pytest.mark.parametrize("factors", [(2.0, 1.0), (1.0, 3.0), (1.5, 1.5)])
def test_symmetric_ranks_get_the_same_timeline_under_contention(
    factors: tuple[float, float],
) -> None:
    # every rank of an mm_all_reduce does the same thing at the same time: the order in
    # which the engine handles simultaneous events must not tell them apart
    topo = machine(two_level().network[0], compute_slowdown=factors[0], comm_slowdown=factors[1])
    plans = dense_plans("mm_all_reduce", 4, 4, m=256)
    timeline = simulate(plans, topo)
    per_rank = [
        sorted((r.task, r.start_s, r.end_s) for r in timeline.for_rank(k).records) for k in range(4)
    ]
    assert all(p == per_rank[0] for p in per_rank)


# ---------------------------------------------------------------- sparse splits and counts


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=24))
def test_sparse_splits_round_trip(dense: list[int]) -> None:
    peers = np.arange(len(dense))
    splits = SparseSplits(len(dense), peers, np.asarray(dense))
    assert splits.dense() == dense and list(splits) == dense and len(splits) == len(dense)
    assert [splits[i] for i in range(len(dense))] == dense
    assert tuple(splits[1:]) == tuple(dense[1:])
    assert splits.peers.tolist() == [i for i, c in enumerate(dense) if c]  # zeros not kept
    assert splits.total() == sum(dense)
    assert splits.total(without=0) == sum(dense[1:])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.data())
def test_sparse_counts_round_trip(e: int, data: st.DataObject) -> None:
    world = data.draw(st.integers(1, 6))
    dense = data.draw(st.lists(st.integers(0, 4), min_size=world * e, max_size=world * e))
    index = np.flatnonzero(dense)
    counts = SparseCounts(world * e, index, np.asarray(dense)[index])
    assert counts.dense() == dense and counts.total() == sum(dense)
    for j in range(e):
        assert counts.expert(j, e).dense() == dense[j::e]
    assert counts.per_peer(e).dense() == [sum(dense[q * e : (q + 1) * e]) for q in range(world)]


@pytest.mark.parametrize("op", MOE_OPS)
@pytest.mark.parametrize("tiling", [None, "serial", 3])
def test_sparse_and_dense_counts_simulate_alike(op: str, tiling: str | int | None) -> None:
    routing = sparse_routing(16, 2, seed=9, skew=1.4)
    topo = machine(dim("full_mesh", 4, 100.0, 1.0), dim("ring", 4, 20.0, 5.0))
    sparse = simulate(moe_plans(op, tiling, routing), topo)
    dense = simulate(moe_plans(op, tiling, routing, dense=True), topo)
    assert sparse.metrics().total_s == dense.metrics().total_s
    assert sparse.records == dense.records


# ---------------------------------------------------------------- route(..., sparse=True)

W, E, TOKENS, K = 12, 4, 40, 4


def zipf(seed: int = 0, skew: float = 1.2) -> SparseRouting:
    return route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=seed, skew=skew),
        world_size=W,
        experts_per_rank=E,
        tokens_per_rank=TOKENS,
        top_k=K,
        sparse=True,
    )


def matrices(routing: SparseRouting, direction: str) -> tuple[np.ndarray, np.ndarray]:
    send = np.array([routing.send_counts(r, direction).dense() for r in range(W)])
    recv = np.array([routing.recv_counts(r, direction).dense() for r in range(W)])
    return send, recv


def test_route_sparse_every_rank_sends_tokens_times_top_k() -> None:
    routing = zipf()
    assert (routing.world_size, routing.experts_per_rank) == (W, E)
    for r in range(W):
        counts = routing.send_counts(r)
        assert counts.size == W * E and counts.total() == TOKENS * K
        assert np.all(np.diff(counts.index) > 0) and np.all(counts.values > 0)
    send, recv = matrices(routing, "dispatch")
    assert send.sum() == recv.sum() == W * TOKENS * K


def test_route_sparse_recv_mirrors_send() -> None:
    send, recv = matrices(zipf(), "dispatch")
    for q in range(W):
        for r in range(W):
            for j in range(E):
                assert recv[q, r * E + j] == send[r, q * E + j]


def test_route_sparse_combine_is_the_swap_of_dispatch() -> None:
    routing = zipf()
    send, recv = matrices(routing, "dispatch")
    c_send, c_recv = matrices(routing, "combine")
    assert np.array_equal(c_send, recv) and np.array_equal(c_recv, send)


def test_route_sparse_is_deterministic_per_seed() -> None:
    a, b, c = zipf(seed=4), zipf(seed=4), zipf(seed=5)
    assert np.array_equal(matrices(a, "dispatch")[0], matrices(b, "dispatch")[0])
    assert not np.array_equal(matrices(a, "dispatch")[0], matrices(c, "dispatch")[0])


def test_route_sparse_zipf_skew_raises_the_busiest_expert() -> None:
    loads = [matrices(zipf(seed=1, skew=s), "dispatch")[0].sum(axis=0).max() for s in (0, 1, 2)]
    assert loads[0] < loads[1] < loads[2]
    # each token picks K distinct experts (successive sampling), so the most popular of the
    # 48 experts gets at most one row per token: a share of the W * TOKENS = 480 tokens
    # estimated here with NumPy's own weighted sampling without replacement
    rng = np.random.default_rng(0)
    for skew, load in ((1, loads[1]), (2, loads[2])):
        weights = 1.0 / np.arange(1, W * E + 1) ** skew
        draws = [
            rng.choice(W * E, K, replace=False, p=weights / weights.sum()) for _ in range(4000)
        ]
        share = np.mean([0 in d for d in draws])
        n = W * TOKENS
        assert abs(load - n * share) < 6 * math.sqrt(n * share * (1 - share)) + 0.02 * n, skew


def test_route_sparse_counts_are_those_of_the_dense_table() -> None:
    # one draw, two representations: the sparse counts are the dense table's, entry by entry
    config = RoutingConfig(kind=RoutingKind.ZIPF, seed=7, skew=2.0)
    dense = route(config, world_size=W, experts_per_rank=E, tokens_per_rank=TOKENS, top_k=K)
    send, recv = matrices(zipf(seed=7, skew=2.0), "dispatch")
    assert send.tolist() == [dense.send_counts(r) for r in range(W)]
    assert recv.tolist() == [dense.recv_counts(r) for r in range(W)]


def test_collective_reduction_is_free_when_the_engine_reduces_in_line() -> None:
    in_line = Topology(
        name="in-line",
        description="",
        source="",
        device=replace(DEVICE, reduce_gbps=0.0),
        network=(dim("full_mesh", 8, 10.0, 5.0),),
        contention=Contention(),
    )
    # full mesh of 8 at 10 GB/s: each phase sends n/8 to every peer at once, plus a latency
    nbytes = 8e6
    assert allreduce_time(in_line, nbytes) == pytest.approx(2 * (5 * US + nbytes / 8 / 1e10))
    assert reduce_scatter_time(in_line, nbytes) == pytest.approx(5 * US + nbytes / 8 / 1e10)


def test_model_error_is_symmetric_and_geomean_multiplies() -> None:
    from mc2sim.model.accuracy import geomean_of, model_error

    assert model_error(1.0, 2.0) == pytest.approx(1.0)
    assert model_error(2.0, 1.0) == pytest.approx(1.0)
    assert model_error(3.0, 3.0) == 0.0
    assert geomean_of([0.0, 3.0]) == pytest.approx(1.0)  # sqrt(1 x 4) - 1
    assert geomean_of([]) == 0.0


@pytest.mark.parametrize("e", [1, 3, 8])
def test_sparse_counts_expert_matches_the_dense_counts_for_every_expert(e: int) -> None:
    """Each expert's split (made once per ``e``) is the dense list's every e-th count."""
    rng = np.random.default_rng(e)
    world = 37
    dense = rng.integers(0, 4, world * e) * (rng.random(world * e) < 0.3)
    index = np.flatnonzero(dense)
    counts = SparseCounts(world * e, index, dense[index])
    for _ in range(2):  # the second pass reads the cached split
        for j in range(e):
            split = counts.expert(j, e)
            assert split.world == world
            assert list(split) == [int(c) for c in dense[j::e]]
            assert np.all(np.diff(split.peers) > 0)
    assert list(counts.expert(e, e)) == [0] * world  # no such expert: nothing to anyone


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_expert_parts_cut_each_peers_count_as_even_split(
    e: int, parts: int, data: st.DataObject
) -> None:
    """All sub-tiles at once, of dense and sparse counts alike.

    Entry j * parts + p is even_split of each peer's count for j.
    """
    world = data.draw(st.integers(1, 6))
    dense = tuple(data.draw(st.lists(st.integers(0, 40), min_size=world * e, max_size=world * e)))
    index = np.flatnonzero(dense)
    sparse = SparseCounts(world * e, index, np.asarray(dense)[index])
    shape = MoeShape(e=e, send=dense, recv=dense, h1=8, n1=8, elem_bytes=2)
    cut, sparse_cut = shape.expert_parts(dense, parts), shape.expert_parts(sparse, parts)
    assert len(cut) == len(sparse_cut) == e * parts
    for j in range(e):
        for p in range(parts):
            expected = tuple(even_split(c, parts)[p] for c in dense[j::e])
            assert cut[j * parts + p] == expected
            assert all(type(rows) is int for rows in cut[j * parts + p])
            split = sparse_cut[j * parts + p]
            assert isinstance(split, SparseSplits) and split.world == world
            assert tuple(split) == expected
            assert np.all(split.counts != 0) and np.all(np.diff(split.peers) > 0)
