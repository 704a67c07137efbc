"""Ranks sharing cores, polled progress and the issue overhead, against answers worked on paper.

The machine of :mod:`tests.unit.test_simulator_by_hand` (a matmul of ``1e6 * t`` FLOPs takes
t s on a whole core, links carry 1000 B/s, no launch or latency), with the three figures of
this module set one at a time. Every expected time is derived in the comments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from mc2sim.errors import ParamInvalidError
from mc2sim.model.cost import compute_time, issue_time
from mc2sim.model.simulator import lockstep_applies, simulate
from mc2sim.schedule.plan import Plan, Task, TaskKind
from mc2sim.topology import Contention, NetworkDim, Topology, dump, load
from tests.unit.test_simulator_by_hand import (
    Spans,
    allreduce,
    alltoallv,
    assert_spans,
    machine,
    mm,
    plan,
)


def with_device(topology: Topology, **changes: Any) -> Topology:
    return dataclasses.replace(topology, device=dataclasses.replace(topology.device, **changes))


@pytest.mark.parametrize(
    ("ranks", "cores", "share"),
    [(2, 0, 1.0), (2, 2, 1.0), (4, 2, 0.5), (8, 2, 0.25), (3, 2, 2 / 3), (2, 16, 1.0)],
)
def test_a_rank_runs_at_its_share_of_the_nodes_cores(ranks: int, cores: int, share: float) -> None:
    topo = with_device(machine(ranks), cores_per_node=cores, issue_us=1e6)
    assert topo.core_share == pytest.approx(share)
    task = mm(3).__class__(id=0, name="mm", kind=mm(3).kind, flops=3_000_000)
    # 3 s on a whole core; at a share s of a core, 3 / s
    assert compute_time(task, topo, "float16") == pytest.approx(3 / share)
    assert issue_time(topo, allreduce(1)) == pytest.approx(1 / share)  # 1 s of issue overhead


def test_the_share_is_per_node_not_per_job() -> None:
    # 2 nodes x 4 ranks, 2 cores a node: each rank gets half a core
    topo = machine(4)
    inner = dataclasses.replace(topo.network[0], ranks=4)
    outer = NetworkDim(kind=inner.kind, ranks=2, bandwidth_gbps=1e-6, latency_us=0.0)
    topo = dataclasses.replace(topo, network=(inner, outer))
    assert with_device(topo, cores_per_node=2).core_share == 0.5
    assert with_device(topo, cores_per_node=8).core_share == 1.0


def test_polled_progress_stops_a_transfer_while_a_rank_computes() -> None:
    # a 2 s AllReduce; rank 0 computes 1 s meanwhile, rank 1 waits for it. Polled: the
    # transfer makes no progress in [0, 1] and takes its 2 s after: [1, 3]; rank 1's matmul
    # [3, 4]. (Unpolled with comm_slowdown 1 it would end at 2.)
    plans = {0: plan(0, 2, allreduce(2), mm(1)), 1: plan(1, 2, allreduce(2), mm(1, 0))}
    topo = dataclasses.replace(machine(2), contention=Contention(polled=True))
    assert_spans(
        simulate(plans, topo),
        {(0, "ar0"): (0, 3), (0, "mm1"): (0, 1), (1, "ar0"): (0, 3), (1, "mm1"): (3, 4)},
    )


def test_polled_progress_moves_an_alltoallv_at_the_share_of_ranks_not_computing() -> None:
    # the same, an AlltoAllv of 2 s (2000 bytes each way): a rank waiting inside MPI copies
    # what its peer posted, so while 1 of the 2 ranks computes [0, 1] it goes on at 1/2: 0.5 s
    # of its 2 s done, the other 1.5 s at full rate: [0, 2.5]; rank 1's matmul [2.5, 3.5]
    plans = {
        0: plan(0, 2, alltoallv([0, 2], [0, 2], 0), mm(1)),
        1: plan(1, 2, alltoallv([2, 0], [2, 0], 1), mm(1, 0)),
    }
    topo = dataclasses.replace(machine(2), contention=Contention(polled=True))
    assert_spans(
        simulate(plans, topo),
        {(0, "a2a0"): (0, 2.5), (0, "mm1"): (0, 1), (1, "a2a0"): (0, 2.5), (1, "mm1"): (2.5, 3.5)},
    )


@pytest.mark.parametrize(
    ("kind", "polled", "expected"),
    [
        # polled, a 2 s AllReduce: its transfer stops while rank 0 computes, so it slows
        # nothing: the matmul [0, 1] at full speed, the transfer's 2 s after it [1, 3]
        ("allreduce", True, {"mm1": (0, 1), "comm": (0, 3), "after": (3, 4)}),
        # polled, a 2 s AlltoAllv: the waiting rank moves it at 1/2 while rank 0 computes,
        # and the matmul runs at 1 / compute_slowdown = 1/2: [0, 2]; the transfer has 1 s of
        # its 2 done then, the rest at full rate [2, 3]
        ("alltoallv", True, {"mm1": (0, 2), "comm": (0, 3), "after": (3, 4)}),
        # unpolled, the AllReduce goes on at full rate (comm_slowdown 1) and slows the
        # matmul to 1/2: [0, 2]; the transfer [0, 2]
        ("allreduce", False, {"mm1": (0, 2), "comm": (0, 2), "after": (2, 3)}),
        # polled, the 2 ranks sharing 1 core (each at 1/2 of it): the fitted factor stays
        # on every transfer there, so the matmul's 1 s of a core takes 2 s at 1/2 of a core,
        # slowed to 1/2 again: [0, 4]; the AllReduce's 2 s after it [4, 6], and rank 1's
        # matmul [6, 8]
        ("shared", True, {"mm1": (0, 4), "comm": (0, 6), "after": (6, 8)}),
    ],
)
def test_a_transfer_slows_compute_only_while_the_ranks_compute_beside_it(
    kind: str, polled: bool, expected: dict[str, tuple[float, float]]
) -> None:
    if kind in ("allreduce", "shared"):
        first: list[Task] = [allreduce(2), allreduce(2)]
        name = "ar0"
    else:
        first = [alltoallv([0, 2], [0, 2], 0), alltoallv([2, 0], [2, 0], 1)]
        name = "a2a0"
    plans = {0: plan(0, 2, first[0], mm(1)), 1: plan(1, 2, first[1], mm(1, 0))}
    topo = dataclasses.replace(
        machine(2), contention=Contention(compute_slowdown=2.0, polled=polled)
    )
    if kind == "shared":
        topo = with_device(topo, cores_per_node=1)
    comm, after = expected["comm"], expected["after"]
    assert_spans(
        simulate(plans, topo),
        {(0, "mm1"): expected["mm1"], (0, name): comm, (1, name): comm, (1, "mm1"): after},
    )


def grouped_machine(*, polled: bool = True, concurrent: bool = True) -> Topology:
    """2 ranks, AllReduces profiled.

    1000 bytes take 3 s (the model's 1 s, ratio 3), 2000 take 4 s (the model's 2 s, ratio 2).
    """
    from mc2sim.topology import ProfilePoint

    profile = tuple(
        ProfilePoint(kind="allreduce", dtype="", flops=0.0, bytes=n, us=us, ranks=2)
        for n, us in ((1000.0, 3e6), (2000.0, 4e6))
    )
    topo = with_device(machine(2), profile=profile, concurrent_collectives=concurrent)
    return dataclasses.replace(topo, contention=Contention(polled=polled))


def two_tiles() -> dict[int, Plan]:
    """Each rank: a 1 s tile, its 1000-byte AllReduce, a 3 s tile, its AllReduce."""
    return {r: plan(r, 2, mm(1), allreduce(1, 0), mm(3, 0), allreduce(1, 2)) for r in range(2)}


def test_allreduces_in_flight_together_pay_the_ratio_of_their_combined_bytes() -> None:
    # ar1 starts at 1 (3 s: 1 s modelled x 3) but waits while the ranks compute mm2 [1, 4]
    # (polled). At 4 ar3 is posted: 2000 bytes of AllReduce in flight, whose ratio is 2, not
    # 3, so both transfers take 2/3 of their time: ar1's 3 s left -> 2, [4, 6]; ar3's 3 -> 2,
    # after ar1 on the links: [6, 8]. The two take 4 s from 4: one AllReduce of 2000 bytes
    spans: Spans = {(r, "mm0"): (0, 1) for r in range(2)}
    spans |= {(r, "mm2"): (1, 4) for r in range(2)}
    spans |= {(r, "ar1"): (1, 6) for r in range(2)} | {(r, "ar3"): (4, 8) for r in range(2)}
    assert_spans(simulate(two_tiles(), grouped_machine()), spans)


@pytest.mark.parametrize(
    ("polled", "concurrent"), [(True, False), (False, True)], ids=["stream", "progressing"]
)
def test_collectives_move_apart_on_a_stream_or_where_they_progress_alone(
    polled: bool, concurrent: bool
) -> None:
    # a stream runs ar1 alone before ar3 is queued; without polling ar1 moves while the ranks
    # compute: [1, 4] done before ar3 is posted; either way each pays its own ratio, 3 s
    ends = {(True, False): (7, 10), (False, True): (4, 7)}[(polled, concurrent)]
    timeline = simulate(two_tiles(), grouped_machine(polled=polled, concurrent=concurrent))
    got = {r.name: r.end_s for r in timeline.records if r.rank == 0}
    assert (got["ar1"], got["ar3"]) == pytest.approx(ends)


def test_polled_progress_on_a_capped_wire_keeps_the_wires_part() -> None:
    # the link's own rate is 1000 B/s; a wire capped at 250 B/s makes the 2000-byte AllReduce
    # take 8 s where the ranks' own work would take 2 s: headroom 4. While rank 0 computes
    # [0, 2] the transfer goes on at 1 - 1/4 = 3/4: 1.5 s of its 8 s done; the other 6.5 s at
    # full rate: it ends at 8.5
    plans = {0: plan(0, 2, allreduce(2), mm(2)), 1: plan(1, 2, allreduce(2), mm(1, 0))}
    topo = machine(2)
    capped = dataclasses.replace(topo.network[0], link_gbps=250 / 1e9)
    topo = dataclasses.replace(topo, network=(capped,), contention=Contention(polled=True))
    assert_spans(
        simulate(plans, topo),
        {(0, "ar0"): (0, 8.5), (0, "mm1"): (0, 2), (1, "ar0"): (0, 8.5), (1, "mm1"): (8.5, 9.5)},
    )


def test_posting_a_collective_holds_the_issuer() -> None:
    # o = 0.25 s. Rank 0: ar0 (1 s), mm1 (1 s), ar2 (1 s), mm3 (1 s) after ar2. Rank 1 the
    # same. Each posts ar0 over [0, 0.25]: it starts at 0.25 and ends at 1.25; mm1 runs
    # [0.25, 1.25] (no contention factors); ar2 posted [1.25, 1.5], runs [1.5, 2.5]; mm3 waits
    # for it: [2.5, 3.5]
    plans = {r: plan(r, 2, allreduce(1), mm(1), allreduce(1), mm(1, 2)) for r in range(2)}
    topo = with_device(machine(2), issue_us=0.25e6)
    expected = {"ar0": (0.25, 1.25), "mm1": (0.25, 1.25), "ar2": (1.5, 2.5), "mm3": (2.5, 3.5)}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(2) for n, s in expected.items()})


@pytest.mark.parametrize("polled", [True, False], ids=["polled", "progressing"])
def test_a_post_stops_a_polled_transfer_as_compute_does(polled: bool) -> None:
    # o = 1 s. Every rank posts a 2 s AllReduce over [0, 1] (it starts at 1), then a 1 s
    # one over [1, 2]. A post is CPU work on the rank's core: where progress is polled the
    # first transfer stands still while the ranks post the second, so it runs [1, 2] not at
    # all and ends at 4, and the second follows on the stream: [4, 5]. Progressing on its
    # own (no slowdown) the first ends at 3 and the second runs [3, 4]
    plans = {r: plan(r, 2, allreduce(2), allreduce(1)) for r in range(2)}
    topo = dataclasses.replace(
        with_device(machine(2), issue_us=1e6), contention=Contention(polled=polled)
    )
    first, second = ((1, 4), (4, 5)) if polled else ((1, 3), (3, 4))
    expected = {"ar0": first, "ar1": second}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(2) for n, s in expected.items()})


def test_posting_a_float32_reduction_copies_its_bytes_on_the_issuer() -> None:
    # o = 0.25 s, and a reduction's float32 copy at 2000 B/s: the 1000-byte AllReduce posts
    # over [0, 0.75]; in float32 it moves 2000 B at 1000 B/s: [0.75, 2.75]; mm1 after the
    # post: [0.75, 1.75]. Without float32 copies the post is o alone, the transfer 1 s
    plans = {r: plan(r, 2, allreduce(1), mm(1)) for r in range(2)}
    wide = with_device(machine(2), issue_us=0.25e6, issue_gbps=2e-6, reductions_in_float32=True)
    expected = {"ar0": (0.75, 2.75), "mm1": (0.75, 1.75)}
    assert_spans(simulate(plans, wide), {(r, n): s for r in range(2) for n, s in expected.items()})
    narrow = with_device(wide, reductions_in_float32=False)
    expected = {"ar0": (0.25, 1.25), "mm1": (0.25, 1.25)}
    assert_spans(
        simulate(plans, narrow), {(r, n): s for r in range(2) for n, s in expected.items()}
    )
    # only the reductions copy: an AlltoAllv of 3000 B posts in o
    assert issue_time(wide, alltoallv([0, 3], [0, 3], 0)) == pytest.approx(0.25)
    # at half a core, the copy too takes twice as long
    half = with_device(wide, cores_per_node=1)
    assert issue_time(half, allreduce(1)) == pytest.approx(2 * 0.75)


def test_each_kind_of_post_adds_its_own_extra_to_the_bare_post() -> None:
    # o = 0.25 s bare; an AlltoAllv's post 0.5 s more, an AllReduce's 0.125 s more, and its
    # float32 copy of 1000 B at 2000 B/s 0.5 s: ar0 posts over [0, 0.875], runs 2 s (float32)
    # [0.875, 2.875]; a2a1 (0 bytes away: no transfer) posts [0.875, 1.625]; mm2 [1.625, 2.625]
    plans = {r: plan(r, 2, allreduce(1), alltoallv([0, 0], [0, 0], r), mm(1)) for r in range(2)}
    extra = {"alltoallv": 0.5e6, "allreduce": 0.125e6}
    topo = with_device(
        machine(2), issue_us=0.25e6, issue_extra_us=extra, issue_gbps=2e-6,
        reductions_in_float32=True,
    )  # fmt: skip
    got = {(r.rank, r.name): (r.start_s, r.end_s) for r in simulate(plans, topo).records}
    assert got[(0, "ar0")] == pytest.approx((0.875, 2.875))
    assert got[(0, "mm2")] == pytest.approx((1.625, 2.625))
    assert issue_time(topo, alltoallv([0, 3], [0, 3], 0)) == pytest.approx(0.75)
    # an AllGather has no extra of its own: the bare post
    gather = Task(id=0, name="ag", kind=TaskKind.ALLGATHER, bytes=10)
    assert issue_time(topo, gather) == pytest.approx(0.25)
    # at half a core every part of a post takes twice as long
    half = with_device(topo, cores_per_node=1)
    assert issue_time(half, allreduce(1)) == pytest.approx(2 * 0.875)


def test_post_extras_survive_a_file_and_are_checked(tmp_path: object) -> None:
    topo = with_device(machine(2), issue_us=6.5, issue_extra_us={"alltoallv": 2.5})
    path = f"{tmp_path}/t.yaml"
    dump(topo, path)
    assert dict(load(path).device.issue_extra_us) == {"alltoallv": 2.5}
    with pytest.raises(ParamInvalidError, match=r"issue_extra_us\.matmul.*unknown collective"):
        with_device(topo, issue_extra_us={"matmul": 1.0})
    with pytest.raises(ParamInvalidError, match=r"issue_extra_us\.allreduce"):
        with_device(topo, issue_extra_us={"allreduce": -0.5})


def test_kinds_one_at_a_time_survive_a_file_and_are_checked(tmp_path: object) -> None:
    topo = with_device(machine(2), concurrent_collectives=True)
    alone = with_device(topo, one_at_a_time=["reduce_scatter", "allreduce", "allreduce"])
    assert alone.device.one_at_a_time == ("allreduce", "reduce_scatter")  # sorted, once each
    assert hash(alone) != hash(topo)
    path = f"{tmp_path}/t.yaml"
    dump(alone, path)
    assert load(path).device.one_at_a_time == ("allreduce", "reduce_scatter")
    dump(topo, path)  # none: the key stays out of the file
    assert "one_at_a_time" not in open(path).read()
    assert load(path).device.one_at_a_time == ()
    with pytest.raises(ParamInvalidError, match=r"one_at_a_time.*'matmul'.*unknown collective"):
        with_device(topo, one_at_a_time=("matmul",))
    with pytest.raises(ParamInvalidError, match=r"one_at_a_time.*must be a list"):
        with_device(topo, one_at_a_time="allreduce")
    text = open(path).read().replace("device:\n", "device:\n  one_at_a_time: allreduce\n", 1)
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ParamInvalidError, match=r"device\.one_at_a_time.*must be a list"):
        load(path)


def test_memory_traffic_counts_the_bytes_the_kernels_move_per_counted_byte() -> None:
    # 2000 counted bytes at 1000 B/s moved, 5 bytes moved per counted byte: 10 s of memory,
    # after 1 s of arithmetic (1e6 FLOP at 1e6 FLOP/s; the passes add, memory_overlap off)
    task = Task(id=0, name="mm", kind=TaskKind.MATMUL, flops=1_000_000, bytes=2000)
    paper = with_device(machine(2), memory_gbps=1e-6, memory_overlap=False)
    assert compute_time(task, paper, "float16") == pytest.approx(1 + 2)
    moved = with_device(paper, memory_traffic=5.0)
    assert compute_time(task, moved, "float16") == pytest.approx(1 + 10)
    # the same machine described as 5 bytes moved per counted byte at 5 times the rate
    faster = with_device(moved, memory_gbps=5e-6)
    assert compute_time(task, faster, "float16") == pytest.approx(
        compute_time(task, paper, "float16")
    )
    with pytest.raises(ParamInvalidError, match="memory_traffic"):
        with_device(paper, memory_traffic=0.5)
    # a pack (a row gather of 2000 counted bytes: each row read and written once) moves what
    # it counts whatever the kernels' traffic: 2 s at 1000 B/s on both machines
    pack = Task(id=1, name="pack", kind=TaskKind.PACK, bytes=2000)
    assert compute_time(pack, paper, "float16") == pytest.approx(2)
    assert compute_time(pack, moved, "float16") == pytest.approx(2)


def test_the_issue_overhead_runs_at_the_core_share() -> None:
    # 4 ranks on 2 cores, o = 0.25 s of a whole core: 0.5 s each; an AllReduce of 1000 B on a
    # 4-rank switch (latency 0) takes the cheaper of the ring (2 (p - 1) chunks of n / p:
    # 1.5 s) and recursive doubling (2 whole-buffer exchanges: 2 s): 1.5 s. Posted [0, 0.5],
    # runs [0.5, 2]; then a matmul of 1 s at half a core: [2, 4]
    plans = {r: plan(r, 4, allreduce(1), mm(1, 0)) for r in range(4)}
    topo = with_device(machine(4), issue_us=0.25e6, cores_per_node=2)
    expected = {"ar0": (0.5, 2.0), "mm1": (2.0, 4.0)}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(4) for n, s in expected.items()})


def test_the_new_figures_survive_a_file_and_are_checked(tmp_path: object) -> None:
    topo = with_device(machine(4), issue_us=12.5, issue_gbps=3.5, cores_per_node=2)
    topo = dataclasses.replace(topo, contention=Contention(comm_slowdown=3.0, polled=True))
    path = f"{tmp_path}/t.yaml"
    dump(topo, path)
    assert "rank_spread" not in open(path).read()  # at its default, left out
    assert load(path).device.rank_spread == 1.0
    topo = with_device(topo, rank_spread=1.15)
    dump(topo, path)
    back = load(path)
    assert back.device.rank_spread == 1.15
    assert (back.device.issue_us, back.device.cores_per_node) == (12.5, 2)
    assert back.device.issue_gbps == 3.5
    moved = with_device(topo, memory_traffic=5.0)
    dump(moved, path)
    assert load(path).device.memory_traffic == 5.0
    assert back.contention.polled is True
    with pytest.raises(ParamInvalidError, match="cores_per_node"):
        with_device(topo, cores_per_node=-1)
    with pytest.raises(ParamInvalidError, match="issue_us"):
        with_device(topo, issue_us=-1.0)
    with pytest.raises(ParamInvalidError, match="issue_gbps"):
        with_device(topo, issue_gbps=-1.0)
    with pytest.raises(ParamInvalidError, match="polled"):
        Contention(polled=1)  # type: ignore[arg-type]


def test_a_calls_later_tasks_of_a_kind_save_their_warm_time() -> None:
    # warm: a matmul saves 0.5 s once one ran on its rank in the call, never below half its
    # cold time (on a whole core; at half a core every figure doubles); the launch, 0.75 s,
    # is a cold task's and no floor. Rank 0: mm 2.5 s [0, 2.5], mm 2.5 s warm 2 [2.5, 4.5],
    # mm 1.2 s warm 0.7 (below the launch) [4.5, 5.2], mm 0.8 s warm 0.4 (half of it: 0.8 -
    # 0.5 would be 0.3) [5.2, 5.6]. A task's saving is its kind's: a reduce after the
    # matmuls is warm too, but its kind saves nothing here: in full from 5.6
    topo = with_device(machine(2), warm_us={"matmul": 5e5}, launch_us=7.5e5)
    reduce = Task(id=-1, name="red", kind=TaskKind.REDUCE, flops=0, bytes=0)
    plans = {r: plan(r, 2, mm(1.75), mm(1.75), mm(0.45), mm(0.05), reduce) for r in (0, 1)}
    # launch 0.75 s is on top of the FLOPs: mm(1.75) is 2.5 s, mm(0.45) 1.2 s, mm(0.05) 0.8 s
    expected = {"mm0": (0, 2.5), "mm1": (2.5, 4.5), "mm2": (4.5, 5.2), "mm3": (5.2, 5.6)}
    timeline = simulate(plans, topo)
    got = {(r.rank, r.name): (r.start_s, r.end_s) for r in timeline.records}
    for name, span in expected.items():
        assert got[(0, name)] == pytest.approx(span), name
    red = got[(0, "red4")]
    assert red[0] == pytest.approx(5.6)
    first = compute_time(plans[0].tasks[4], topo, "float16")
    assert red[1] - red[0] == pytest.approx(first)  # a first reduce: nothing saved
    halved = with_device(topo, cores_per_node=1)
    assert compute_time(plans[0].tasks[1], halved, "float16", warm=True) == pytest.approx(4.0)
    assert compute_time(plans[0].tasks[1], topo, "float16", warm=True) == pytest.approx(2.0)


@pytest.mark.parametrize("lockstep", [True, False])
def test_a_task_after_one_of_another_kind_is_warm(lockstep: bool) -> None:
    # the reduce saves 0.5 s after the matmul (its rank computed earlier in the call): a
    # reduce of 0.75 s (the launch alone) takes 0.375 s, half of it (the floor); a matmul
    # first in its call pays in full, 2.5 s [0, 2.5], then the reduce [2.5, 2.875]. Both
    # engines alike: polled progress makes the event engine run it
    topo = with_device(machine(2), warm_us={"reduce": 5e5}, launch_us=7.5e5)
    if not lockstep:
        topo = dataclasses.replace(topo, contention=Contention(polled=True))
    assert lockstep_applies(topo) is lockstep
    reduce = Task(id=-1, name="red", kind=TaskKind.REDUCE, flops=0, bytes=0)
    plans = {r: plan(r, 2, mm(1.75), reduce) for r in (0, 1)}
    got = {(r.rank, r.name): (r.start_s, r.end_s) for r in simulate(plans, topo).records}
    assert got[(0, "mm0")] == pytest.approx((0.0, 2.5))
    assert got[(1, "red1")] == pytest.approx((2.5, 2.875))


def test_warm_times_survive_a_file_and_are_checked(tmp_path: object) -> None:
    topo = with_device(machine(2), warm_us={"attention": 250.0, "pack": 12.5})
    path = f"{tmp_path}/t.yaml"
    dump(topo, path)
    assert dict(load(path).device.warm_us) == {"attention": 250.0, "pack": 12.5}
    assert dict(machine(2).device.warm_us) == {}  # none unless measured
    with pytest.raises(ParamInvalidError, match=r"warm_us\.allreduce.*unknown compute kind"):
        with_device(topo, warm_us={"allreduce": 1.0})  # a collective is not a compute task
    with pytest.raises(ParamInvalidError, match=r"warm_us\.matmul"):
        with_device(topo, warm_us={"matmul": -1.0})


def test_fit_contention_finds_polled_progress() -> None:
    # spans made with polled progress and compute slowdown 1: X, a 1 s AllReduce under 4 s of
    # compute, waits for the compute: [4, 5]; Y, a 4 s AllReduce under 1 s: 1 + 4 = 5; Z, a 2 s
    # AllReduce then a 1 s matmul that needs it: 3. No finite comm slowdown gives X 5 s and
    # Y 5 s at once (X would need a slowdown >= 4 with no progress at all, Y one of 2).
    from mc2sim.model.fit import fit_contention
    from mc2sim.study.measure import Case

    def case(name: str, *tasks: object) -> Case:
        plans = tuple(plan(r, 2, *tasks) for r in (0, 1))  # type: ignore[arg-type]
        return Case(name=name, tiling="tiles=2", run=lambda: None, plans=plans)

    cases = [
        case("X", allreduce(1), mm(4)),
        case("Y", allreduce(4), mm(1)),
        case("Z", allreduce(2), mm(1, 0)),
    ]
    fitted = fit_contention(machine(2), cases, [[5.0], [5.0], [3.0]]).contention
    assert fitted.polled is True
    assert fitted.compute_slowdown == 1.0


def test_a_profile_corrects_the_roofline_by_kind_in_log_space(tmp_path: object) -> None:
    # the paper machine: a matmul of 1e6 * t FLOPs takes t s by the roofline. Profile: 1 s
    # matmuls measured at 2 s, 100 s ones at 50 s (ratios 2 and 1/2). A 10 s matmul sits half
    # way in log time: ratio exp((ln 2 + ln 0.5) / 2) = 1, so 10 s; a 0.1 s one is below the
    # points: ratio 2, 0.2 s; a 1000 s one above: ratio 1/2, 500 s. Attention has no point:
    # the roofline's 10 s.
    from mc2sim.model.fit import ComputeSample, fit_profile
    from mc2sim.schedule.plan import Task, TaskKind

    samples = [
        ComputeSample(dtype="float16", flops=1e6, nbytes=0, seconds=2.0),
        ComputeSample(dtype="float16", flops=1e6, nbytes=0, seconds=2.2),  # median of 2.0, 2.2 ...
        ComputeSample(dtype="float16", flops=1e6, nbytes=0, seconds=1.8),  # ... and 1.8: 2.0
        ComputeSample(dtype="float16", flops=1e8, nbytes=0, seconds=50.0),
    ]
    profile = fit_profile(samples)
    assert [(p.flops, p.us) for p in profile] == [(1e6, 2e6), (1e8, 5e7)]
    topo = with_device(machine(2), profile=profile)
    for seconds, expected in ((10, 10), (0.1, 0.2), (1000, 500)):
        task = Task(id=0, name="mm", kind=TaskKind.MATMUL, flops=int(seconds * 1e6))
        assert compute_time(task, topo, "float16") == pytest.approx(expected)
    attention = Task(id=0, name="ifa", kind=TaskKind.ATTENTION, flops=int(1e7))
    assert compute_time(attention, topo, "float16") == pytest.approx(10)
    # the profile survives a file
    path = f"{tmp_path}/profile.yaml"
    dump(topo, path)
    assert load(path).device.profile == profile


def test_a_16_bit_float_without_points_takes_the_other_16_bit_floats_ratio() -> None:
    # the paper machine with bfloat16 at half float16's peak (a matmul of 1e6 * t FLOPs takes
    # t s in float16, 2t in bfloat16, 4t in float32 at a quarter). Profile: bfloat16 matmuls
    # only, 1e6 FLOPs (roofline 2 s) measured at 6 s, ratio 3. A float16 matmul of 1e6 FLOPs:
    # its own roofline's 1 s at the ratio of the bfloat16 point whose baseline is nearest in
    # log time (one point: 3 everywhere), 3 s. float32 is no 16-bit float: its roofline, 4 s.
    # Once float16 has a point of its own (1e6 FLOPs at 1.5 s, ratio 1.5) it keeps to it.
    # A grouped matmul has no point in either: its roofline, 1 s.
    from mc2sim.model.cost import profiled_dtype
    from mc2sim.topology import ProfilePoint

    def point(dtype: str, us: float) -> ProfilePoint:
        return ProfilePoint(kind="matmul", dtype=dtype, flops=1e6, bytes=0.0, us=us)

    base = machine(2)
    peaks = {"float16": 1e-6, "bfloat16": 0.5e-6, "float32": 0.25e-6}
    topo = with_device(base, matrix_tflops=peaks, profile=(point("bfloat16", 6e6),))
    mm1 = Task(id=0, name="mm", kind=TaskKind.MATMUL, flops=1_000_000)
    assert compute_time(mm1, topo, "bfloat16") == pytest.approx(6.0)
    assert compute_time(mm1, topo, "float16") == pytest.approx(3.0)
    assert compute_time(mm1, topo, "float32") == pytest.approx(4.0)
    assert profiled_dtype(topo.device, TaskKind.MATMUL, "float16") == "bfloat16"
    assert profiled_dtype(topo.device, TaskKind.MATMUL, "float32") == "float32"
    gmm = Task(id=0, name="gmm", kind=TaskKind.GROUPED_MATMUL, flops=1_000_000)
    assert compute_time(gmm, topo, "float16") == pytest.approx(1.0)
    own = with_device(topo, profile=(point("bfloat16", 6e6), point("float16", 1.5e6)))
    assert compute_time(mm1, own, "float16") == pytest.approx(1.5)
    assert profiled_dtype(own.device, TaskKind.MATMUL, "float16") == "float16"


def test_a_spread_of_the_ranks_leaves_a_loaded_rank_at_its_own_pace() -> None:
    # the paper machine (a matmul of 1e6 * t FLOPs: t s) with rank_spread 1.2: the figures are
    # a round's slowest rank's. Four ranks of one 2 s matmul each: every rank waits on all
    # four, the figures as they are: 2 s. One rank with 10 s, the others 1 s: alone at the
    # top, its own pace, 10 / 1.2 s; the others each have all four as peers (the loaded one
    # is above them): 1 s. Two ranks at 4 s, two at 1: the two have each other,
    # (1 + 0.2 * E2 / E4) / 1.2 of 4 s, E_k the expected largest of k normal draws
    # (0.5642 and 1.0294).
    import numpy as np

    from mc2sim.model.cost import expected_max, spread_factors
    from mc2sim.model.simulator import simulate_run
    from mc2sim.timeline import RunColumns, Timeline

    assert expected_max(1) == 0.0
    assert expected_max(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-9)
    assert expected_max(4) == pytest.approx(1.0293754, abs=1e-6)
    assert spread_factors(1.0, np.array([5.0, 1.0])).tolist() == [1.0, 1.0]
    topo = with_device(machine(4), rank_spread=1.2)

    def one_mm(*seconds: float) -> dict[int, Plan]:
        return {r: plan(r, len(seconds), mm(s)) for r, s in enumerate(seconds)}

    pair = (1 + 0.2 * 0.5641896 / 1.0293754) / 1.2 * 4
    for seconds, expected in (
        ((2, 2, 2, 2), [2.0] * 4),
        ((10, 1, 1, 1), [10 / 1.2, 1.0, 1.0, 1.0]),
        ((4, 1, 4, 1), [pair, 1.0, pair, 1.0]),
    ):
        timeline = simulate(one_mm(*seconds), topo)
        ends = [r.end_s for r in sorted(timeline.records, key=lambda r: r.rank)]
        assert ends == pytest.approx(expected, rel=1e-6), seconds
    # the lockstep engine gives the event engine's times to the bit
    plans = one_mm(10, 1, 1, 1)
    assert lockstep_applies(topo)
    columns, _ = simulate_run(plans, topo)
    event, _ = simulate_run(plans, topo, lockstep=False)
    assert isinstance(columns, RunColumns) and isinstance(event, Timeline)
    by_rank = sorted(event.records, key=lambda r: r.rank)
    assert columns.end_s[0].tolist() == [r.end_s for r in by_rank]
    # a spread of 1 changes nothing; a spread below 1 is refused
    plain = sorted(simulate(plans, machine(4)).records, key=lambda r: r.rank)
    assert [r.end_s for r in plain] == [10.0, 1.0, 1.0, 1.0]
    with pytest.raises(ParamInvalidError, match="rank_spread"):
        with_device(machine(4), rank_spread=0.9)


def test_a_kind_without_its_own_roofline_follows_its_line_through_three_points() -> None:
    # weight-quant matmuls measured on the line t = 0.5 s + 1 us per FLOP + 1 ms per byte:
    # (1e6 FLOPs, 0 B) 1.5 s, (4e6, 1000) 5.5 s, (2e6, 3000) 5.5 s. The paper machine's
    # roofline is 1 us per FLOP alone, so a curve in the roofline's time cannot tell the last
    # two apart. Three points: the line is the baseline, its ratio 1 at every point.
    from mc2sim.topology import ProfilePoint

    def point(kind: str, flops: float, nbytes: float, seconds: float) -> ProfilePoint:
        return ProfilePoint(kind=kind, dtype="float16", flops=flops, bytes=nbytes, us=seconds * 1e6)

    measured = [(1e6, 0.0, 1.5), (4e6, 1000.0, 5.5), (2e6, 3000.0, 5.5)]
    line = with_device(
        machine(2), profile=tuple(point("weight_quant_matmul", *m) for m in measured)
    )
    for flops, nbytes, expected in ((3e6, 2000, 0.5 + 3 + 2), (1e8, 100_000, 0.5 + 100 + 100)):
        task = Task(
            id=0, name="wq", kind=TaskKind.WEIGHT_QUANT_MATMUL, flops=int(flops), bytes=nbytes
        )
        assert compute_time(task, line, "float16") == pytest.approx(expected)
    # two points: the roofline (3 s) times the ratio interpolated in log roofline time
    # between 1 s (ratio 1.5) and 4 s (ratio 5.5 / 4)
    two = with_device(
        machine(2), profile=tuple(point("weight_quant_matmul", *m) for m in measured[:2])
    )
    task = Task(id=0, name="wq", kind=TaskKind.WEIGHT_QUANT_MATMUL, flops=3_000_000, bytes=2000)
    at = math.log(3) / math.log(4)
    assert compute_time(task, two, "float16") == pytest.approx(3 * 1.5 * (5.5 / 4 / 1.5) ** at)
    # points that take less time the more work they hold (noise) fit no line that grows with
    # the work (no cost per FLOP survives): the roofline's curve, 3 s between 2 s (ratio
    # 1.5 / 2) and 4 s (ratio 1 / 4)
    falling = with_device(
        machine(2),
        profile=tuple(
            point("weight_quant_matmul", f, 0.0, t) for f, t in ((1e6, 2.0), (2e6, 1.5), (4e6, 1.0))
        ),
    )
    task = Task(id=0, name="wq", kind=TaskKind.WEIGHT_QUANT_MATMUL, flops=3_000_000)
    at = math.log(3 / 2) / math.log(2)
    assert compute_time(task, falling, "float16") == pytest.approx(3 * 0.75 * (0.25 / 0.75) ** at)
    # a matmul, whose roofline calibrate fits on its own tasks, keeps the roofline's curve:
    # 3 s between the points at 2 s (ratio 2.75) and 4 s (ratio 1.375)
    mm_topo = with_device(machine(2), profile=tuple(point("matmul", *m) for m in measured))
    task = Task(id=0, name="mm", kind=TaskKind.MATMUL, flops=3_000_000, bytes=2000)
    at = math.log(3 / 2) / math.log(2)
    assert compute_time(task, mm_topo, "float16") == pytest.approx(3 * 2.75 * 0.5**at)


def test_a_collective_profile_holds_at_its_rank_count_only() -> None:
    # the paper link (1000 B/s, no latency): an AllReduce of 1000 B on 2 ranks by recursive
    # doubling takes 1 s in the model. Timed at 3 s (1000 B) and 30 s (100 000 B: 100 s in the
    # model): ratios 3 and 0.3. 10 000 B (10 s) lies half way in log time: ratio
    # exp((ln 3 + ln 0.3) / 2) = 0.9487 (sqrt 0.9), 9.487 s. At 4 ranks the points do not hold:
    # the model's time (the ring, 2 (p - 1) / p n / B = 15 s) unchanged.
    import math

    from mc2sim.model.cost import allreduce_time
    from mc2sim.model.fit import CommSample, fit_comm_profile

    samples = [
        CommSample(kind="allreduce", nbytes=1000, seconds=3.0),
        CommSample(kind="allreduce", nbytes=100_000, seconds=30.0),
        CommSample(kind="alltoallv", nbytes=1000, seconds=7.0),
    ]
    profile = fit_comm_profile(samples, 2)
    assert {(p.kind, p.ranks) for p in profile} == {("allreduce", 2), ("alltoallv", 2)}
    topo = with_device(machine(2), profile=profile)
    assert allreduce_time(topo, 1000) == pytest.approx(3.0)
    assert allreduce_time(topo, 100_000) == pytest.approx(30.0)
    assert allreduce_time(topo, 10_000) == pytest.approx(10 * math.sqrt(0.9))
    assert allreduce_time(topo.with_world(4), 10_000) == pytest.approx(15.0)


def test_a_calls_time_is_the_lower_quartile_of_its_rounds() -> None:
    from mc2sim.model.accuracy import typical

    # 5 rounds sorted 1, 2, 3, 10, 50: the quartile sits at index 0.25 * 4 = 1: 2
    assert typical([10.0, 1.0, 50.0, 3.0, 2.0]) == 2.0
    # 4 rounds 1, 2, 4, 8: index 0.75, between 1 and 2: 1.75
    assert typical([8.0, 4.0, 2.0, 1.0]) == pytest.approx(1.75)
    assert typical([7.0]) == 7.0
    with pytest.raises(ValueError, match="no values"):
        typical([])


def test_a_profiled_collective_keeps_the_models_share_of_latency() -> None:
    # collectives in flight together, latency 0.5 s: an AllReduce of 1000 B on 2 ranks is
    # 0.5 s latency + 1 s transfer in the model (recursive doubling). A profile timing it at
    # 3 s (ratio 2) scales both parts: 1 s of latency, 2 s of transfer. Two back to back:
    # both latencies [0, 1]; transfers one at a time: [1, 3] and [3, 5]
    from mc2sim.model.fit import CommSample, fit_comm_profile

    topo = machine(2, latency_s=0.5, concurrent=True)
    profile = fit_comm_profile([CommSample(kind="allreduce", nbytes=1000, seconds=3.0)], 2)
    topo = with_device(topo, profile=profile)
    plans = {r: plan(r, 2, allreduce(1), allreduce(1)) for r in range(2)}
    expected = {"ar0": (0.0, 3.0), "ar1": (0.0, 5.0)}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(2) for n, s in expected.items()})


def test_a_collective_waits_for_peers_off_their_cores_as_latency() -> None:
    # 4 ranks on 2 cores (share 1/2), slice 1 s: each collective waits 1 * (1 - 1/2) = 0.5 s
    # from when the last rank queued it. Latency 0: two 1000-byte AllReduces on a 4-rank
    # switch (the ring's 2 (p - 1) / p * n / B = 1.5 s each), both queued at 0, so both wait
    # [0, 0.5]. In flight together, transfers one at a time: [0.5, 2], [2, 3.5]. On a stream
    # the second starts when the first ends (2), its wait already over: [2, 3.5] as well. With
    # a core per rank (cores 4) there is no wait: [0, 1.5], [1.5, 3].
    plans = {r: plan(r, 4, allreduce(1), allreduce(1)) for r in range(4)}
    for concurrent, cores, ar0, ar1 in (
        (True, 2, (0.0, 2.0), (0.0, 3.5)),
        (False, 2, (0.0, 2.0), (2.0, 3.5)),
        (True, 4, (0.0, 1.5), (0.0, 3.0)),
    ):
        topo = with_device(machine(4, concurrent=concurrent), cores_per_node=cores, slice_us=1e6)
        expected = {"ar0": ar0, "ar1": ar1}
        assert_spans(
            simulate(plans, topo), {(r, n): s for r in range(4) for n, s in expected.items()}
        )


def test_on_a_stream_a_collective_waits_what_is_left_of_its_wait() -> None:
    # As above, on a stream, with a matmul of 0.875 s on a whole core between the two
    # AllReduces: 1.75 s at a half core, [0, 1.75], so the second is queued at 1.75 and its
    # wait for peers runs to 1.75 + 0.5 = 2.25. The first ends at 2 (0.5 wait + 1.5); the
    # second starts then, waits the 0.25 s left and transfers 1.5 s: [2, 3.75]. (A wait
    # counted from its start, as before overlapping waits, would end it at 4.)
    plans = {r: plan(r, 4, allreduce(1), mm(0.875), allreduce(1)) for r in range(4)}
    topo = with_device(machine(4), cores_per_node=2, slice_us=1e6)
    expected = {"ar0": (0.0, 2.0), "mm1": (0.0, 1.75), "ar2": (2.0, 3.75)}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(4) for n, s in expected.items()})


@pytest.mark.parametrize("concurrent", [True, False])
@pytest.mark.parametrize(
    ("cap", "span"),
    [(0.0, 2.0), (500.0, 3.0), (800.0, 2.0), (1200.0, 2.0)],
)
def test_a_capped_wire_hides_the_wait_for_peers_up_to_its_slack(
    concurrent: bool, cap: float, span: float
) -> None:
    # 4 ranks on 2 cores, slice 1 s: the AllReduce (1000 B, ring 2 (p - 1) / p * n / B =
    # 1.5 s of the ranks' own transfer) waits 0.5 s for peers. A wire capped at 500 B/s takes
    # 1500 / 500 = 3 s and keeps its pace while a peer is off its core: max(3, 1.5 + 0.5) =
    # 3 (it was 3.5). At 800 B/s, 1.875 s: max(1.875, 2) = 2, the wait showing 0.125 s past
    # the wire's 0.375 s of slack. A wire faster than the ranks (1200 B/s) caps nothing.
    plans = {r: plan(r, 4, allreduce(1)) for r in range(4)}
    topo = with_device(machine(4, concurrent=concurrent), cores_per_node=2, slice_us=1e6)
    link = dataclasses.replace(topo.network[0], link_gbps=cap / 1e9)
    topo = dataclasses.replace(topo, network=(link,))
    assert_spans(simulate(plans, topo), {(r, "ar0"): (0.0, span) for r in range(4)})


def test_a_capped_transfers_headroom_counts_the_wait_as_the_ranks_time() -> None:
    # As above at 800 B/s, in flight together, comm slowdown 4: the wait left, 0.125 s, is the
    # latency part [0, 0.125]; the transfer part is the wire's 1.875 s against the ranks' own
    # 1.5, headroom 1.25, so while a rank computes it advances at min(1, 1.25 / 4) = 0.3125.
    # The matmul (1.0625 s on a whole core) runs [0, 2.125] at half a core: the transfer
    # does 2 * 0.3125 = 0.625 s of its 1.875 by 2.125 and the rest at full rate, ending at
    # 2.125 + 1.25 = 3.375. (Taking the wait off the ranks' own part, 1.375 s, gave headroom
    # 1.36 and an end at 3.318.)
    plans = {r: plan(r, 4, allreduce(1), mm(1.0625)) for r in range(4)}
    topo = with_device(machine(4, concurrent=True, comm_slowdown=4.0), cores_per_node=2)
    topo = with_device(topo, slice_us=1e6)
    link = dataclasses.replace(topo.network[0], link_gbps=800 / 1e9)
    topo = dataclasses.replace(topo, network=(link,))
    expected = {"ar0": (0.0, 3.375), "mm1": (0.0, 2.125)}
    assert_spans(simulate(plans, topo), {(r, n): s for r in range(4) for n, s in expected.items()})


@pytest.mark.parametrize(
    ("entry", "where", "rule"),
    [
        ("{kind: matmul, dtype: float16, flops: 1, bytes: 1, us: -1}", "profile[0].us", "> 0"),
        ("{kind: matmul, dtype: float16, flops: 1, bytes: 1}", "profile[0].us", "required"),
        ("{kind: matmul, dtype: '', flops: 1, bytes: 1, us: 1}", "profile[0].dtype", "empty"),
        ("{kind: allreduce, dtype: '', flops: 0, bytes: 1, us: 1, ranks: -2}", "ranks", ">= 0"),
        ("{kind: matmul, dtype: f, flops: 1, bytes: 1, us: 1, speed: 2}", "speed", "unknown"),
    ],
)
def test_a_bad_profile_entry_is_named_by_its_field(
    tmp_path: object, entry: str, where: str, rule: str
) -> None:
    topo = with_device(machine(2), issue_us=1.0)
    path = f"{tmp_path}/t.yaml"
    dump(topo, path)
    text = open(path).read().replace("  efficiency:", f"  profile:\n  - {entry}\n  efficiency:", 1)
    open(path, "w").write(text)
    with pytest.raises(ParamInvalidError) as err:
        load(path)
    assert where in str(err.value) and rule in str(err.value)


def test_sharing_a_core_adds_a_posts_cold_start_and_every_messages_wait() -> None:
    # 4 ranks on 2 cores (share 1/2). A post: o = 0.25 s plus 0.25 s for sharing the core, both
    # of a whole core: 1 s at half a core. A 1000-byte AllReduce on a 4-rank switch, latency 0
    # plus 0.1 s a message for sharing: the ring's 2 (p - 1) = 6 steps of a 250-byte chunk
    # each way (0.25 s) and a message each, 6 x 0.35 = 2.1 s (recursive doubling: 2 x (0.1 +
    # 1) = 2.2 s); posted [0, 1], runs [1, 3.1]. With a core per rank (cores 4) sharing adds
    # nothing: posted [0, 0.25], the ring 1.5 s, [0.25, 1.75].
    plans = {r: plan(r, 4, allreduce(1)) for r in range(4)}
    for cores, expected in ((2, (1.0, 3.1)), (4, (0.25, 1.75))):
        topo = with_device(
            machine(4),
            issue_us=0.25e6,
            shared_issue_us=0.25e6,
            shared_latency_us=0.1e6,
            cores_per_node=cores,
        )
        assert_spans(simulate(plans, topo), {(r, "ar0"): expected for r in range(4)})
    # an AlltoAllv pays one message per peer: 1000 B to each of 3 peers on a full mesh (its
    # own link each, 1 s) and 3 x 0.1 s: 1.3 s; with a core per rank, 1 s
    rows = [1, 1, 1, 1]
    plans = {r: plan(r, 4, alltoallv(rows, rows, r)) for r in range(4)}
    for cores, end in ((2, 1.3), (4, 1.0)):
        topo = with_device(
            machine(4, kind="full_mesh"), shared_latency_us=0.1e6, cores_per_node=cores
        )
        assert_spans(simulate(plans, topo), {(r, "a2a0"): (0.0, end) for r in range(4)})


def test_the_sharing_figures_survive_a_file_scale_with_the_machine_and_are_checked(
    tmp_path: object,
) -> None:
    topo = with_device(machine(4), shared_issue_us=20.5, shared_latency_us=40.25, cores_per_node=2)
    path = f"{tmp_path}/t.yaml"
    dump(topo, path)
    back = load(path).device
    assert (back.shared_issue_us, back.shared_latency_us) == (20.5, 40.25)
    half = topo.at_speed(0.5).device  # half as fast: every time doubles
    assert (half.shared_issue_us, half.shared_latency_us) == (41.0, 80.5)
    for name in ("shared_issue_us", "shared_latency_us"):
        with pytest.raises(ParamInvalidError, match=name):
            with_device(topo, **{name: -1.0})


def test_a_memory_bound_task_speeds_up_as_its_nodes_other_ranks_go_idle() -> None:
    # memory 1e-6 GB/s: a pack or a reduction of 3000 B takes 3 s beside every rank of its
    # node (the figures), a matmul of 1e6 * t FLOPs t s as before. lone_memory_speedup 1.5 on
    # a node of 2 ranks: alone, such a task runs at 1.5. Rank 0 packs 3 s of bytes while rank
    # 1 multiplies for 1 s: 1 s of the pack done at 1, the other 2 s at 1.5 from there, 4/3 s:
    # [0, 7/3]. A matmul on rank 0 instead is not memory-bound: [0, 3].
    from mc2sim.model.cost import memory_rate

    assert memory_rate(1.5, 4, 4) == 1.0
    assert memory_rate(1.5, 4, 1) == 1.5
    assert memory_rate(1.5, 4, 2) == pytest.approx(1 + 0.5 * 2 / 3)
    assert memory_rate(1.5, 1, 1) == 1.0  # a node of one rank shares nothing
    assert memory_rate(1.0, 4, 1) == 1.0
    slow = with_device(machine(2), memory_gbps=1e-6)
    topo = with_device(slow, lone_memory_speedup=1.5)

    def memory_task(kind: TaskKind) -> Task:
        return Task(id=-1, name=kind.value[:4], kind=kind, bytes=3000)

    for kind in (TaskKind.PACK, TaskKind.REDUCE):
        plans = {0: plan(0, 2, memory_task(kind)), 1: plan(1, 2, mm(1))}
        name = f"{kind.value[:4]}0"
        assert_spans(simulate(plans, slow), {(0, name): (0, 3), (1, "mm0"): (0, 1)})
        assert_spans(simulate(plans, topo), {(0, name): (0, 7 / 3), (1, "mm0"): (0, 1)})
    plans = {0: plan(0, 2, mm(3)), 1: plan(1, 2, mm(1))}
    assert_spans(simulate(plans, topo), {(0, "mm0"): (0, 3), (1, "mm0"): (0, 1)})
    # both ranks packing all along: the figures as they are
    both = {r: plan(r, 2, memory_task(TaskKind.PACK)) for r in range(2)}
    assert_spans(simulate(both, topo), {(r, "pack0"): (0, 3) for r in range(2)})
    # rates change with the node's busy ranks: not for the lockstep engine; one rank a node is
    assert lockstep_applies(slow) and not lockstep_applies(topo)
    inner = dataclasses.replace(topo.network[0], ranks=1)
    outer = NetworkDim(kind=inner.kind, ranks=2, bandwidth_gbps=1e-6, latency_us=0.0)
    assert lockstep_applies(dataclasses.replace(topo, network=(inner, outer)))
    with pytest.raises(ParamInvalidError, match="lone_memory_speedup"):
        with_device(machine(2), lone_memory_speedup=0.9)


def test_the_lone_memory_speedup_survives_a_file(tmp_path: object) -> None:
    path = f"{tmp_path}/t.yaml"
    dump(machine(2), path)
    assert "lone_memory_speedup" not in open(path).read()  # at its default, left out
    dump(with_device(machine(2), lone_memory_speedup=1.66), path)
    assert load(path).device.lone_memory_speedup == 1.66
