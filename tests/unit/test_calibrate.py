"""The calibration's fits and measurement plumbing, against data made from known parameters.

Each fit is checked by generating samples from a known machine through the cost model
(:mod:`mc2sim.model.cost`, the very formulas the simulator uses) and recovering it; the
measurement helpers against hand-built timelines and a fake one-process communicator.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mc2sim.comm import ThreadCommunicator, run_threads
from mc2sim.errors import ParamInvalidError
from mc2sim.model import allgather_time, allreduce_time, alltoallv_time, reduce_scatter_time
from mc2sim.model.fit import (
    COMM_SLOWDOWNS,
    COMPUTE_SLOWDOWNS,
    CommSample,
    ComputeSample,
    fit_compute,
    fit_contention,
    fit_network,
    fit_rate,
)
from mc2sim.model.simulator import simulate
from mc2sim.schedule import plan_gmm_alltoallv, plan_mm_all_reduce, tiling_of
from mc2sim.schedule.builders import MatmulShape, MoeShape
from mc2sim.schedule.plan import TaskKind
from mc2sim.study.calibrate import (
    POLLED_SHARE,
    POSTED_BYTES,
    Calibration,
    DuplexMeasure,
    LonePair,
    _fit_levels,
    _Level,
    _levels,
    measure_duplex,
    measure_independent,
    measure_issue,
    measure_lone_pair,
    measure_progress,
    rank_speeds,
    samples_of,
    sharing_of,
    split_sharing,
    warm_savings,
    work_s,
)
from mc2sim.study.measure import Case, measure_rounds
from mc2sim.timeline import RunKey, Stream, TaskRecord, Timeline, current_recorder
from mc2sim.topology import (
    Contention,
    CoreSharing,
    Device,
    Duplex,
    Efficiency,
    LinkKind,
    NetworkDim,
    Topology,
)

from .fakes import SameOnEveryRank

MS = 1e-3


def topology(
    world: int,
    *,
    alpha_us: float,
    gbps: float,
    reduce_gbps: float,
    kind: LinkKind = LinkKind.FULL_MESH,
) -> Topology:
    device = Device(
        name="cpu",
        matrix_tflops={"bfloat16": 0.2},
        vector_tflops=0.001,
        memory_gbps=5.0,
        efficiency=Efficiency(small_util=1.0, large_util=1.0, half_flops=0.0),
        launch_us=40.0,
        reduce_gbps=reduce_gbps,
        memory_overlap=False,
    )
    net = NetworkDim(kind=kind, ranks=world, bandwidth_gbps=gbps, latency_us=alpha_us)
    return Topology(
        name="t", description="t", device=device, network=(net,), contention=Contention(),
        source="tests",
    )  # fmt: skip


# ---------------------------------------------------------------- compute


RISING = Efficiency(small_util=0.5, large_util=1.0, half_flops=1e8)
FALLING = Efficiency(small_util=1.0, large_util=0.3, half_flops=1e7)


def compute_samples(noise: float = 0.0, curve: Efficiency = RISING) -> list[ComputeSample]:
    """Two dtypes at several sizes, timed by a known machine (times ``1 + noise`` jitter)."""
    launch, gbps = 40e-6, 5.0
    peaks = {"bfloat16": 0.2e12, "float16": 0.1e12}
    rng = np.random.default_rng(3)
    samples = []
    for dtype, (flops, nbytes) in itertools.product(
        peaks, [(1e6, 1e5), (3e7, 2e6), (2e8, 1e6), (5e8, 3e7), (2e9, 8e6), (6e9, 2e7)]
    ):
        seconds = launch + flops / (peaks[dtype] * curve.util(flops)) + nbytes / (gbps * 1e9)
        seconds *= 1 + noise * rng.standard_normal()
        samples.append(ComputeSample(dtype=dtype, flops=flops, nbytes=nbytes, seconds=seconds))
    return samples


def test_fit_compute_recovers_the_machine_that_made_the_samples() -> None:
    peaks, curve, launch_us, gbps = fit_compute(compute_samples(curve=RISING))
    assert peaks == pytest.approx({"bfloat16": 0.2, "float16": 0.1}, rel=1e-6)
    assert (curve.small_util, curve.large_util) == (RISING.small_util, RISING.large_util)
    assert curve.half_flops == pytest.approx(RISING.half_flops, rel=1e-9)
    assert launch_us == pytest.approx(40.0, rel=1e-6)
    assert gbps == pytest.approx(5.0, rel=1e-6)


def test_fit_compute_never_fits_a_falling_curve() -> None:
    # a machine whose large tasks run at 0.3 of the peak its small ones reach: a falling
    # curve would recover it exactly (the peak 0.2 TFLOP/s), but a task's utilisation does
    # not drop as it grows, so the fit keeps a curve rising to 1 and reads the peak as
    # what its large tasks reach
    samples = compute_samples(curve=FALLING)
    peaks, curve, _, _ = fit_compute(samples)
    assert curve.small_util <= curve.large_util == 1.0  # rising to 1, never falling
    # the largest bfloat16 task: 6 GFLOP at util 0.3 + 0.7 * 1e7 / (6e9 + 1e7), about 0.30
    # of 0.2 TFLOP/s, 0.0602; the fitted peak near that, far from the falling machine's 0.2
    largest = 0.2 * FALLING.util(6e9)
    assert largest == pytest.approx(0.0602, abs=1e-4)
    assert peaks["bfloat16"] == pytest.approx(largest, rel=0.25)


def test_a_sample_repeated_n_times_at_weight_one_over_n_counts_once() -> None:
    noisy = compute_samples(noise=0.2)
    outlier = dataclasses.replace(noisy[4], seconds=noisy[4].seconds * 3)
    once = fit_compute([*noisy, outlier])
    split = fit_compute([*noisy] + [dataclasses.replace(outlier, weight=1 / 16)] * 16)
    heavy = fit_compute([*noisy] + [outlier] * 16)
    assert split[0] == pytest.approx(once[0], rel=1e-6)
    assert split[1] == once[1], "the same efficiency curve"
    assert split[2:] == pytest.approx(once[2:], rel=1e-6)
    assert heavy[0]["bfloat16"] != pytest.approx(once[0]["bfloat16"], rel=1e-3), (
        "unweighted, sixteen copies pull the fit"
    )


# ---------------------------------------------------------------- network


@pytest.mark.parametrize("world", [2, 4])
def test_fit_network_recovers_the_link_and_the_reduction_rate(world: int) -> None:
    truth = topology(world, alpha_us=120.0, gbps=2.5, reduce_gbps=1.5)
    assert not truth.device.reductions_in_float32
    samples = level_samples(truth, wide=False)
    dim, reduce_gbps = fit_network(samples, world)
    assert dim.kind is LinkKind.FULL_MESH and dim.ranks == world
    assert dim.latency_us == pytest.approx(120.0, rel=1e-6)
    assert dim.bandwidth_gbps == pytest.approx(2.5, rel=1e-6)
    assert reduce_gbps == pytest.approx(1.5, rel=1e-6)


# ---------------------------------------------------------------- samples from timelines


def rec(rank: int, task: int, kind: TaskKind, start_ms: float, end_ms: float) -> TaskRecord:
    stream = Stream.COMM if kind in (TaskKind.ALLREDUCE, TaskKind.ALLTOALLV) else Stream.COMPUTE
    return TaskRecord(
        rank=rank, run=RunKey(op="mm", tiling="serial"), task=task, name=str(kind), stream=stream, kind=str(kind),
        start_s=start_ms * MS, end_s=end_ms * MS,
    )  # fmt: skip


def serial_mm_case() -> Case:
    shape = MatmulShape(k=64, n=256, in_bytes=2, w_bytes=2, out_bytes=2, dtype="bfloat16")
    plans = tuple(
        plan_mm_all_reduce(
            m=128, shape=shape, kind=TaskKind.MATMUL, tiling=tiling_of("serial"), rank=r,
            world_size=2,
        )
        for r in range(2)
    )  # fmt: skip
    return Case(name="mm", tiling="serial", run=lambda: None, plans=plans)


def tiled_mm_case() -> Case:
    """A MatmulAllReduce of 2 tiles on 2 ranks: matmul, AllReduce, matmul, AllReduce."""
    shape = MatmulShape(k=64, n=256, in_bytes=2, w_bytes=2, out_bytes=2, dtype="bfloat16")
    plans = tuple(
        plan_mm_all_reduce(
            m=128, shape=shape, kind=TaskKind.MATMUL, tiling=tiling_of(2), rank=r,
            world_size=2,
        )
        for r in range(2)
    )  # fmt: skip
    return Case(name="mm tiled", tiling="tiles=2", run=lambda: None, plans=plans)


def test_samples_time_a_collective_from_the_last_arrival_to_the_last_completion() -> None:
    case = serial_mm_case()
    matmul, allreduce = (t.id for t in case.plans[0].tasks)
    rounds = [
        # rank 1 computes longer; rank 0 sees the AllReduce end late (a time slice)
        Timeline(records=(
            rec(0, matmul, TaskKind.MATMUL, 0, 5), rec(0, allreduce, TaskKind.ALLREDUCE, 5, 12),
            rec(1, matmul, TaskKind.MATMUL, 0, 7), rec(1, allreduce, TaskKind.ALLREDUCE, 7, 10),
        )),
        Timeline(records=(
            rec(0, matmul, TaskKind.MATMUL, 0, 6), rec(0, allreduce, TaskKind.ALLREDUCE, 6, 9),
            rec(1, matmul, TaskKind.MATMUL, 0, 4), rec(1, allreduce, TaskKind.ALLREDUCE, 4, 9),
        )),
        Timeline(records=(
            rec(0, matmul, TaskKind.MATMUL, 0, 2), rec(0, allreduce, TaskKind.ALLREDUCE, 2, 9),
            rec(1, matmul, TaskKind.MATMUL, 0, 3), rec(1, allreduce, TaskKind.ALLREDUCE, 3, 7),
        )),
    ]  # fmt: skip
    compute, comm = samples_of(SameOnEveryRank(2), [case], [rounds])
    # compute: the slowest rank per round (7, 6, 3) -> lower quartile, sorted 3, 6, 7 at
    # index 0.5: 4.5 ms
    assert [s.seconds for s in compute] == pytest.approx([4.5 * MS])
    assert compute[0].flops == 2 * 128 * 64 * 256 and compute[0].dtype == "bfloat16"
    # allreduce: max end - max start per round (12 - 7, 9 - 6, 9 - 3) -> 5, 3, 6: sorted
    # 3, 5, 6, lower quartile at index 0.5: 4 ms
    assert [s.seconds for s in comm] == pytest.approx([4 * MS])
    assert comm[0].kind == "allreduce" and comm[0].nbytes == 128 * 256 * 2
    assert compute[0].weight == comm[0].weight == 1.0


def test_samples_leave_out_rounds_where_a_rank_computed_during_its_collective() -> None:
    case = tiled_mm_case()
    mm0, ar0, mm1, ar1 = (t.id for t in case.plans[0].tasks)

    def round_(ar0_end: float, mm1_start: float) -> Timeline:
        return Timeline(records=tuple(
            rec(r, t, kind, start, end)
            for r in range(2)
            for t, kind, start, end in (
                (mm0, TaskKind.MATMUL, 0, 2), (ar0, TaskKind.ALLREDUCE, 2, ar0_end),
                (mm1, TaskKind.MATMUL, mm1_start, mm1_start + 2),
                (ar1, TaskKind.ALLREDUCE, mm1_start + 2, mm1_start + 5),
            )
        ))  # fmt: skip

    # round 1: the second tile computes while the first AllReduce is in flight (7 ms of it);
    # rounds 2 and 3: the first AllReduce ends (in 3 and 4 ms) before the second tile starts
    rounds = [round_(9, 2), round_(5, 5), round_(6, 6)]
    _, comm = samples_of(SameOnEveryRank(2), [case], [rounds])
    # the first AllReduce's rounds 2 and 3 (3 and 4 ms): lower quartile 3.25 ms; the second's
    # three rounds of 3 ms: 3 ms
    assert [s.seconds for s in comm] == pytest.approx([3.25 * MS, 3 * MS])
    assert [s.weight for s in comm] == [0.5, 0.5]
    # overlapped in every round: no sample of it, and the call's one unit goes to the other
    _, comm = samples_of(SameOnEveryRank(2), [case], [[round_(9, 2), round_(6, 3)]])
    assert [s.seconds for s in comm] == pytest.approx([3 * MS])
    assert [s.weight for s in comm] == [1.0]


def test_samples_take_the_busiest_ranks_work_and_share_one_weight_per_call() -> None:
    # rank 1 multiplies 3x the rows of rank 0 (send_counts q*e + j); per-expert tiles
    send = ((2, 2, 2, 2), (6, 6, 6, 6))
    recv = ((2, 2, 6, 6), (2, 2, 6, 6))
    plans = tuple(
        plan_gmm_alltoallv(
            shape=MoeShape(e=2, send=send[r], recv=recv[r], h1=16, n1=32, elem_bytes=2,
                           dtype="bfloat16"),
            tiling=tiling_of(None), rank=r,
        )
        for r in range(2)
    )  # fmt: skip
    case = Case(name="moe", tiling="serial", run=lambda: None, plans=plans)
    records = []
    for plan in plans:
        for t in plan.tasks:
            kind = TaskKind.GROUPED_MATMUL if t.kind is TaskKind.GROUPED_MATMUL else t.kind
            records.append(rec(plan.rank, t.id, kind, t.id, t.id + 1))
    compute, comm = samples_of(SameOnEveryRank(2), [case], [[Timeline(records=tuple(records))]])
    gmm = [t for t in plans[0].tasks if t.kind is TaskKind.GROUPED_MATMUL]
    assert len(compute) == len(gmm) > 1
    for sample, task in zip(compute, gmm, strict=True):
        busiest = max(plans[0].tasks[task.id].flops, plans[1].tasks[task.id].flops)
        assert sample.flops == busiest
        assert sample.weight == pytest.approx(1 / len(gmm))
    assert sum(s.weight for s in comm) == pytest.approx(1.0)


# ---------------------------------------------------------------- contention


def tiled_cases(world: int) -> list[Case]:
    shape = MatmulShape(k=64, n=2048, in_bytes=2, w_bytes=2, out_bytes=2, dtype="bfloat16")
    mm = tuple(
        plan_mm_all_reduce(
            m=2048, shape=shape, kind=TaskKind.MATMUL, tiling=tiling_of(4), rank=r,
            world_size=world,
        )
        for r in range(world)
    )  # fmt: skip
    counts = tuple(256 for _ in range(2 * world))  # 2 experts per rank, even
    moe = tuple(
        plan_gmm_alltoallv(
            shape=MoeShape(e=2, send=counts, recv=counts, h1=64, n1=1024,
                           elem_bytes=2, dtype="bfloat16"),
            tiling=tiling_of(None), rank=r,
        )
        for r in range(world)
    )  # fmt: skip
    return [
        Case(name="mm", tiling="serial", run=lambda: None, plans=mm),
        Case(name="moe", tiling="serial", run=lambda: None, plans=moe),
    ]


def test_where_ranks_share_cores_a_compute_sample_is_its_cpu_time() -> None:
    # ranks taking turns: a matmul's span holds the other ranks' turns (rank 1: 0 -> 9 ms),
    # its CPU time is its own work (2 ms). With cpu: the slowest rank's CPU time per round
    # (3, 2.5 ms: lower quartile 2.625 ms); the AllReduce is timed as before (9 - 9, ...)
    case = serial_mm_case()
    matmul, allreduce = (t.id for t in case.plans[0].tasks)

    def on_cpu(record: TaskRecord, cpu_ms: float) -> TaskRecord:
        return dataclasses.replace(record, cpu_s=cpu_ms * MS)

    rounds = [
        Timeline(records=(
            on_cpu(rec(0, matmul, TaskKind.MATMUL, 0, 3), 3), rec(0, allreduce, TaskKind.ALLREDUCE, 3, 12),
            on_cpu(rec(1, matmul, TaskKind.MATMUL, 0, 9), 2), rec(1, allreduce, TaskKind.ALLREDUCE, 9, 11),
        )),
        Timeline(records=(
            on_cpu(rec(0, matmul, TaskKind.MATMUL, 0, 8), 2.5), rec(0, allreduce, TaskKind.ALLREDUCE, 8, 10),
            on_cpu(rec(1, matmul, TaskKind.MATMUL, 0, 2.5), 2.5), rec(1, allreduce, TaskKind.ALLREDUCE, 2.5, 10),
        )),
    ]  # fmt: skip
    compute, comm = samples_of(SameOnEveryRank(2), [case], [rounds], cpu=True)
    assert [s.seconds for s in compute] == pytest.approx([2.625 * MS])
    spans, _ = samples_of(SameOnEveryRank(2), [case], [rounds])  # the spans: 9 and 8 ms
    assert [s.seconds for s in spans] == pytest.approx([8.25 * MS])
    # the AllReduce: 12 - 9 = 3 and 10 - 8 = 2 ms -> 2.25 ms either way
    assert [s.seconds for s in comm] == pytest.approx([2.25 * MS])
    # a record without a CPU time (a device's task) keeps its span
    assert work_s(rec(0, matmul, TaskKind.MATMUL, 0, 4), cpu=True) == pytest.approx(4 * MS)
    assert work_s(rounds[0].records[2], cpu=False) == pytest.approx(9 * MS)


@pytest.mark.parametrize(
    ("got", "share", "sharing"),
    [
        (0.53, 0.5, CoreSharing.PROCESSOR),  # 4 ranks of MPICH here: waiting ranks poll
        (0.95, 0.5, CoreSharing.TURNS),  # waiting ranks give their cores away
        (0.74, 0.5, CoreSharing.PROCESSOR),  # nearer 0.5 than 1
        (0.76, 0.5, CoreSharing.TURNS),
        (0.3, 0.25, CoreSharing.PROCESSOR),  # 8 ranks on 2 cores: turns would give 0.5
        (0.45, 0.25, CoreSharing.TURNS),
    ],
)
def test_sharing_of_picks_the_nearer_of_the_two_readings(
    got: float, share: float, sharing: CoreSharing
) -> None:
    assert sharing_of(got, share) is sharing


def one_call(*tasks: tuple[int, int, TaskKind, float, float]) -> Timeline:
    """One call's compute tasks: (rank, task, kind, start ms, end ms) each."""
    return Timeline(records=tuple(
        TaskRecord(
            rank=rank, run=RunKey(op="mm", tiling="tiles=2"), task=task, name=str(kind),
            stream=Stream.COMPUTE, kind=str(kind), start_s=start * MS, end_s=end * MS,
        )
        for rank, task, kind, start, end in tasks
    ))  # fmt: skip


def test_warm_savings_compare_a_calls_first_task_with_its_next_of_that_kind() -> None:
    mm, pack = TaskKind.MATMUL, TaskKind.PACK

    def round_(first: float, second: float) -> Timeline:
        # each rank: a matmul of `first` ms (rank 1's 1 ms longer), a pack, then a matmul of
        # `second` ms (rank 1's 1 ms longer), then a longer pack: the packs never count, as
        # neither is the call's first compute task
        return one_call(*(
            task
            for rank in range(2)
            for task in (
                (rank, 0, mm, 0, first + rank), (rank, 1, pack, 10, 13),
                (rank, 2, mm, 20, 20 + second + rank), (rank, 3, pack, 30, 39),
            )
        ))  # fmt: skip

    # matmul saved 1, 2 and 6 ms per round (both ranks alike): median 2 ms
    rounds = [round_(5, 4), round_(6, 4), round_(9, 3)]
    assert warm_savings([rounds]) == pytest.approx({"matmul": 2 * MS})
    slower = [round_(5, 7)] * 3
    assert warm_savings([slower]) == {"matmul": 0.0}  # never a negative time
    # cases of one kind: the median of theirs before the floor at 0 (2, -2, 2 ms: 2; 2, -2: 0)
    assert warm_savings([rounds, slower, rounds])["matmul"] == pytest.approx(2 * MS)
    assert warm_savings([rounds, slower])["matmul"] == 0.0
    # a call that starts with a pack (a dispatch): the pack's saving, from its next pack
    dispatch = one_call((0, 0, pack, 0, 5), (0, 1, mm, 5, 9), (0, 2, pack, 9, 11))
    assert warm_savings([[dispatch]]) == pytest.approx({"pack": 3 * MS})
    # a kind that ran once: nothing to compare
    assert warm_savings([[one_call((0, 0, mm, 0, 5), (0, 1, pack, 5, 6))]]) == {}
    # with cpu, each task's CPU time where it has one: 1 ms less in every first matmul (its
    # span held another rank's turn) -> matmul saves 1 ms less
    on_cpu = [
        Timeline(
            records=tuple(
                dataclasses.replace(r, cpu_s=r.duration_s - (MS if r.task == 0 else 0))
                for r in timeline.records
            )
        )
        for timeline in rounds
    ]
    assert warm_savings([on_cpu], cpu=True) == pytest.approx({"matmul": 1 * MS})
    assert warm_savings([on_cpu]) == pytest.approx({"matmul": 2 * MS})


def test_rank_speeds_read_each_ranks_time_over_the_slowest() -> None:
    mm, pack = TaskKind.MATMUL, TaskKind.PACK

    def call(scale: float) -> Timeline:
        # 3 ranks: task 0 a matmul of 10, 8 and 5 ms (times `scale`), task 1 a pack of 2, 2
        # and 4 ms, task 2 a 0.5 ms matmul (below SPEED_TASK_S: left out), task 3 on two
        # ranks only (not every rank: left out)
        return one_call(
            (0, 0, mm, 0, 10 * scale), (1, 0, mm, 0, 8 * scale), (2, 0, mm, 0, 5 * scale),
            (0, 1, pack, 20, 22), (1, 1, pack, 20, 22), (2, 1, pack, 20, 24),
            (0, 2, mm, 30, 30.5), (1, 2, mm, 30, 30.2), (2, 2, mm, 30, 30.1),
            (0, 3, mm, 40, 41), (1, 3, mm, 40, 49),
        )  # fmt: skip

    # per task over the rounds (lower quartiles): matmul 1, 0.8, 0.5; pack 0.5, 0.5, 1.
    # Medians over the two tasks: 0.75, 0.65, 0.75
    speeds = rank_speeds([[call(1.0), call(1.0), call(1.2)]], 3)
    assert speeds == pytest.approx((0.75, 0.65, 0.75))
    # two calls: their tasks pool (4 ratios per rank)
    assert rank_speeds([[call(1.0)], [call(1.0)]], 3) == pytest.approx((0.75, 0.65, 0.75))
    # nothing long enough on every rank: every rank at 1
    assert rank_speeds([[one_call((0, 0, mm, 0, 0.5), (1, 0, mm, 0, 0.2))]], 2) == (1.0, 1.0)
    # with cpu, the CPU times: rank 0's matmul 5 ms of CPU in a 10 ms span -> the slowest
    # is rank 1 (8 ms): 0.625, 1, 0.625 for the matmul, 0.5 0.5 1 for the pack
    on_cpu = Timeline(records=tuple(
        dataclasses.replace(r, cpu_s=5 * MS if (r.rank, r.task) == (0, 0) else r.duration_s)
        for r in call(1.0).records
    ))  # fmt: skip
    assert rank_speeds([[on_cpu]], 3, cpu=True) == pytest.approx((0.5625, 0.75, 0.8125))
    assert rank_speeds([[on_cpu]], 3) == pytest.approx((0.75, 0.65, 0.75))


def test_rank_spread_reads_the_rounds_slowest_over_the_slowest_ranks_own() -> None:
    from mc2sim.study.calibrate import measure_rank_spread

    mm = TaskKind.MATMUL

    def call(times: tuple[float, float, float]) -> Timeline:
        # 3 ranks' one matmul, each rank's time in ms; a 0.5 ms task (below SPEED_TASK_S)
        # beside it is left out
        return one_call(
            *((rank, 0, mm, 0.0, t) for rank, t in enumerate(times)),
            *((rank, 1, mm, 20.0, 20.5) for rank in range(3)),
        )

    # a different rank slow in each of 4 rounds: the rounds' slowest 12, 12, 12, 10, lower
    # quartile 11.5; each rank's own lower quartile: (10, 10, 10, 12) -> 10, (10, 12, 10, 10)
    # -> 10, (12, 10, 10, 10) -> 10. Spread 11.5 / 10
    noisy = [call((10, 10, 12)), call((10, 12, 10)), call((12, 10, 10)), call((10, 10, 10))]
    assert measure_rank_spread([noisy], 3) == pytest.approx(1.15)
    # rank 2 slower in every round: its speed, not spread (the slowest's own is the rounds')
    steady = [call((10, 10, 12))] * 4
    assert measure_rank_spread([steady], 3) == 1.0
    # calls pool their tasks (the median over them): 1.15 and 1.0 -> 1.075
    assert measure_rank_spread([noisy, steady], 3) == pytest.approx(1.075)
    # one rank, or no task long enough: 1
    assert measure_rank_spread([noisy], 1) == 1.0
    assert measure_rank_spread([[one_call((0, 0, mm, 0, 0.5), (1, 0, mm, 0, 0.2))]], 2) == 1.0


def test_score_cases_simulates_the_jobs_ranks_at_their_speeds() -> None:
    from mc2sim.model.heterogeneity import Straggler
    from mc2sim.model.simulator import simulate_waits
    from mc2sim.study.validate import score_cases

    topo = topology(2, alpha_us=100.0, gbps=1.0, reduce_gbps=2.0)
    case = serial_mm_case()
    (plain,) = score_cases([case], [[1.0]], topo)
    faster = {1: Straggler(compute=0.5)}
    (both,) = score_cases([case], [[1.0]], topo, {0: Straggler(compute=0.5), **faster})
    (one,) = score_cases([case], [[1.0]], topo, faster)
    assert plain.simulated_s == simulate(dict(enumerate(case.plans)), topo).metrics().total_s
    # the slower rank sets the pace: one rank faster changes nothing, both faster do
    assert one.simulated_s == pytest.approx(plain.simulated_s)
    expected = (
        simulate_waits(dict(enumerate(case.plans)), topo, {0: Straggler(compute=0.5), **faster})[0]
        .metrics()
        .total_s
    )
    assert both.simulated_s == pytest.approx(expected) and expected < plain.simulated_s


def test_a_calibrations_faster_ranks_are_stragglers_below_1() -> None:
    topo = topology(2, alpha_us=100.0, gbps=1.0, reduce_gbps=2.0)
    fitted = Calibration(
        topology=topo, alongside=[], fitted_cases=[], fitted_spans=[],
        independent=None, speeds=(0.8, 1.0, 0.5),  # type: ignore[arg-type]
    )  # fmt: skip
    assert {r: s.compute for r, s in fitted.stragglers().items()} == {0: 0.8, 2: 0.5}
    assert dataclasses.replace(fitted, speeds=()).stragglers() == {}


def twice(*calls: tuple[tuple[int, int, TaskKind, float, float], ...]) -> Timeline:
    """A call run twice in a row: each call's (rank, task, kind, start ms, end ms)."""
    return Timeline(records=tuple(
        TaskRecord(
            rank=rank, run=RunKey(op="mm", tiling="serial", repetition=i), task=task,
            name=str(kind), stream=Stream.COMPUTE, kind=str(kind), start_s=start * MS,
            end_s=end * MS,
        )
        for i, call in enumerate(calls)
        for rank, task, kind, start, end in call
    ))  # fmt: skip


def test_warm_savings_between_calls_compare_each_kinds_first_task_of_two_calls_in_a_row() -> None:
    mm, pack = TaskKind.MATMUL, TaskKind.PACK
    between = functools.partial(warm_savings, in_call=False)

    def round_(first: float, second: float, pack_saved: float) -> Timeline:
        # rank 0's matmul takes `first` then `second` ms; rank 1's 1 ms more each time; a
        # later matmul in each call (task 2) is not a first task and does not count
        return twice(
            ((0, 0, mm, 0, first), (1, 0, mm, 0, first + 1), (0, 1, pack, 10, 13),
             (1, 1, pack, 10, 13), (0, 2, mm, 20, 21), (1, 2, mm, 20, 21)),
            ((0, 0, mm, 30, 30 + second), (1, 0, mm, 30, 31 + second),
             (0, 1, pack, 40, 43 - pack_saved), (1, 1, pack, 40, 43 - pack_saved),
             (0, 2, mm, 50, 59), (1, 2, mm, 50, 59)),
        )  # fmt: skip

    # matmul saved 1, 2 and 6 ms per round (both ranks alike): median 2 ms. The pack: 0.5 ms,
    # and once slower the second time (-1 ms), median over 3 rounds 0.5; a case where it
    # is always slower gives 0, never a negative time
    rounds = [round_(5, 4, 0.5), round_(6, 4, -1.0), round_(9, 3, 0.5)]
    saved = between([rounds])
    assert saved == pytest.approx({"matmul": 2 * MS, "pack": 0.5 * MS})
    slower = [round_(5, 7, 0.5)] * 3
    assert between([slower])["matmul"] == 0.0
    # cases of one kind: the median of theirs before the floor at 0 (2, -2, 2 ms: 2; 2, -2: 0)
    assert between([rounds, slower, rounds])["matmul"] == pytest.approx(2 * MS)
    assert between([rounds, slower])["matmul"] == 0.0
    with pytest.raises(RuntimeError, match="recorded 1 calls"):
        between([[twice(((0, 0, mm, 0, 1),))]])
    # with cpu, each task's CPU time where it has one: 1 ms less in every first matmul of
    # the first call (the spans held another rank's turn) -> matmul saves 1 ms less
    first_calls = [
        Timeline(
            records=tuple(
                dataclasses.replace(r, cpu_s=r.duration_s - (MS if r.run.repetition == 0 else 0))
                for r in timeline.records
            )
        )
        for timeline in rounds
    ]
    on_cpu = between([first_calls], cpu=True)
    assert on_cpu == pytest.approx({"matmul": 1 * MS, "pack": 0.0})
    assert between([first_calls]) == pytest.approx(saved)


def test_samples_add_what_a_warm_task_saved_back_to_a_calls_later_tasks() -> None:
    case = tiled_mm_case()
    mm0, ar0, mm1, ar1 = (t.id for t in case.plans[0].tasks)
    timeline = Timeline(records=tuple(
        rec(r, t, kind, start, end)
        for r in range(2)
        for t, kind, start, end in (
            (mm0, TaskKind.MATMUL, 0, 4), (ar0, TaskKind.ALLREDUCE, 4, 6),
            (mm1, TaskKind.MATMUL, 6, 9), (ar1, TaskKind.ALLREDUCE, 9, 12),
        )
    ))  # fmt: skip
    warm = {"matmul": 1 * MS, "pack": 7 * MS}
    compute, _ = samples_of(SameOnEveryRank(2), [case], [[timeline]], warm_s=warm)
    # the first tile as measured (4 ms); the second, warm, 3 ms + the 1 ms it saved
    assert [s.seconds for s in compute] == pytest.approx([4 * MS, 4 * MS])
    plain, _ = samples_of(SameOnEveryRank(2), [case], [[timeline]])
    assert [s.seconds for s in plain] == pytest.approx([4 * MS, 3 * MS])


def test_samples_add_the_saving_back_to_a_later_task_of_another_kind_too() -> None:
    # a serial MoE call: its grouped matmul, then its pack, then its AlltoAllv; the pack
    # ran after the matmul in the same call: warm, so it gets its kind's saving back
    counts = (64, 64, 64, 64)
    plans = tuple(
        plan_gmm_alltoallv(
            shape=MoeShape(e=2, send=counts, recv=counts, h1=64, n1=128, elem_bytes=2,
                           dtype="bfloat16"),
            tiling=tiling_of("serial"), rank=r,
        )
        for r in range(2)
    )  # fmt: skip
    case = Case(name="moe", tiling="serial", run=lambda: None, plans=plans)
    kinds = [t.kind for t in plans[0].tasks]
    assert kinds == [TaskKind.GROUPED_MATMUL, TaskKind.PACK, TaskKind.ALLTOALLV]
    timeline = Timeline(records=tuple(
        rec(r, t, kind, start, end)
        for r in range(2)
        for t, (kind, start, end) in enumerate(
            ((TaskKind.GROUPED_MATMUL, 0, 4), (TaskKind.PACK, 4, 6), (TaskKind.ALLTOALLV, 6, 9))
        )
    ))  # fmt: skip
    warm = {"grouped_matmul": 1 * MS, "pack": 0.5 * MS}
    compute, _ = samples_of(SameOnEveryRank(2), [case], [[timeline]], warm_s=warm)
    got: list[tuple[str, object]] = [(s.kind, s.seconds) for s in compute]
    assert got == [
        ("grouped_matmul", pytest.approx(4 * MS)),
        ("pack", pytest.approx(2.5 * MS)),
    ]


@pytest.mark.parametrize(("compute", "comm"), [(1.5, 5.0), (1.0, 1.0), (3.0, 30.0)])
def test_fit_contention_finds_the_slowdowns_that_made_the_spans(
    compute: float, comm: float
) -> None:
    base = topology(2, alpha_us=100.0, gbps=1.0, reduce_gbps=2.0)
    truth = dataclasses.replace(
        base, contention=Contention(compute_slowdown=compute, comm_slowdown=comm)
    )
    cases = tiled_cases(2)
    spans = [[simulate(dict(enumerate(c.plans)), truth).metrics().total_s] * 3 for c in cases]
    fitted = fit_contention(base, cases, spans).contention
    assert (fitted.compute_slowdown, fitted.comm_slowdown) == (compute, comm)
    assert "mm, moe" in fitted.source
    assert compute in COMPUTE_SLOWDOWNS and comm in COMM_SLOWDOWNS


@pytest.mark.parametrize("polled", [True, False])
def test_fit_contention_keeps_to_the_measured_progress(polled: bool) -> None:
    # spans made by one machine; told how its collectives progress, the grid keeps to it:
    # polled, no comm slowdown (1.0, the grid's only point then); not polled, the slowdowns
    base = topology(2, alpha_us=100.0, gbps=1.0, reduce_gbps=2.0)
    truth = dataclasses.replace(
        base, contention=Contention(compute_slowdown=1.5, comm_slowdown=5.0)
    )
    cases = tiled_cases(2)
    spans = [[simulate(dict(enumerate(c.plans)), truth).metrics().total_s] * 3 for c in cases]
    said = "progress measured somehow"
    fitted = fit_contention(base, cases, spans, polled=polled, progress=said).contention
    assert fitted.polled is polled
    assert said in fitted.source
    if polled:
        assert fitted.comm_slowdown == 1.0
    else:
        assert (fitted.compute_slowdown, fitted.comm_slowdown) == (1.5, 5.0)


class _Transfer:
    """A nonblocking collective of ``seconds``.

    Done that long after its post where it progresses on its own, else advancing only
    inside ``wait`` (all of it left there).
    """

    def __init__(self, seconds: float, on_its_own: bool) -> None:
        self.seconds, self.on_its_own = seconds, on_its_own
        self.posted = time.perf_counter()

    def wait(self) -> None:
        left = self.posted + self.seconds - time.perf_counter()
        time.sleep(max(left, 0.0) if self.on_its_own else self.seconds)

    def test(self) -> bool:
        return self.on_its_own and time.perf_counter() >= self.posted + self.seconds


class _ProgressComm:
    """Rank 0 of 2 whose AllReduces are :class:`_Transfer` of 2 ms."""

    size = 2
    rank = 0

    def __init__(self, on_its_own: bool) -> None:
        self.on_its_own = on_its_own

    def barrier(self) -> None:
        return None

    def iallreduce(self, t: object) -> _Transfer:
        return _Transfer(0.002, self.on_its_own)

    def allgather_object(self, obj: object) -> list[object]:
        return [obj, obj]


class _PostingComm:
    """Rank 0 of 2 whose posts take known times on a clock of its own (:meth:`clocks`).

    A float32 AllReduce 2 ms, a bfloat16 one 4 ms + 1 ms per MiB (its float32 copy), an
    AlltoAllv 7 ms; each a span, none of it CPU time (as a post that waits would be).
    """

    size = 2
    rank = 0
    backend = "mpi"

    def __init__(self) -> None:
        self.now = 0.0

    def clocks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``calibrate``'s clocks read this communicator's: the span moves, the CPU time not."""
        from mc2sim.study import calibrate

        fake = types.SimpleNamespace(perf_counter=lambda: self.now, process_time=lambda: 0.0)
        monkeypatch.setattr(calibrate, "time", fake)

    def barrier(self) -> None:
        return None

    def iallreduce(self, t: torch.Tensor) -> _Transfer:
        extra = 0.0 if t.dtype == torch.float32 else 0.002 + t.numel() * 2 / 2**20 * 1e-3
        self.now += 0.002 + extra
        return _Transfer(0.0, True)

    def ialltoallv(self, t: torch.Tensor, send: object, recv: object) -> _Transfer:
        self.now += 0.007
        return _Transfer(0.0, True)

    def allgather_object(self, obj: object) -> list[object]:
        return [obj, obj]


def test_measure_issue_times_the_bare_post_and_each_kinds_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = _PostingComm()
    comm.clocks(monkeypatch)
    posting = measure_issue(comm, 3)  # type: ignore[arg-type]
    assert posting.bare_s == pytest.approx(0.002)
    assert posting.extra_s["alltoallv"] == pytest.approx(0.005)
    assert posting.extra_s["allreduce"] == posting.extra_s["reduce_scatter"]
    # the 256-element bfloat16 AllReduce's: 2 ms and the copy of its 512 bytes
    small_copy = 512 / 2**20 * 1e-3
    assert posting.extra_s["allreduce"] == pytest.approx(0.002 + small_copy)
    # 1 ms per MiB posted (2**20 / 1e-3 B/s, 1.05 GB/s), through the origin over the small
    # post's: each size's post less the small one's, (nbytes - 512) / 2**20 ms
    over = [(n - 512) / 2**20 * 1e-3 for n in POSTED_BYTES]
    slope = sum(n * y for n, y in zip(POSTED_BYTES, over, strict=True)) / sum(
        n * n for n in POSTED_BYTES
    )
    assert posting.copy_gbps == pytest.approx(1 / slope / 1e9)
    assert posting.copy_gbps == pytest.approx(2**20 / 1e-3 / 1e9, rel=1e-3)
    # a sample's posting: bare + its kind's extra + its copy
    assert posting.of("alltoallv", 2**20) == pytest.approx(0.007)
    assert posting.of("allreduce", 2**21) == pytest.approx(0.004 + small_copy + 2**21 * slope)
    assert posting.of("allgather", 2**21) == posting.bare_s
    # a ReduceScatter's post copies to float32 as an AllReduce's does (cost.FLOAT32_COPIED)
    assert posting.of("reduce_scatter", 2**21) == posting.of("allreduce", 2**21)


def test_measure_issue_by_cpu_time_counts_only_the_posts_own_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the fake's posts take spans of milliseconds and no CPU time (where ranks share cores,
    # a post's span may also hold another rank's turn; its CPU time is its work)
    comm = _PostingComm()
    comm.clocks(monkeypatch)
    posting = measure_issue(comm, 3, cpu=True)  # type: ignore[arg-type]
    assert posting.bare_s == 0.0
    assert all(v == 0.0 for v in posting.extra_s.values())
    assert posting.of("allreduce", 2**21) == 0.0
    # the span, from the same posts
    assert measure_issue(comm, 3).bare_s == pytest.approx(0.002)  # type: ignore[arg-type]


def test_measure_issue_after_a_task_runs_one_before_every_post_untimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the task takes 1 s on the post's clock: timed with the post, it would read in every figure
    from mc2sim.study import calibrate

    comm = _PostingComm()
    comm.clocks(monkeypatch)
    order: list[str] = []

    def task() -> None:
        order.append("task")
        comm.now += 1.0

    monkeypatch.setattr(calibrate, "_task_before_post", lambda: task)
    posting = measure_issue(comm, 3, after_task=True)  # type: ignore[arg-type]
    assert posting.bare_s == pytest.approx(0.002)
    assert posting.extra_s["alltoallv"] == pytest.approx(0.005)
    assert posting.copy_gbps == pytest.approx(2**20 / 1e-3 / 1e9, rel=1e-3)
    # one task before each post: 4 posts (a warm-up and 3) of each of the bare, AlltoAllv,
    # small AllReduce and the POSTED_BYTES AllReduces
    assert order == ["task"] * 4 * (3 + len(POSTED_BYTES))
    order.clear()
    measure_issue(comm, 3)  # type: ignore[arg-type]
    assert order == []  # back to back: no task


def test_the_task_before_a_post_is_a_bfloat16_matmul_of_a_tile() -> None:
    from mc2sim.study.calibrate import POST_AFTER_MNK, _task_before_post

    out = _task_before_post()()
    m, k, n = POST_AFTER_MNK
    assert isinstance(out, torch.Tensor)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert torch.all(out == k)  # ones @ ones: each element sums k ones


def test_measure_progress_tells_polled_from_progressing_on_its_own() -> None:
    # polled: after the rank computed for twice the collective's time, all of it is left
    polled = measure_progress(_ProgressComm(on_its_own=False), 3)  # type: ignore[arg-type]
    assert polled == pytest.approx(1.0, abs=0.3)
    assert polled > POLLED_SHARE
    # on its own: done while the rank computed, nothing left
    apart = measure_progress(_ProgressComm(on_its_own=True), 3)  # type: ignore[arg-type]
    assert apart < 0.1
    assert run_threads(1, lambda comm: measure_progress(comm, 3)) == [0.0]  # nothing to send


def test_measure_duplex_times_three_exchanges_alike_on_every_rank() -> None:
    measured = run_threads(4, lambda comm: measure_duplex(comm, 3))
    assert all(m == measured[0] for m in measured)
    assert min(measured[0].one_way_s, measured[0].both_ways_s, measured[0].one_to_all_s) > 0
    with pytest.raises(ParamInvalidError, match="comm.*at least 2 ranks"):
        run_threads(1, lambda comm: measure_duplex(comm, 3))


def test_measure_independent_agrees_on_every_rank_with_the_conversion_on_every_rank() -> None:
    two = run_threads(2, lambda comm: measure_independent(comm, 3))
    assert two[0] == two[1]  # rank 0's figures, the slowest pair's and rank's, on both
    figures = dataclasses.asdict(two[0])
    assert all(isinstance(v, float) and v > 0 for v in figures.values()), figures
    # one rank: no peer to exchange with; the conversion on every rank is its own
    (one,) = run_threads(1, lambda comm: measure_independent(comm, 3))
    assert one.pingpong_us == one.pingpong_loaded_us == 0.0
    assert one.upcast_loaded_gbps > 0 and one.upcast_gbps > 0


# ---------------------------------------------------------------- interleaved rounds


def test_measure_rounds_interleaves_the_calls_and_drops_the_warm_up() -> None:
    calls: list[str] = []

    def call(label: str) -> None:
        calls.append(label)
        sink = current_recorder()
        assert sink is not None, "each call runs inside a recording"
        end = len(calls) * MS
        run = RunKey(op=label, tiling="serial")
        sink.add_raw((0, run, 0, label, Stream.COMPUTE, "matmul", 0.0, end, 0, 0, 0, 0))

    seen: list[tuple[int, int, str]] = []
    rounds = measure_rounds(
        SameOnEveryRank(1), [lambda: call("a"), lambda: call("b")], reps=2,
        progress=lambda i, n, label: seen.append((i, n, label)),
    )  # fmt: skip
    assert sorted(calls[0:2]) == sorted(calls[2:4]) == sorted(calls[4:6]) == ["a", "b"]
    # each run's kept spans are the ends of its own calls after the warm-up round
    spans = [[t.metrics().total_s for t in mine] for mine in rounds]
    for label, mine in zip("ab", spans, strict=True):
        own = [(i + 1) * MS for i, c in enumerate(calls) if c == label][1:]
        assert mine == pytest.approx(own)
    assert seen == [(0, 3, "warm-up"), (1, 3, "round 1/2"), (2, 3, "round 2/2")]


def test_the_collective_sweep_runs_each_size_through_the_executor_as_the_ops_do() -> None:
    from mc2sim.study.calibrate import COLLECTIVE_BYTES, collective_cases

    def body(comm: ThreadCommunicator) -> tuple[list[Case], list[ComputeSample], list[CommSample]]:
        cases = collective_cases(comm)
        compute, samples = samples_of(
            comm, cases, measure_rounds(comm, [c.run for c in cases], reps=2)
        )
        return cases, compute, samples

    (cases, compute, samples), _ = run_threads(2, body)
    # an AllReduce of n bytes and an even AlltoAllv of 64-element bfloat16 rows, >= 1 a peer
    expected = []
    for n in COLLECTIVE_BYTES:
        expected += [("allreduce", float(n)), ("alltoallv", float(max(n // 256, 1) * 2 * 128))]
    assert [(s.kind, s.nbytes) for s in samples] == expected
    assert compute == [] and all(s.seconds > 0 and s.weight == 1.0 for s in samples)
    for case in cases:  # one collective, every rank's plan alike but for its rank
        assert [p.rank for p in case.plans] == [0, 1]
        assert [len(p.tasks) for p in case.plans] == [1, 1] and case.tiling == "serial"


def test_collectives_posted_together_are_all_posted_before_any_is_waited_for() -> None:
    from mc2sim.study.calibrate import TOGETHER_BYTES, TOGETHER_POSTS, together_cases

    def body(comm: ThreadCommunicator) -> tuple[list[Case], list[list[Timeline]]]:
        cases = together_cases(comm)
        return cases, measure_rounds(comm, [c.run for c in cases], reps=2)

    (cases, rounds), _ = run_threads(2, body)
    assert [c.name for c in cases] == [
        f"allreduce of {TOGETHER_BYTES} bytes, {TOGETHER_POSTS} posted at once",
        f"alltoallv of {TOGETHER_BYTES} bytes, {TOGETHER_POSTS} posted at once",
    ]
    sent = (TOGETHER_BYTES // 256) * 128  # 64-element bfloat16 rows, half of them to the peer
    for case, kind, nbytes in zip(
        cases, ("allreduce", "alltoallv"), (TOGETHER_BYTES, sent), strict=True
    ):
        for rank, plan in enumerate(case.plans):
            assert plan.rank == rank and [t.id for t in plan.tasks] == list(range(TOGETHER_POSTS))
            assert {(str(t.kind), t.bytes, t.deps) for t in plan.tasks} == {(kind, nbytes, ())}
    for mine in rounds:
        for timeline in mine:  # every rank posted all four before its first wait ended
            for rank in (0, 1):
                records = [r for r in timeline.records if r.rank == rank]
                assert len(records) == TOGETHER_POSTS
                assert max(r.start_s for r in records) <= min(r.end_s for r in records)
    assert together_cases(SameOnEveryRank(1)) == []  # nothing to exchange


def test_measure_rounds_needs_a_round() -> None:
    with pytest.raises(ParamInvalidError) as err:
        measure_rounds(SameOnEveryRank(1), [lambda: None], reps=0)
    assert err.value.param == "reps"


def test_measure_rounds_shuffles_each_round_the_same_way_on_every_rank() -> None:
    def orders() -> list[list[int]]:
        calls: list[int] = []
        runs = [lambda i=i: calls.append(i) for i in range(6)]
        measure_rounds(SameOnEveryRank(1), runs, reps=4)
        return [calls[r * 6 : r * 6 + 6] for r in range(5)]

    first = orders()
    assert all(sorted(order) == list(range(6)) for order in first), "each round runs each once"
    assert len({tuple(order) for order in first}) > 1, "no fixed order"
    assert orders() == first, "seeded: every rank (every process) runs the same order"


@pytest.mark.parametrize(
    ("flag", "value", "shown"),
    [("--out", "x", "'x'"), ("--name", "x", "'x'"), ("--fits", "2", "2")],
)
def test_validate_model_flags_for_the_fitted_topology_need_calibrate(
    flag: str,
    value: str,
    shown: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mc2sim.comm
    from mc2sim.cli import main

    def no_mpi(*args: object, **kwargs: object) -> None:
        raise AssertionError("the arguments alone are wrong: found before MPI starts")

    monkeypatch.setattr(mc2sim.comm, "init", no_mpi)
    assert main(["validate-model", flag, value]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mc2sim validate-model: {flag}={shown}: is for the fitted topology: it needs --calibrate\n"
    )


# ---------------------------------------------------------------- several hosts


def level_samples(truth: Topology, wide: bool) -> list[CommSample]:
    """Collectives of every kind timed on a one-dimension ``truth``, reductions wide or not."""
    truth = dataclasses.replace(
        truth, device=dataclasses.replace(truth.device, reductions_in_float32=wide)
    )
    world = truth.world_size
    samples = []
    for nbytes in (3e4, 2.6e5, 2e6, 6e6, 1.2e7):
        samples += [
            CommSample(kind="allreduce", nbytes=nbytes, seconds=allreduce_time(truth, nbytes)),
            CommSample(kind="allgather", nbytes=nbytes, seconds=allgather_time(truth, nbytes)),
            CommSample(
                kind="reduce_scatter", nbytes=nbytes, seconds=reduce_scatter_time(truth, nbytes)
            ),
        ]
        # an even AlltoAllv: every rank sends nbytes / world to each peer
        peers = [np.array([q for q in range(world) if q != r]) for r in range(world)]
        share = np.full(world - 1, nbytes / world)
        even = alltoallv_time(truth, [(p, share, p, share) for p in peers])
        samples.append(CommSample(kind="alltoallv", nbytes=nbytes, seconds=even))
    return samples


def test_levels_split_the_job_by_host() -> None:
    def levels(hosts: list[str]) -> tuple[list[tuple[str, int, int]], int]:
        def body(comm: ThreadCommunicator) -> tuple[list[tuple[str, int, int]], int]:
            found, per_node = _levels(comm, hosts[: comm.size])
            return [(lv.name, lv.group.size, lv.group.rank) for lv in found], per_node

        return run_threads(len(hosts), body)[len(hosts) - 1]  # the last rank's view

    assert levels(["a", "a", "b", "b"]) == (
        [("shared-memory", 2, 1), ("inter-node", 2, 1)],
        2,
    )
    assert levels(["a", "b", "c"]) == ([("inter-node", 3, 2)], 1)
    assert levels(["a", "a", "a"]) == ([("shared-memory", 3, 2)], 3)


def test_levels_refuse_ranks_not_placed_by_host() -> None:
    def body(comm: ThreadCommunicator) -> None:
        _levels(comm, ["a", "b", "a", "b"])

    with pytest.raises(ParamInvalidError, match="placed by host"):
        run_threads(4, body)


@pytest.mark.parametrize("wide", [False, True], ids=["16-bit", "float32-wire"])
def test_both_levels_are_fitted_from_their_own_groups(wide: bool) -> None:
    # shared memory inside a host (fast, short latency) and TCP across hosts (slow, long):
    # each level's samples come from its own groups; the reductions' rate, a property of the
    # ranks, is one figure fitted on both; shared memory measured half duplex (one core copies
    # both ways), the network full
    intra = topology(2, alpha_us=80.0, gbps=3.0, reduce_gbps=1.5)
    intra = dataclasses.replace(
        intra, network=(dataclasses.replace(intra.network[0], duplex=Duplex.HALF),)
    )
    inter = topology(2, alpha_us=400.0, gbps=0.4, reduce_gbps=1.5)
    samples = [level_samples(intra, wide), level_samples(inter, wide)]
    groups = [
        _Level(name="shared-memory", group=SameOnEveryRank(2)),
        _Level(name="inter-node", group=SameOnEveryRank(2)),
    ]
    half = DuplexMeasure(one_way_s=1.0, both_ways_s=2.0, one_to_all_s=1.0, duplex=Duplex.HALF)
    network, reduce_gbps = _fit_levels(
        groups, samples, wide=wide, per_node=2, duplexes=[half, None]
    )
    assert [(d.name, d.ranks) for d in network] == [("shared-memory", 2), ("inter-node", 2)]
    assert [d.duplex for d in network] == [Duplex.HALF, Duplex.FULL]
    assert [d.bandwidth_gbps for d in network] == pytest.approx([3.0, 0.4], rel=1e-6)
    assert [d.latency_us for d in network] == pytest.approx([80.0, 400.0], rel=1e-6)
    assert reduce_gbps == pytest.approx(1.5, rel=1e-6)


def test_one_rank_per_host_makes_the_host_a_dimension_of_one_rank() -> None:
    inter = topology(3, alpha_us=400.0, gbps=0.4, reduce_gbps=1.5, kind=LinkKind.SWITCH)
    groups = [_Level(name="inter-node", group=SameOnEveryRank(3))]
    network, _ = _fit_levels(
        groups, [level_samples(inter, True)], wide=True, per_node=1, duplexes=[None]
    )
    assert [(d.name, d.ranks) for d in network] == [("one rank per host", 1), ("inter-node", 3)]
    assert network[1].kind is LinkKind.SWITCH, "a host's port, whatever the timings"
    assert network[1].bandwidth_gbps == pytest.approx(0.4, rel=1e-6)


def test_a_network_with_no_measurable_cost_per_byte_fits_an_unbounded_bandwidth() -> None:
    # times that do not grow with bytes (latency alone, as noise can make a short run look):
    # the fit keeps the latency and an unbounded bandwidth instead of failing the calibration
    from mc2sim.model.fit import UNBOUNDED_GBPS

    samples = [
        CommSample(kind=kind, nbytes=nbytes, seconds=1e-4)
        for kind in ("allreduce", "alltoallv", "allgather", "reduce_scatter")
        for nbytes in (1e3, 1e5, 1e7)
    ]
    dim, _ = fit_network(samples, 2)
    assert dim.bandwidth_gbps == UNBOUNDED_GBPS
    assert dim.latency_us > 0


def test_a_rate_is_the_least_squares_slope_through_the_origin() -> None:
    # 1 MB in 1 ms and 4 MB in 4 ms: 1 GB/s exactly
    assert fit_rate([1e6, 4e6], [1e-3, 4e-3]) == pytest.approx(1.0)
    # 1 MB in 1 ms, 2 MB in 3 ms: slope (1e6 * 1e-3 + 2e6 * 3e-3) / (1e12 + 4e12) = 1.4e-9 s/B
    assert fit_rate([1e6, 2e6], [1e-3, 3e-3]) == pytest.approx(1 / 1.4)
    # no per-byte cost measured (posts no slower than the fixed part): 0, not a negative rate
    assert fit_rate([1e6, 4e6], [-1e-6, 0.0]) == 0.0


def test_the_speed_probe_is_rank_0s_one_thread_matmul_and_every_rank_gets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mc2sim.study.measure as measure

    threads = torch.get_num_threads()
    seen: list[int] = []

    def timed(fn: Callable[[], object], reps: int) -> float:
        seen.append(torch.get_num_threads())
        return 0.02  # seconds of one 1024^3 matmul: 2 * 1024^3 / 0.02 FLOP/s

    monkeypatch.setattr(measure, "alone_median", timed)
    assert measure.matmul_tflops() == pytest.approx(2 * 1024**3 / 0.02 / 1e12)
    assert seen == [1] and torch.get_num_threads() == threads  # one thread, then restored

    def body(comm: ThreadCommunicator) -> float:
        return measure.probe_tflops(comm)

    seen.clear()
    assert run_threads(3, body) == [pytest.approx(2 * 1024**3 / 0.02 / 1e12)] * 3
    assert seen == [1]  # rank 0 alone timed it


def test_a_dtype_whose_time_the_fixed_terms_take_keeps_the_rate_it_reached() -> None:
    from mc2sim.model.fit import fit_peaks
    from mc2sim.topology import Efficiency

    flat = Efficiency(small_util=1.0, large_util=1.0, half_flops=1e9)
    # float16: 1 TFLOP/s of arithmetic above 100 us of launch; float32: faster than the launch
    # the reference kernels' fit holds (a BLAS kernel of one rank, one round)
    fp16 = [ComputeSample(dtype="float16", flops=f, nbytes=0.0, seconds=1e-4 + f / 1e12)
            for f in (1e8, 1e9)]  # fmt: skip
    fp32 = [ComputeSample(dtype="float32", flops=f, nbytes=0.0, seconds=s)
            for f, s in ((1e7, 5e-5), (4e7, 8e-5))]  # fmt: skip
    peaks = fit_peaks(fp16 + fp32, flat, launch_us=100.0, memory_gbps=1e6)
    assert peaks["float16"] == pytest.approx(1.0, rel=1e-6)
    assert peaks["float32"] == pytest.approx(4e7 / 8e-5 / 1e12)  # the fastest sample's rate


def _two_hosts(inner_us: float, outer_us: float, *, cores: float, **device: Any) -> Topology:
    """2 hosts x 2 ranks, the given level latencies and device figures."""
    from tests.unit.test_simulator_by_hand import machine

    topo = machine(4)
    inner = dataclasses.replace(topo.network[0], ranks=2, latency_us=inner_us)
    outer = dataclasses.replace(topo.network[0], ranks=2, latency_us=outer_us)
    dev = dataclasses.replace(topo.device, cores_per_node=cores, **device)
    return dataclasses.replace(topo, device=dev, network=(inner, outer))


def test_split_sharing_moves_what_sharing_adds_apart_and_keeps_the_fitted_shares_times() -> None:
    from mc2sim.model.cost import issue_times, message_latency
    from tests.unit.test_simulator_by_hand import (
        allreduce,
        alltoallv,
        assert_spans,
        mm,
        plan,
        spans,
    )

    # fitted with 2 ranks on each host's 1 core: inner 0.4 s a message, outer 0.5 s, a post
    # 0.37 s; the lone pair: 0.1 s and 0.15 s. Sharing adds 0.3 s a message and 0.22 s a post
    fitted = _two_hosts(0.4e6, 0.5e6, cores=1, issue_us=0.37e6)
    lone = LonePair(latency_us=0.1e6, issue_us=0.15e6)
    network, issue, shared_issue, shared_latency = split_sharing(fitted.network, 0.37e6, lone)
    assert [d.latency_us for d in network] == pytest.approx([0.1e6, 0.2e6])
    assert (issue, shared_issue, shared_latency) == pytest.approx((0.15e6, 0.22e6, 0.3e6))
    split = dataclasses.replace(
        fitted,
        network=network,
        device=dataclasses.replace(
            fitted.device,
            issue_us=issue,
            shared_issue_us=shared_issue,
            shared_latency_us=shared_latency,
        ),
    )
    # at the fitted share (1/2) a message and a post cost what they were fitted at ...
    assert fitted.core_share == split.core_share == 0.5
    for f, s in zip(fitted.network, split.network, strict=True):
        assert message_latency(split, s) == pytest.approx(message_latency(fitted, f))
    nbytes = np.array([4.0])
    assert issue_times(split, TaskKind.ALLREDUCE, nbytes) == pytest.approx(
        issue_times(fitted, TaskKind.ALLREDUCE, nbytes)
    )
    # ... and so does a plan of every kind of task, simulated
    rows = [1, 1, 1, 1]
    plans = {r: plan(r, 4, allreduce(1), alltoallv(rows, rows, r), mm(1, 0)) for r in range(4)}
    assert_spans(simulate(plans, split), spans(simulate(plans, fitted)))
    # with a core per rank (2 cores a host), the split topology pays the lone pair's figures:
    # a message 0.1 s inside a host, a post 0.15 s
    own = dataclasses.replace(split, device=dataclasses.replace(split.device, cores_per_node=2))
    assert own.core_share == 1.0
    assert message_latency(own, own.network[0]) == pytest.approx(0.1)
    assert issue_times(own, TaskKind.ALLREDUCE, nbytes)[0] == pytest.approx(0.15)
    # an outer level faster than what sharing adds stops at 0 ...
    network, *_ = split_sharing(_two_hosts(0.4e6, 0.2e6, cores=1).network, 0.37e6, lone)
    assert [d.latency_us for d in network] == pytest.approx([0.1e6, 0.0])
    # ... and a lone pair slower than the fit leaves the figures as fitted, adding nothing
    slow = LonePair(latency_us=0.5e6, issue_us=0.4e6)
    network, issue, shared_issue, shared_latency = split_sharing(fitted.network, 0.37e6, slow)
    assert network == fitted.network
    assert (issue, shared_issue, shared_latency) == (0.37e6, 0.0, 0.0)


def test_measure_lone_pair_times_ranks_0_and_1_alone_and_agrees_on_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mc2sim.study.calibrate as calibrate_module

    swept: list[tuple[int, int]] = []  # (the sweeping comm's size, its rank)
    sweep = calibrate_module.measure_collectives

    def recorded(comm: ThreadCommunicator, reps: int) -> list[CommSample]:
        swept.append((comm.size, comm.rank))
        return sweep(comm, reps)

    monkeypatch.setattr(calibrate_module, "measure_collectives", recorded)
    four = run_threads(4, lambda comm: measure_lone_pair(comm, 1, wide=True))
    assert all(lone == four[0] for lone in four)  # rank 0's figures on every rank
    assert four[0].issue_us > 0 and four[0].latency_us >= 0
    assert sorted(swept) == [(2, 0), (2, 1)]  # only the pair swept, on a communicator of two
    with pytest.raises(ValueError, match="at least 2 ranks"):
        run_threads(1, lambda comm: measure_lone_pair(comm, 1, wide=True))


def test_the_lone_memory_speedup_reads_one_rank_over_every_rank_where_each_has_a_core() -> None:
    from mc2sim.study.calibrate import Independent, lone_memory_speedup_of
    from tests.unit.test_physics_by_hand import with_device
    from tests.unit.test_simulator_by_hand import machine

    def independent(alone: float, loaded: float) -> Independent:
        return Independent(
            matmul_tflops=0.2, memcpy_gbps=12.0, upcast_gbps=alone, pingpong_us=15.0,
            pingpong_loaded_us=16.0, upcast_loaded_gbps=loaded,
        )  # fmt: skip

    def with_cores(ranks: int, cores: float) -> Topology:
        return with_device(machine(ranks), cores_per_node=cores)

    own_cores = with_cores(8, 16)
    assert own_cores.core_share == 1.0
    assert lone_memory_speedup_of(independent(4.0, 2.5), own_cores) == pytest.approx(1.6)
    # every rank at once no slower than one alone (noise): no speedup, not below 1
    assert lone_memory_speedup_of(independent(2.0, 2.5), own_cores) == 1.0
    # ranks sharing cores (their processor sharing speeds a task up already), a node of one
    # rank, a figure not measured: 1
    assert lone_memory_speedup_of(independent(4.0, 2.5), with_cores(4, 2)) == 1.0
    assert lone_memory_speedup_of(independent(4.0, 2.5), with_cores(1, 16)) == 1.0
    assert lone_memory_speedup_of(independent(4.0, 0.0), own_cores) == 1.0
