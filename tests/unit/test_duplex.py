"""Whose work moves a transfer's bytes (``NetworkDim.duplex``), against answers worked on paper.

One switch of 4 ranks at 1 GB/s per port (1 MB takes 1 ms), no latency unless a test sets
it. A rank that sends S and receives R bytes takes max(S, R) on a ``full`` duplex port,
S + R where one engine moves both ways (``half``) and R where the receiver moves the bytes
(``receiver``); a wire's cap (``link_gbps``) is full duplex whatever the ranks' work.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.model.cost import (
    allgather_time,
    allreduce_time,
    alltoallv_time,
    loads_alltoallv_time,
    rank_alltoallv_time,
)
from mc2sim.model.fit import CommSample, LevelSamples, fit_levels
from mc2sim.schedule.plan import AlltoAllvLoads, SideLoads
from mc2sim.study.calibrate import nearest_duplex
from mc2sim.topology import Contention, Duplex, LinkKind, NetworkDim, Topology, dump, load
from tests.unit.test_traffic import DEVICE

MB = 1e6


def machine(duplex: Duplex, *, latency_us: float = 0.0, link_gbps: float = 0.0) -> Topology:
    return Topology(
        name="hand_duplex",
        description="hand-built",
        device=DEVICE,  # 1 TFLOP/s, 1 GB/s, no launch: only the links matter here
        network=(
            NetworkDim(
                kind=LinkKind.SWITCH,
                ranks=4,
                bandwidth_gbps=1.0,
                latency_us=latency_us,
                link_gbps=link_gbps,
                duplex=duplex,
            ),
        ),
        contention=Contention(),
        source="tests",
    )


def splits(
    matrix: list[list[float]],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``matrix[i][j]``: bytes rank i sends rank j, as :func:`alltoallv_time`'s splits."""
    out = []
    for r, row in enumerate(matrix):
        to = [j for j, b in enumerate(row) if b > 0 and j != r]
        come = [i for i, other in enumerate(matrix) if other[r] > 0 and i != r]
        out.append(
            (
                np.array(to, dtype=np.int64),
                np.array([row[j] for j in to]),
                np.array(come, dtype=np.int64),
                np.array([matrix[i][r] for i in come]),
            )
        )
    return out


# rank 0 sends 1 MB to each peer: it sends 3 MB, each other rank receives 1 MB
ONE_TO_ALL: list[list[float]] = [[0, MB, MB, MB], [0] * 4, [0] * 4, [0] * 4]
# pairs 0-1 and 2-3 swap 1 MB: every rank sends and receives 1 MB
BOTH_WAYS: list[list[float]] = [[0, MB, 0, 0], [MB, 0, 0, 0], [0, 0, 0, MB], [0, 0, MB, 0]]
# 0 -> 1 and 2 -> 3 only
ONE_WAY: list[list[float]] = [[0, MB, 0, 0], [0] * 4, [0, 0, 0, MB], [0] * 4]
# every rank sends 1 MB to every peer: 3 MB each way
UNIFORM: list[list[float]] = [[0 if i == j else MB for j in range(4)] for i in range(4)]


@pytest.mark.parametrize(
    ("duplex", "pattern", "ms"),
    [
        (Duplex.FULL, ONE_TO_ALL, 3.0),  # rank 0's port sends 3 MB
        (Duplex.HALF, ONE_TO_ALL, 3.0),  # rank 0 moves 3 MB out, nothing in
        (Duplex.RECEIVER, ONE_TO_ALL, 1.0),  # each receiver copies its 1 MB
        (Duplex.FULL, BOTH_WAYS, 1.0),
        (Duplex.HALF, BOTH_WAYS, 2.0),  # 1 MB out and 1 MB in through one engine
        (Duplex.RECEIVER, BOTH_WAYS, 1.0),
        (Duplex.FULL, ONE_WAY, 1.0),
        (Duplex.HALF, ONE_WAY, 1.0),
        (Duplex.RECEIVER, ONE_WAY, 1.0),
        (Duplex.FULL, UNIFORM, 3.0),
        (Duplex.HALF, UNIFORM, 6.0),
        (Duplex.RECEIVER, UNIFORM, 3.0),
    ],
)
def test_an_alltoallv_costs_each_rank_its_ways_by_the_duplex(
    duplex: Duplex, pattern: list[list[float]], ms: float
) -> None:
    assert alltoallv_time(machine(duplex), splits(pattern)) == pytest.approx(ms * 1e-3)


def test_one_rank_alone_and_every_rank_at_once_agree() -> None:
    # rank 0 of ONE_TO_ALL on its own: 3 MB out (half), nothing in (receiver: no bytes)
    for duplex, ms in ((Duplex.HALF, 3.0), (Duplex.RECEIVER, 0.0), (Duplex.FULL, 3.0)):
        parts = splits(ONE_TO_ALL)[0]
        alone = rank_alltoallv_time(machine(duplex), 0, *parts)
        assert alone == pytest.approx(ms * 1e-3)
    # rank 1 of BOTH_WAYS: 1 MB each way
    parts = splits(BOTH_WAYS)[1]
    assert rank_alltoallv_time(machine(Duplex.HALF), 1, *parts) == pytest.approx(2e-3)


def test_latency_is_paid_once_per_peer_of_the_way_that_talks_to_more() -> None:
    # 1 ms of latency per peer: rank 0 talks to 3 peers; receivers to 1
    half = machine(Duplex.HALF, latency_us=1000.0)
    assert alltoallv_time(half, splits(ONE_TO_ALL)) == pytest.approx(3e-3 + 3e-3)
    receiver = machine(Duplex.RECEIVER, latency_us=1000.0)
    # rank 0: no bytes to copy, 3 latencies; a receiver: 1 ms of bytes, 1 latency
    assert alltoallv_time(receiver, splits(ONE_TO_ALL)) == pytest.approx(3e-3)


def test_a_wire_cap_is_full_duplex_under_any_ranks_work() -> None:
    # a 0.25 GB/s wire carries each way apart: 1 MB each way takes 4 ms, not 8
    half = machine(Duplex.HALF, link_gbps=0.25)
    assert alltoallv_time(half, splits(BOTH_WAYS)) == pytest.approx(4e-3)
    # a 0.75 GB/s wire: the engine's 2 MB at 1 GB/s (2 ms) is slower than 1 MB / 0.75 GB/s
    looser = machine(Duplex.HALF, link_gbps=0.75)
    assert alltoallv_time(looser, splits(BOTH_WAYS)) == pytest.approx(2e-3)
    receiver = machine(Duplex.RECEIVER, link_gbps=0.5)  # rank 0's 3 MB out at 0.5 GB/s
    assert alltoallv_time(receiver, splits(ONE_TO_ALL)) == pytest.approx(6e-3)


def side(bytes_by_rank: list[float], peers: list[float]) -> SideLoads:
    total = np.array([bytes_by_rank], dtype=np.float64)
    return SideLoads(total=total, largest=total, peers=np.array([peers], dtype=np.float64))


@pytest.mark.parametrize(
    ("duplex", "ms"), [(Duplex.FULL, 3), (Duplex.HALF, 3), (Duplex.RECEIVER, 1)]
)
def test_loads_cost_as_the_pairs_they_sum(duplex: Duplex, ms: float) -> None:
    loads = AlltoAllvLoads(
        send=side([3 * MB, 0, 0, 0], [3, 0, 0, 0]), recv=side([0, MB, MB, MB], [0, 1, 1, 1])
    )
    topo = machine(duplex)
    assert loads_alltoallv_time(topo, loads) == pytest.approx(ms * 1e-3)
    assert loads_alltoallv_time(topo, loads) == pytest.approx(
        alltoallv_time(topo, splits(ONE_TO_ALL))
    )


def test_a_symmetric_exchange_costs_twice_its_bytes_on_a_half_duplex_dimension() -> None:
    # an AllGather of 4 MB on a ring of 4: 3 steps of 1 MB each way
    assert allgather_time(machine(Duplex.FULL), 4 * MB) == pytest.approx(3e-3)
    assert allgather_time(machine(Duplex.HALF), 4 * MB) == pytest.approx(6e-3)
    assert allgather_time(machine(Duplex.RECEIVER), 4 * MB) == pytest.approx(3e-3)
    # an AllReduce of 4 MB: ring (2 x 3 steps of 1 MB) or doubling (2 x 4 MB); reductions free
    for duplex, ms in ((Duplex.FULL, 6.0), (Duplex.HALF, 12.0)):
        topo = machine(duplex)
        topo = dataclasses.replace(topo, device=dataclasses.replace(topo.device, reduce_gbps=0.0))
        assert allreduce_time(topo, 4 * MB) == pytest.approx(ms * 1e-3)


def test_the_fit_reads_a_half_duplex_level_as_twice_the_rate() -> None:
    # samples timed on the half duplex machine at 2 GB/s and 5 us: the fit recovers both,
    # and, read as full duplex, the same samples give 1 GB/s
    true = dataclasses.replace(
        machine(Duplex.HALF, latency_us=5.0),
        network=(
            dataclasses.replace(
                machine(Duplex.HALF).network[0], bandwidth_gbps=2.0, latency_us=5.0
            ),
        ),
    )
    samples = [
        CommSample(
            kind="alltoallv",
            nbytes=n,
            seconds=alltoallv_time(
                true, splits([[0 if i == j else n / 4 for j in range(4)] for i in range(4)])
            ),
        )
        for n in (4e3, 4e5, 4e6)
    ] + [
        CommSample(kind="allgather", nbytes=n, seconds=allgather_time(true, n)) for n in (4e4, 4e6)
    ]
    for duplex, gbps in ((Duplex.HALF, 2.0), (Duplex.FULL, 1.0)):
        (dim,), _ = fit_levels(
            [
                LevelSamples(
                    name="l", world=4, samples=samples, kinds=(LinkKind.SWITCH,), duplex=duplex
                )
            ]
        )
        assert dim.duplex is duplex
        assert dim.bandwidth_gbps == pytest.approx(gbps, rel=1e-6)
        assert dim.latency_us == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize(
    ("both_ways", "one_to_all", "ranks", "duplex"),
    [
        (1.93, 0.97, 8, Duplex.HALF),  # Open MPI without single copy, 16-core host
        (2.0, 1.1, 4, Duplex.HALF),
        (1.03, 0.47, 4, Duplex.RECEIVER),  # MPICH, 4 ranks on 2 cores
        (1.0, 0.15, 8, Duplex.RECEIVER),
        (0.97, 0.96, 2, Duplex.FULL),  # MPICH, 2 ranks
        (1.0, 1.0, 2, Duplex.FULL),  # 2 ranks cannot tell receiver from full: full
        (1.05, 1.0, 8, Duplex.FULL),
    ],
)
def test_the_measured_ratios_pick_the_nearest_duplex(
    both_ways: float, one_to_all: float, ranks: int, duplex: Duplex
) -> None:
    assert nearest_duplex(both_ways, one_to_all, ranks) is duplex


def test_the_duplex_is_checked_and_survives_a_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ParamInvalidError, match=r"duplex.*'full', 'half', 'receiver'"):
        NetworkDim(kind=LinkKind.SWITCH, ranks=2, bandwidth_gbps=1.0, latency_us=0, duplex="both")  # type: ignore[arg-type]
    half = machine(Duplex.HALF)
    dump(half, tmp_path / "half.yaml")
    assert "duplex: half" in (tmp_path / "half.yaml").read_text()
    assert load(tmp_path / "half.yaml") == half
    dump(machine(Duplex.FULL), tmp_path / "full.yaml")
    assert "duplex:" not in (tmp_path / "full.yaml").read_text(), "full (the default) is left out"
    text = (tmp_path / "half.yaml").read_text().replace("duplex: half", "duplex: sideways")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamInvalidError, match=r"network\[0\]\.duplex"):
        load(tmp_path / "bad.yaml")
    assert math.isfinite(alltoallv_time(half, splits(UNIFORM)))
