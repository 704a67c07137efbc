"""The simulator where ranks differ, and the calibration's fits, against answers worked on paper.

The machine is chosen so that every task time is a round number of seconds: the matrix unit
does 1e6 FLOP/s (a matmul of ``1e6 * t`` FLOPs takes t s), links carry 1000 B/s, launches
and reductions cost nothing. Plans are written out task by task. No expected time below
comes from :mod:`mc2sim.model.cost` or the simulator: each is derived in the comments.

AllReduce on 2 ranks over one link with latency a: recursive doubling is one exchange of the
whole buffer, ``a + n / B``; the ring's two phases cost ``2 a + n / B``; the model takes the
cheaper, so an AllReduce of ``1000 * t`` bytes takes ``a + t`` s, of which ``a`` is latency.
AlltoAllv on a full mesh without latency: every peer pair has its own link, so a rank is busy
for its largest single send or receive over B, and the collective ends with the busiest rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest

from mc2sim.model.fit import CommSample, fit_contention, fit_network
from mc2sim.model.simulator import simulate, simulate_run
from mc2sim.schedule.plan import Plan, Task, TaskKind
from mc2sim.study.measure import Case
from mc2sim.timeline import RunColumns, Timeline
from mc2sim.topology import Contention, Device, Efficiency, LinkKind, NetworkDim, Topology

FLOPS_PER_S = 1e6
BYTES_PER_S = 1000.0

Spans = dict[tuple[int, str], tuple[float, float]]


def machine(
    world: int,
    *,
    kind: str = "switch",
    latency_s: float = 0.0,
    compute_slowdown: float = 1.0,
    comm_slowdown: float = 1.0,
    concurrent: bool = False,
) -> Topology:
    device = Device(
        name="paper",
        matrix_tflops={"float16": FLOPS_PER_S / 1e12},
        vector_tflops=1.0,
        memory_gbps=1e6,
        efficiency=Efficiency(small_util=1.0, large_util=1.0, half_flops=0.0),
        launch_us=0.0,
        reduce_gbps=0.0,
        concurrent_collectives=concurrent,
    )
    link = NetworkDim(
        kind=LinkKind(kind),
        ranks=world,
        bandwidth_gbps=BYTES_PER_S / 1e9,
        latency_us=latency_s * 1e6,
    )
    return Topology(
        name="paper", description="round numbers", device=device, network=(link,),
        contention=Contention(compute_slowdown=compute_slowdown, comm_slowdown=comm_slowdown),
        source="tests",
    )  # fmt: skip


def mm(seconds: float, *deps: int) -> Task:
    """A matmul of ``seconds`` alone (its id is set by :func:`plan`)."""
    return Task(id=-1, name="mm", kind=TaskKind.MATMUL, deps=deps, flops=int(seconds * 1e6))


def allreduce(seconds: float, *deps: int) -> Task:
    """An AllReduce of ``1000 * seconds`` bytes: ``seconds`` of transfer on 2 ranks."""
    return Task(id=-1, name="ar", kind=TaskKind.ALLREDUCE, deps=deps, bytes=int(seconds * 1e3))


def alltoallv(send: Sequence[int], recv: Sequence[int], rank: int, *deps: int) -> Task:
    """An AlltoAllv of 1000-byte rows: ``send[q]`` rows to rank q, ``recv[q]`` from it."""
    away = sum(n for q, n in enumerate(send) if q != rank)
    return Task(
        id=-1, name="a2a", kind=TaskKind.ALLTOALLV, deps=deps, bytes=away * 1000,
        send_splits=tuple(send), recv_splits=tuple(recv), row_bytes=1000,
    )  # fmt: skip


def plan(rank: int, world: int, *tasks: Task) -> Plan:
    """Number the tasks in order; each is named after its kind and position, e.g. ``mm1``."""
    numbered = tuple(
        Task(
            id=i,
            name=f"{t.name}{i}",
            kind=t.kind,
            deps=t.deps,
            flops=t.flops,
            bytes=t.bytes,
            send_splits=t.send_splits,
            recv_splits=t.recv_splits,
            row_bytes=t.row_bytes,
        )  # fmt: skip
        for i, t in enumerate(tasks)
    )
    return Plan(op="paper", tiling="hand", rank=rank, world_size=world, tasks=numbered)


def spans(timeline: Timeline) -> Spans:
    return {(r.rank, r.name): (r.start_s, r.end_s) for r in timeline.records}


def assert_spans(timeline: Timeline, expected: Spans) -> None:
    got = spans(timeline)
    assert set(got) == set(expected)
    for key, (start, end) in expected.items():
        assert got[key] == pytest.approx((start, end), abs=1e-12), key


# ---------------------------------------------------------------- contention across ranks


def one_rank_computes_while_the_other_waits() -> dict[int, Plan]:
    """Both ranks start a 2 s AllReduce; rank 0 computes 1 s meanwhile, rank 1 waits for it."""
    return {
        0: plan(0, 2, allreduce(2), mm(1)),
        1: plan(1, 2, allreduce(2), mm(1, 0)),
    }


def test_a_transfer_slows_while_any_rank_computes_even_if_the_others_wait() -> None:
    plans = one_rank_computes_while_the_other_waits()
    # both factors 2. [0, 2]: rank 0's matmul runs at 1/2 (1 s of work: done at 2) and the
    # transfer at 1/2 (1 of its 2 s done); [2, 3]: the transfer alone at full speed. Rank 1,
    # idle until then, computes [3, 4].
    timeline = simulate(plans, machine(2, compute_slowdown=2, comm_slowdown=2))
    assert_spans(
        timeline,
        {(0, "ar0"): (0, 3), (0, "mm1"): (0, 2), (1, "ar0"): (0, 3), (1, "mm1"): (3, 4)},
    )
    m = timeline.metrics()
    assert m.critical_rank == 1
    assert (m.total_s, m.compute_s, m.comm_s, m.exposed_comm_s) == (4, 1, 3, 3)
    # comm slowed 3x only: [0, 1] the transfer does 1/3 s of work; the other 5/3 s follow
    timeline = simulate(plans, machine(2, comm_slowdown=3))
    end = 1 + 5 / 3
    assert_spans(
        timeline,
        {
            (0, "ar0"): (0, end),
            (0, "mm1"): (0, 1),
            (1, "ar0"): (0, end),
            (1, "mm1"): (end, end + 1),
        },
    )


def test_a_transfer_stays_slowed_while_ranks_take_turns_computing() -> None:
    # a 3 s AllReduce; rank 0 computes [0, 1], rank 1 computes [0, 2] (compute not slowed).
    # The transfer runs at 1/2 while either computes: 1 s of work by t = 2, 2 s more: ends at 4
    plans = {
        0: plan(0, 2, allreduce(3), mm(1)),
        1: plan(1, 2, allreduce(3), mm(2)),
    }
    timeline = simulate(plans, machine(2, comm_slowdown=2))
    assert_spans(
        timeline,
        {(0, "ar0"): (0, 4), (0, "mm1"): (0, 1), (1, "ar0"): (0, 4), (1, "mm1"): (0, 2)},
    )


def test_compute_is_slowed_on_every_rank_while_a_transfer_runs() -> None:
    # rank 1 computes 4 s during a 1 s transfer, rank 0 waits for the transfer: compute at 1/2
    # and transfer at 1/3 until the transfer's 1 s of work is done at t = 3 (1.5 s of compute
    # done by then); the last 2.5 s of compute at full speed: ends at 5.5
    plans = {
        0: plan(0, 2, allreduce(1), mm(1, 0)),
        1: plan(1, 2, allreduce(1), mm(4)),
    }
    timeline = simulate(plans, machine(2, compute_slowdown=2, comm_slowdown=3))
    assert_spans(
        timeline,
        {(0, "ar0"): (0, 3), (0, "mm1"): (3, 4), (1, "ar0"): (0, 3), (1, "mm1"): (0, 5.5)},
    )


# ---------------------------------------------------------------- stragglers


def test_a_straggler_holds_everyone_in_the_collective_and_its_wait_is_exposed() -> None:
    # 3 ranks on a full mesh. Ranks 0 and 1 compute 1 s, rank 2 (the straggler) 4 s; then an
    # AlltoAllv in which rank 2 sends 2 rows to rank 0 and every other pair 1 row; then 1 s of
    # compute each. The AlltoAllv starts when the last rank joins (t = 4); its busiest link
    # carries 2000 B: 2 s, [4, 6] on every rank; the last matmuls run [6, 7].
    sends = {0: [0, 1, 1], 1: [1, 0, 1], 2: [2, 1, 0]}
    recvs = {q: [sends[r][q] for r in range(3)] for q in range(3)}
    plans = {
        r: plan(r, 3, mm(4 if r == 2 else 1), alltoallv(sends[r], recvs[r], r, 0), mm(1, 1))
        for r in range(3)
    }
    timeline = simulate(plans, machine(3, kind="full_mesh"))
    expected: Spans = {}
    for r in range(3):
        expected[(r, "mm0")] = (0, 4 if r == 2 else 1)
        expected[(r, "a2a1")] = (4, 6)
        expected[(r, "mm2")] = (6, 7)
    assert_spans(timeline, expected)
    m = timeline.metrics()
    zero, one, two = m.per_rank
    # ranks 0 and 1 wait 3 s for the straggler: exposed = 7 - 2 = 5 (3 idle + 2 comm)
    assert (zero.total_s, zero.compute_s, zero.comm_s, zero.exposed_comm_s) == (7, 2, 2, 5)
    assert (one.total_s, one.compute_s, one.comm_s, one.exposed_comm_s) == (7, 2, 2, 5)
    assert (two.total_s, two.compute_s, two.exposed_comm_s) == (7, 5, 2)
    assert m.critical_rank == 0  # all end at 7: the lowest rank


def test_the_busiest_rank_sets_an_uneven_alltoallvs_time() -> None:
    # rank 1 receives 3 rows from rank 0 and 1 from rank 2; every other pair 1 row (or none):
    # rank 1's busiest link carries 3000 B, 3 s for everyone
    sends = {0: [0, 3, 1], 1: [0, 0, 1], 2: [1, 1, 0]}
    recvs = {q: [sends[r][q] for r in range(3)] for q in range(3)}
    plans = {r: plan(r, 3, alltoallv(sends[r], recvs[r], r)) for r in range(3)}
    assert_spans(
        simulate(plans, machine(3, kind="full_mesh")), {(r, "a2a0"): (0, 3) for r in range(3)}
    )


# ---------------------------------------------------------------- collectives in flight


def two_allreduces_then_compute() -> dict[int, Plan]:
    """Every rank starts a 2 s and a 1 s AllReduce back to back, then computes 1 s after both."""
    return {r: plan(r, 2, allreduce(2), allreduce(1), mm(1, 1)) for r in range(2)}


def test_collectives_on_a_stream_queue_one_behind_the_other() -> None:
    # latency 0.5 s: the AllReduces take 2.5 and 1.5 s, one after the other: [0, 2.5], [2.5, 4]
    timeline = simulate(two_allreduces_then_compute(), machine(2, latency_s=0.5))
    expected = {"ar0": (0, 2.5), "ar1": (2.5, 4), "mm2": (4, 5)}
    assert_spans(timeline, {(r, name): s for r in range(2) for name, s in expected.items()})


def test_collectives_in_flight_together_share_latency_but_take_turns_on_the_link() -> None:
    # both start at 0; both latencies [0, 0.5]; ar0's transfer [0.5, 2.5]; ar1's transfer waits
    # for the link: [2.5, 3.5]; the matmul [3.5, 4.5]
    topo = machine(2, latency_s=0.5, concurrent=True)
    timeline = simulate(two_allreduces_then_compute(), topo)
    expected = {"ar0": (0, 2.5), "ar1": (0, 3.5), "mm2": (3.5, 4.5)}
    assert_spans(timeline, {(r, name): s for r in range(2) for name, s in expected.items()})


@pytest.mark.parametrize("concurrent", [False, True], ids=["stream", "in-flight-together"])
def test_a_collective_issued_during_another_waits_for_it(concurrent: bool) -> None:
    # every rank: a 2 s AllReduce, 0.5 s of compute, a 1 s AllReduce, 1 s of compute after it;
    # latency 0.5 s. ar0 runs [0, 2.5]; ar2 is issued at 0.5. On a stream it starts when ar0
    # ends: [2.5, 4]. In flight together it starts at once: latency [0.5, 1], then it waits for
    # the link until 2.5 and transfers [2.5, 3.5]
    plans = {r: plan(r, 2, allreduce(2), mm(0.5), allreduce(1), mm(1, 2)) for r in range(2)}
    timeline = simulate(plans, machine(2, latency_s=0.5, concurrent=concurrent))
    ar2 = (0.5, 3.5) if concurrent else (2.5, 4)
    expected = {"ar0": (0, 2.5), "mm1": (0, 0.5), "ar2": ar2, "mm3": (ar2[1], ar2[1] + 1)}
    assert_spans(timeline, {(r, name): s for r in range(2) for name, s in expected.items()})


def test_a_collective_joined_late_starts_with_its_last_rank() -> None:
    # rank 1 computes 3 s before its second AllReduce; rank 0 queued it at 0. ar1 starts at 3
    # (latency [3, 3.5], the link free since 2.5), transfer [3.5, 4.5]
    plans = {
        0: plan(0, 2, allreduce(2), allreduce(1), mm(1, 1)),
        1: plan(1, 2, allreduce(2), mm(3), allreduce(1, 1), mm(1, 2)),
    }
    timeline = simulate(plans, machine(2, latency_s=0.5, concurrent=True))
    assert_spans(
        timeline,
        {
            (0, "ar0"): (0, 2.5), (0, "ar1"): (3, 4.5), (0, "mm2"): (4.5, 5.5),
            (1, "ar0"): (0, 2.5), (1, "mm1"): (0, 3), (1, "ar2"): (3, 4.5), (1, "mm3"): (4.5, 5.5),
        },
    )  # fmt: skip


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "events"])
@pytest.mark.parametrize(
    ("concurrent", "alone", "expected"),
    [
        (False, (), {"ar0": (0, 2.5), "ar1": (2.5, 4), "a2a2": (4, 5.5)}),
        (True, (), {"ar0": (0, 2.5), "ar1": (0, 3.5), "a2a2": (0, 4.5)}),
        (True, ("allreduce",), {"ar0": (0, 2.5), "ar1": (2.5, 4), "a2a2": (2.5, 5)}),
        (True, ("alltoallv",), {"ar0": (0, 2.5), "ar1": (0, 3.5), "a2a2": (3.5, 5)}),
    ],
    ids=["stream", "together", "allreduces-alone", "alltoallvs-alone"],
)
def test_kinds_that_run_one_at_a_time_start_once_every_collective_before_has_ended(
    concurrent: bool,
    alone: tuple[str, ...],
    expected: dict[str, tuple[float, float]],
    lockstep: bool,
) -> None:
    # every rank queues a 2 s AllReduce, a 1 s one and a 1000-byte AlltoAllv at 0; latency
    # 0.5 s: they take 2.5, 1.5 and 1.5 s alone. A stream runs them in turn. Together, each
    # starts at 0: latencies [0, 0.5], transfers in turn from 0.5 (ends 2.5, 3.5, 4.5). With
    # the AllReduces one at a time, ar1 starts when ar0 ends (2.5: latency to 3, transfer to
    # 4), and the AlltoAllv with it (latency [2.5, 3]; its transfer after ar1's: [4, 5]).
    # With the AlltoAllvs one at a time, it starts when ar1 ends (3.5: latency to 4, transfer
    # to 5)
    plans = {
        r: plan(r, 2, allreduce(2), allreduce(1), alltoallv([1, 1], [1, 1], r)) for r in range(2)
    }
    topo = machine(2, latency_s=0.5, concurrent=concurrent)
    topo = replace(topo, device=replace(topo.device, one_at_a_time=alone))
    run, _ = simulate_run(plans, topo, lockstep=lockstep)
    assert isinstance(run, RunColumns) is lockstep
    timeline = run.timeline() if isinstance(run, RunColumns) else run
    assert_spans(timeline, {(r, name): s for r in range(2) for name, s in expected.items()})


# ---------------------------------------------------------------- calibration


def closed_form(kind: str, nbytes: float, p: int, alpha: float, beta: float, inv_r: float) -> float:
    """Seconds of one collective on a full mesh of p ranks (the module docstring's algorithms).

    AllReduce: reduce-scatter then all-gather, each one message of n/p to every peer at once
    (2 alpha + 2 n/p beta), plus adding (p-1)/p n received bytes; or recursive doubling,
    ceil(log2 p) exchanges of all n bytes, each added. AllGather of an n-byte result: one
    message of n/p (alpha + n/p beta). ReduceScatter of n bytes: the same, plus (p-1)/p n added.
    AlltoAllv of n bytes per rank spread evenly: p - 1 messages of n/p on separate links.
    """
    if kind == "allreduce":
        ring = 2 * alpha + 2 * nbytes / p * beta + (p - 1) / p * nbytes * inv_r
        rounds = math.ceil(math.log2(p))
        return min(ring, rounds * (alpha + nbytes * beta + nbytes * inv_r))
    if kind == "allgather":
        return alpha + nbytes / p * beta
    if kind == "reduce_scatter":
        return alpha + nbytes / p * beta + (p - 1) / p * nbytes * inv_r
    return (p - 1) * alpha + nbytes / p * beta


@pytest.mark.parametrize("world", [2, 4])
def test_fit_network_recovers_a_full_mesh_from_closed_form_samples(world: int) -> None:
    alpha, gbps, reduce_gbps = 80e-6, 3.0, 1.2
    beta, inv_r = 1 / (gbps * 1e9), 1 / (reduce_gbps * 1e9)
    samples = [
        CommSample(kind=kind, nbytes=n, seconds=closed_form(kind, n, world, alpha, beta, inv_r))
        for kind in ("allreduce", "allgather", "reduce_scatter", "alltoallv")
        for n in (2e4, 3e5, 4e6, 1.6e7)
    ]
    dim, fitted_reduce = fit_network(samples, world)
    assert dim.kind is LinkKind.FULL_MESH and dim.ranks == world
    assert dim.latency_us == pytest.approx(80.0, rel=1e-6)
    assert dim.bandwidth_gbps == pytest.approx(gbps, rel=1e-6)
    assert fitted_reduce == pytest.approx(reduce_gbps, rel=1e-6)


def test_fit_contention_recovers_the_factors_that_made_the_spans() -> None:
    # Spans of three hand plans on 2 ranks at compute slowdown 1.5 and comm slowdown 4,
    # collectives one at a time (every task on both ranks alike):
    #  X: a 1 s AllReduce under 4 s of compute. The transfer, at 1/4, ends at 4 with 4/1.5 s of
    #     compute done; the remaining 4/3 s at full speed: 4 + 4/3.
    #  Y: a 4 s AllReduce under 1 s of compute. The compute, at 1/1.5, ends at 1.5 with 1.5/4
    #     of the transfer done; the remaining 3.625 s at full speed: 5.125.
    #  Z: a 2 s AllReduce, then a 1 s matmul that needs it: nothing overlaps, 3.
    cases = [
        Case(name="X", tiling="tiles=2", run=lambda: None, plans=tuple(plan(r, 2, allreduce(1), mm(4)) for r in (0, 1))),
        Case(name="Y", tiling="tiles=2", run=lambda: None, plans=tuple(plan(r, 2, allreduce(4), mm(1)) for r in (0, 1))),
        Case(name="Z", tiling="tiles=2", run=lambda: None, plans=tuple(plan(r, 2, allreduce(2), mm(1, 0)) for r in (0, 1))),
    ]  # fmt: skip
    measured = [[4 + 4 / 3], [5.125], [3.0]]
    fitted = fit_contention(machine(2), cases, measured)
    assert (fitted.contention.compute_slowdown, fitted.contention.comm_slowdown) == (1.5, 4.0)


@pytest.mark.parametrize("outlier", [1.5, 2.0, 3.0])
def test_fit_contention_is_not_steered_by_a_call_it_cannot_follow(outlier: float) -> None:
    # X and Y of the test above, at compute slowdown 1.5 and comm slowdown 4: X measured twice
    # at 4 + 4/3 s, and a third time at `outlier` times that (a call the model cannot follow;
    # no grid point gives one plan two spans). The sum of absolute log errors is least at the
    # factors that made the others (the outlier's error then is ln(outlier), X's 0); squared,
    # X's best span would be 4 + 4/3 times outlier ** (1/3), off every true factor
    def case(name: str, *tasks: Task) -> Case:
        plans = tuple(plan(r, 2, *tasks) for r in (0, 1))
        return Case(name=name, tiling="tiles=2", run=lambda: None, plans=plans)

    x = 4 + 4 / 3
    cases = [case(n, allreduce(1), mm(4)) for n in ("X", "X again", "X off")]
    cases.append(case("Y", allreduce(4), mm(1)))
    fitted = fit_contention(machine(2), cases, [[x], [x], [x * outlier], [5.125]]).contention
    assert (fitted.compute_slowdown, fitted.comm_slowdown, fitted.polled) == (1.5, 4.0, False)


@pytest.mark.parametrize(
    ("span", "together", "alone"),
    [(5.5, False, ()), (4.5, True, ()), (5.0, True, ("allgather", "allreduce", "reduce_scatter"))],
    ids=["stream", "together", "reductions-alone"],
)
def test_fit_contention_finds_how_collectives_in_flight_progress(
    span: float, together: bool, alone: tuple[str, ...]
) -> None:
    # the three collectives of test_kinds_that_run_one_at_a_time_start_once_every_collective_
    # before_has_ended end at 5.5 on a stream, 4.5 together, 5 with the AllReduces one at a
    # time. The 2 ranks share a core (the reductions alone are tried only there); with no
    # wait for a peer off its core (slice 0, the grid's first) the times are the same
    case = Case(name="three", tiling="tiles=3", run=lambda: None, plans=three_collectives())
    shared = machine(2, latency_s=0.5)
    shared = replace(shared, device=replace(shared.device, cores_per_node=1.0))
    assert shared.core_share == 0.5
    fitted = fit_contention(shared, [case], [[span]])
    assert fitted.device.concurrent_collectives is together
    assert fitted.device.one_at_a_time == alone
    assert fitted.device.slice_us == 0.0


def test_fit_contention_tries_kinds_alone_only_where_ranks_share_cores() -> None:
    # each rank a core: 5 s, the AllReduces-alone span, is not on the grid; one at a time
    # (5.5) is nearer in log than together (4.5)
    case = Case(name="three", tiling="tiles=3", run=lambda: None, plans=three_collectives())
    fitted = fit_contention(machine(2, latency_s=0.5), [case], [[5.0]])
    assert not fitted.device.concurrent_collectives and fitted.device.one_at_a_time == ()


def three_collectives() -> tuple[Plan, ...]:
    """Every rank: a 2 s AllReduce, a 1 s one and a 1000-byte AlltoAllv, all queued at 0."""
    return tuple(
        plan(r, 2, allreduce(2), allreduce(1), alltoallv([1, 1], [1, 1], r)) for r in range(2)
    )
