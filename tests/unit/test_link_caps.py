"""A wire's cap under a network dimension: what it slows, and what overlapped compute does not.

Oracles are hand arithmetic on a two-level machine with no latency, and the law that a capped
transfer's time is the larger of the ranks' own time and the wire's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.model import alltoallv_time, simulate
from mc2sim.schedule import Plan, Task, TaskKind
from mc2sim.topology import (
    Contention,
    Device,
    Efficiency,
    LinkKind,
    NetworkDim,
    Topology,
    dump,
    load,
)

DEVICE = Device(
    name="hand",
    matrix_tflops={"float16": 1.0},
    vector_tflops=1.0,
    memory_gbps=1.0,
    launch_us=0.0,
    efficiency=Efficiency(small_util=1.0, large_util=1.0, half_flops=0.0),
    concurrent_collectives=True,
)


def machine(link_gbps: float = 0.0, comm_slowdown: float = 1.0) -> Topology:
    """2 ranks per node (mesh, 10 GB/s), 2 nodes on a switch of 1 GB/s per rank, no latency."""
    return Topology(
        name="capped",
        description="hand-built",
        device=DEVICE,
        network=(
            NetworkDim(kind=LinkKind.FULL_MESH, ranks=2, bandwidth_gbps=10.0, latency_us=0.0),
            NetworkDim(
                kind=LinkKind.SWITCH,
                ranks=2,
                bandwidth_gbps=1.0,
                latency_us=0.0,
                link_gbps=link_gbps,
            ),
        ),  # fmt: skip
        contention=Contention(compute_slowdown=1.0, comm_slowdown=comm_slowdown),
        source="tests",
    )


def even_alltoallv(nbytes: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every one of 4 ranks sends ``nbytes`` to each peer."""
    out = []
    for r in range(4):
        peers = np.array([q for q in range(4) if q != r])
        sent = np.full(3, nbytes)
        out.append((peers, sent, peers, sent))
    return out


def test_a_transfer_moves_at_the_lower_of_the_ranks_rate_and_the_wires() -> None:
    # across nodes each rank sends 2 x 1 MB through its switch port
    assert alltoallv_time(machine(), even_alltoallv(1e6)) == pytest.approx(2e6 / 1e9)
    assert alltoallv_time(machine(link_gbps=0.25), even_alltoallv(1e6)) == pytest.approx(
        2e6 / 0.25e9
    )
    # a wire faster than the ranks changes nothing
    assert alltoallv_time(machine(link_gbps=4.0), even_alltoallv(1e6)) == pytest.approx(2e-3)


def test_link_caps_are_checked_and_survive_a_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError, match="link_gbps"):
        NetworkDim(kind=LinkKind.SWITCH, ranks=2, bandwidth_gbps=1.0, latency_us=0, link_gbps=-1)
    capped = machine(link_gbps=0.125)
    dump(capped, tmp_path / "capped.yaml")
    assert load(tmp_path / "capped.yaml") == capped
    dump(machine(), tmp_path / "plain.yaml")
    assert "link_gbps" not in (tmp_path / "plain.yaml").read_text(), "0 (no cap) is left out"


def overlapped_plans(compute_flops: int, nbytes: int) -> dict[int, Plan]:
    """Each of 4 ranks: an AlltoAllv sending ``nbytes`` to each peer, overlapped by a matmul."""
    plans = {}
    for r in range(4):
        splits = tuple(0 if q == r else nbytes // 64 for q in range(4))
        tasks = (
            Task(
                id=0, name="alltoallv", kind=TaskKind.ALLTOALLV, bytes=3 * nbytes,
                send_splits=splits, recv_splits=splits, row_bytes=64,
            ),
            Task(id=1, name="mm", kind=TaskKind.MATMUL, flops=compute_flops),
        )  # fmt: skip
        plans[r] = Plan(op="x", tiling="t", rank=r, world_size=4, tasks=tasks)
    return plans


def test_overlapped_compute_never_slows_a_transfer_the_wire_holds_back() -> None:
    # 1 MB to each peer: 2 ms across nodes uncapped; a 6 ms matmul runs alongside
    plans = overlapped_plans(compute_flops=6_000_000_000, nbytes=1 << 20)
    uncapped = simulate(plans, machine(comm_slowdown=4.0)).metrics().total_s
    mb = 2 * (1 << 20)
    # uncapped, the transfer advances at 1/4 while the matmul runs: it ends after the matmul
    assert uncapped == pytest.approx(6e-3 + (mb / 1e9 - 6e-3 / 4), rel=1e-9)
    # a wire 8x slower (headroom 8 >= slowdown 4): its pace is the wire's, compute or not
    capped = simulate(plans, machine(link_gbps=0.125, comm_slowdown=4.0)).metrics().total_s
    assert capped == pytest.approx(mb / 0.125e9, rel=1e-9)
    # a wire 2x slower (headroom 2 < 4): slowed to 2/4 of its pace while the matmul runs
    half = simulate(plans, machine(link_gbps=0.5, comm_slowdown=4.0)).metrics().total_s
    assert half == pytest.approx(6e-3 + (mb / 0.5e9 - 6e-3 * 2 / 4), rel=1e-9)


def test_a_cap_never_speeds_anything_up() -> None:
    plans = overlapped_plans(compute_flops=1_000_000_000, nbytes=1 << 18)
    base = simulate(plans, machine(comm_slowdown=3.0)).metrics().total_s
    for link in (8.0, 1.0, 0.5, 0.1):
        topo = machine(link_gbps=link, comm_slowdown=3.0)
        assert simulate(plans, topo).metrics().total_s >= base - 1e-12
    looser = machine(link_gbps=0.2, comm_slowdown=3.0)
    tighter = machine(link_gbps=0.1, comm_slowdown=3.0)
    assert simulate(plans, tighter).metrics().total_s >= simulate(plans, looser).metrics().total_s
