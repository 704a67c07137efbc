"""Calibrate a topology for the ranks at hand from microbenchmarks and overlapped runs.

Run on every rank (under mpiexec). All ranks measure at the same time, so each rank's
figures include what the others take from the machine, as in real runs:

1. serial runs of every op at calibration sizes (the scenario files of
   ``scenarios/calibration/``: MatmulAllReduce at six shapes from memory-bound to
   compute-bound, both MoE ops, AllGatherMatmul, MatmulReduceScatter, all bfloat16, and one
   GroupedMatMulAlltoAllv of small tiles for the executor's per-task costs; the pairs of
   :data:`SAMPLED`), recorded task by task: their compute tasks fit ``launch + flops / (peak *
   util(flops)) + bytes / bandwidth`` with ``util(f) = small + (large - small) * f / (f +
   half)``, rising to 1 (least squares on relative error; the reference kernels'
   memory passes add to their arithmetic: ``memory_overlap: false``), and their AllReduce,
   AlltoAllv, AllGather and ReduceScatter tasks fit the alpha-beta model of one network
   dimension (the better of full mesh and switch) jointly with the vector rate of the
   reductions' additions, at the dimension's duplex, measured apart (:func:`measure_duplex`:
   whether a rank's send and receive bytes add up, as where one core copies both ways).
   Tasks timed inside the ops carry every cost the model must
   predict (conversions, copies, the communicator's own work), which bare-kernel timings
   miss. On several hosts (the same number of ranks on each, placed by host) these runs
   are made on groups of each network level, every group at once: the ranks of each host
   (shared memory) and one rank of each host (the inter-node network, a switch), and
   both levels are fitted together with one rate of the additions
   (:func:`mc2sim.model.fit.fit_levels`): a topology of two dimensions;
2. the bare kernels at several shapes in float16, float32 and int8 give those dtypes' peaks,
   and a reduce task's float32 sum of every rank's partial gives the vector rate, the other
   terms held fixed;
3. contention: tiled runs of four ops (MatmulAllReduce at two shapes, both MoE ops,
   AllGatherMatmul, and a GroupedMatMulAlltoAllv of a few KiB per chunk; the pairs of
   :data:`CONTENTION`; four AllReduces and four AlltoAllvs posted at once
   (:func:`together_cases`); and, where ranks share cores, the small calls of :data:`WARMED`
   in two tiles), measured for real and simulated over a grid of compute and communication
   slowdowns and of how collectives in flight progress (together, one at a time, or
   together but for the reductions and gathers: ``Device.concurrent_collectives``,
   ``Device.one_at_a_time``); the point with the smallest absolute log error is kept.
   Whether a collective progresses while its rank computes is measured, not fitted
   (:func:`measure_progress`): where it does not (``Contention.polled``), the grid has no
   communication slowdown.

Besides (``docs/MODEL.md``): every compute task and collective of the serial runs is kept as
the device's profile (interpolated in log space by the model), with a bfloat16 AllReduce and
AlltoAllv timed over :data:`COLLECTIVE_BYTES` twice: posted again and again, their caches
warm (:func:`measure_collectives`: the network fit's latency and bandwidth), and run by the
executor among the other calls of the rounds (:func:`collective_cases`: the profile, what
the ops' collectives meet); the
cores the ranks share are read (:func:`node_cores`) and every compute figure scaled to a
whole core; the issue overhead of a nonblocking collective is timed (:func:`measure_issue`;
its CPU time where ranks share cores, a whole core's), back to back and right after a compute
task as a plan posts, and taken off every collective sample (the back-to-back post off the
sweep's, the other off the profile's, whose posts met the machine as a plan's do);
where ranks share cores, the contention fit also finds how long a collective waits for peers
off their cores (``Device.slice_us``), and the latency and the post are timed again on one
pair of ranks with the others asleep (:func:`measure_lone_pair`): the network's latencies
and ``Device.issue_us`` become those of ranks on cores of their own, and the rest what
sharing a core adds (``Device.shared_latency_us``, ``Device.shared_issue_us``); a small
call of each compute kind runs in two tiles where ranks share cores, else twice in a row
(:func:`warm_cases`), and what a later task saves on the first is its kind's
``Device.warm_us`` (:func:`warm_savings`; it is added back to a sampled call's tasks after
its first, so the profile holds first tasks); and a
float32 matmul, a memcpy, a 16-bit to float32 conversion (alone and on every rank at once)
and a 4-byte exchange are timed apart from the fit (:func:`measure_independent`) for
``calibrate`` to print beside the fitted figures. A call's figure over its rounds is their
lower quartile (:func:`mc2sim.model.accuracy.typical`).

Every measurement runs its calls in interleaved rounds (each round calls each once, after a
warm-up round; :func:`mc2sim.study.measure.measure_rounds`) and keeps lower quartiles, so a slow
spell of a shared machine lands on all of them alike. The fits are :mod:`mc2sim.model.fit`'s.
Sizes here differ from the ones ``mc2sim validate-model`` checks the model on.
"""

from __future__ import annotations

import functools
import math
import os
import random
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from mc2sim._yaml import shipped_dir
from mc2sim.comm import Communicator
from mc2sim.comm.base import Work
from mc2sim.errors import ParamInvalidError
from mc2sim.kernels import matmul, quant_matmul
from mc2sim.model.accuracy import typical
from mc2sim.model.cost import FLOAT32_COPIED
from mc2sim.model.fit import (
    UNBOUNDED_TFLOPS,
    CommSample,
    ComputeSample,
    LevelSamples,
    fit_comm_profile,
    fit_compute,
    fit_contention,
    fit_levels,
    fit_peaks,
    fit_profile,
    fit_rate,
)
from mc2sim.model.heterogeneity import Straggler
from mc2sim.ops.spec import TilingSpec
from mc2sim.runtime import machine_id
from mc2sim.scenario import load
from mc2sim.schedule.executor import execute
from mc2sim.schedule.plan import Plan, Resource, Task, TaskKind
from mc2sim.schedule.traffic import Placement
from mc2sim.study.measure import (
    Case,
    alone_median,
    asleep_until_done,
    cases_of,
    measure_rounds,
    probe_tflops,
)
from mc2sim.timeline import RunKey, Stream, TaskRecord, Timeline
from mc2sim.topology import (
    Contention,
    CoreSharing,
    Device,
    Duplex,
    Efficiency,
    LinkKind,
    NetworkDim,
    ProfilePoint,
    Topology,
)

__all__ = [
    "CONTENTION",
    "SAMPLED",
    "LonePair",
    "WARMED",
    "Calibration",
    "Independent",
    "Posting",
    "calibrate",
    "calibration_cases",
    "calibration_dir",
    "contention_cases",
    "warm_cases",
    "fitted_cases",
    "core_share",
    "rank_speeds",
    "SPEED_TASK_S",
    "warm_savings",
    "COLLECTIVE_BYTES",
    "collective_cases",
    "TOGETHER_BYTES",
    "TOGETHER_POSTS",
    "together_cases",
    "measure_collectives",
    "DUPLEX_BYTES",
    "DuplexMeasure",
    "measure_compute",
    "measure_duplex",
    "measure_independent",
    "measure_issue",
    "measure_lone_pair",
    "measure_progress",
    "measure_vector",
    "measure_waiting",
    "nearest_duplex",
    "node_cores",
    "samples_of",
    "share_of_cores",
    "sharing_of",
    "split_sharing",
    "waiting_weight_of",
    "lone_memory_speedup_of",
    "measure_rank_spread",
    "work_s",
]

_T = TypeVar("_T")

SAMPLED: tuple[tuple[str, TilingSpec], ...] = (
    ("cal_mm_1024x64x1024", "serial"),
    ("cal_mm_3072x48x2048", "serial"),
    ("cal_mm_2048x192x1536", "serial"),
    ("cal_mm_4096x128x512", "serial"),
    ("cal_mm_64x256x256", "serial"),  # small: per-task and per-message fixed costs dominate
    # the matmul profile's low end, 1 MFLOP, where small calls' tiles fall: from 8 MFLOP up,
    # the line through the points overshot a 2 MFLOP tile by 37% (126 us against 92)
    ("cal_mm_32x64x256", "serial"),
    ("cal_mm_256x128x512", "serial"),
    # the grouped matmul's profile over four decades of FLOPs: 17 and 134 MFLOP between the
    # small chunks' and 1024 tokens' points (a skewed rank's 347 MFLOP grouped matmul, on
    # 4 ranks of a 16-core host, was predicted 20% too slow from points at 0.7 and 550)
    ("cal_combine_128", "serial"),
    ("cal_combine_256", "serial"),
    ("cal_combine_1024", "serial"),
    # large: a CPU's grouped matmul slows per FLOP once its operands leave the caches, and
    # past the profile's largest point the model holds that point's ratio (4096 tokens per
    # rank took twice the time so extrapolated: docs/BENCHMARKS.md, issue 17)
    ("cal_combine_4096", "serial"),
    ("cal_dispatch_1024", "serial"),
    ("cal_combine_64", 4),  # small chunks: the executor's per-task costs
    ("cal_all_gather", "serial"),
    ("cal_reduce_scatter", "serial"),
    ("cal_ifa_small", "serial"),  # the attention kernel's profile
    ("cal_ifa_mid", "serial"),
    ("cal_ifa_long", "serial"),
    ("cal_ifa_large", "serial"),
    # the int8 and weight-quant kernels' profiles, over two decades of FLOPs each: one
    # point held the ratio of its size at every size (a 537 MFLOP int8 call predicted 22%
    # too slow from a 268 MFLOP point: a CPU's int8 GEMM runs faster per FLOP as it grows)
    ("cal_mm_w8a8_small", "serial"),
    ("cal_mm_w8a8", "serial"),
    ("cal_mm_w8a8_large", "serial"),
    ("cal_mm_weight_quant_small", "serial"),
    ("cal_mm_weight_quant", "serial"),
    ("cal_mm_weight_quant_large", "serial"),
)
"""(calibration scenario, tiling) whose tasks give the compute and collective samples."""

ROOFLINE_KINDS = ("matmul", "grouped_matmul", "reduce")
"""The task kinds the roofline is fitted on (16-bit matmuls and the reductions' passes);
every kind, these too, is also kept in the device's profile, which corrects the roofline kind
by kind. Not the packs (row gathers): they move the bytes they count where the kernels move
``KERNEL_TRAFFIC`` times as many, and with the serial MoE plans' reorders among the samples
they pulled the fitted memory rate to 4 to 5x a memcpy's (59 GB/s against 13.8)."""

CONTENTION: tuple[tuple[str, TilingSpec], ...] = (
    ("cal_mm_3072x48x2048", 4),
    ("cal_mm_2048x192x1536", 4),
    ("cal_combine_1024", "hardware"),
    ("cal_dispatch_1024", "hardware"),
    ("cal_all_gather", "hardware"),
    ("cal_combine_128", "hardware"),  # small messages in flight together
)
"""(calibration scenario, tiling) of the tiled runs the contention is fitted on: chunks from
large (bandwidth shared with compute) to a few KiB (latency), so the fit also sees whether
collectives in flight progress together."""


def calibration_dir() -> Path:
    """Return the shipped ``scenarios/calibration`` folder."""
    return shipped_dir("scenarios") / "calibration"


def _cases(comm: Communicator, pairs: Sequence[tuple[str, TilingSpec]]) -> list[Case]:
    """One case per (calibration scenario, tiling), on the ranks of ``comm``."""
    return [
        cases_of(load(calibration_dir() / f"{name}.yaml"), comm, [tiling])[0]
        for name, tiling in pairs
    ]


def calibration_cases(comm: Communicator) -> list[Case]:
    """The calls of :data:`SAMPLED` (``mc2sim calibrate``'s per-task samples)."""
    return _cases(comm, SAMPLED)


def contention_cases(comm: Communicator) -> list[Case]:
    """The calls of :data:`CONTENTION` (``mc2sim calibrate``'s contention fit)."""
    return _cases(comm, CONTENTION)


WARMED: tuple[str, ...] = (
    "cal_mm_64x256x256",
    "cal_combine_128",  # grouped matmul
    "cal_dispatch_128",  # pack: a dispatch's first task
    "cal_ifa_small",
    "cal_mm_w8a8_small",
    "cal_mm_weight_quant_small",
)
"""Calibration scenarios :func:`warm_cases` runs to see what a warm task saves: a small call
of each compute kind, where what a warm task saves weighs most against its time."""


def _twice(run: Callable[[], object]) -> None:
    run()
    run()


def warm_cases(comm: Communicator, *, in_call: bool) -> list[Case]:
    """The calls of :data:`WARMED`: in two tiles (``in_call``), else serial twice in a row.

    Where ranks share cores, a barrier between two calls hands a core to another rank, and
    the second call starts as cold as the first: a call's later tasks are seen in its own
    tiles. Where each rank has a core, its caches stay with it across the barrier, and the
    second of two calls in a row meets the first's, as a tiled call's later tasks do.
    """
    if in_call:
        return _cases(comm, [(name, 2) for name in WARMED])
    return [
        replace(c, name=f"{c.name} twice", run=functools.partial(_twice, c.run))
        for c in _cases(comm, [(name, "serial") for name in WARMED])
    ]


def fitted_cases(comm: Communicator) -> list[Case]:
    """Every call the fit is made on, in order: the serial samples, then the tiled calls.

    The tiled calls: :data:`CONTENTION`'s, the collectives posted at once
    (:func:`together_cases`), and where ranks share cores, the :data:`WARMED` calls in two
    tiles.
    """
    tiled = contention_cases(comm) + together_cases(comm)
    if core_share(comm) < 1.0:
        tiled += warm_cases(comm, in_call=True)
    return calibration_cases(comm) + tiled


def work_s(record: TaskRecord, cpu: bool) -> float:
    """A compute task's time: its CPU time where ``cpu`` and measured, else its span.

    Where ranks share cores a task's span also holds the other ranks' turns on its core; its
    CPU time is its own work, a whole core's (the executor records it on the host's CPU).
    """
    return record.cpu_s if cpu and record.cpu_s is not None else record.duration_s


def warm_savings(
    rounds: Sequence[Sequence[Timeline]], *, cpu: bool = False, in_call: bool = True
) -> dict[str, float]:
    """Seconds a compute task saves when its rank computed earlier in the call (``cpu``: CPU time).

    ``rounds[i]``: the gathered timelines of :func:`warm_cases`' case i. ``in_call``: each
    one call whose tiles split its work evenly; in every round, each rank's first compute
    task less its next task of the same kind (:func:`work_s`), for the first task's kind; the
    median over the ranks, then over the rounds, then over the cases of the kind; none below
    0. The first task follows other calls (the rounds interleave them), as a call's first
    task does; the other follows compute of the same call, with no barrier between, as a
    call's later tasks do. Where ranks share cores, a barrier between two calls hands the
    core to another rank, which leaves it as cold as a first task's: 4 ranks here, an 8
    MFLOP attention tile saved 0.24 ms after a whole call of its kind, 0.3 to 0.4 ms after a
    tile of the call. Else (each rank keeps its core) each a call run twice in a row
    (:func:`_saved_between_calls`).
    """
    if not in_call:
        return _median_savings(rounds, functools.partial(_saved_between_calls, cpu=cpu))
    return _median_savings(rounds, functools.partial(_saved_in_call, cpu=cpu))


def _median_savings(
    rounds: Sequence[Sequence[Timeline]], saved_in: Callable[[Timeline], dict[str, list[float]]]
) -> dict[str, float]:
    """Each kind's saving over :func:`warm_cases`' rounds, none below 0.

    ``saved_in`` of every timeline (by kind, one figure per rank): the median over the ranks,
    then over the rounds, then over the cases of the kind.
    """
    by_kind: dict[str, list[float]] = {}
    for timelines in rounds:
        per_case: dict[str, list[float]] = {}
        for timeline in timelines:
            for kind, values in saved_in(timeline).items():
                per_case.setdefault(kind, []).append(statistics.median(values))
        for kind, values in per_case.items():
            by_kind.setdefault(kind, []).append(statistics.median(values))
    return {kind: max(0.0, statistics.median(v)) for kind, v in sorted(by_kind.items())}


def _saved_in_call(timeline: Timeline, *, cpu: bool) -> dict[str, list[float]]:
    """Each rank's first compute task less its next of that kind, by the first's kind."""
    tasks: dict[int, list[TaskRecord]] = {}
    for r in sorted(timeline.records, key=lambda r: r.start_s):
        if r.stream is Stream.COMPUTE:
            tasks.setdefault(r.rank, []).append(r)
    saved: dict[str, list[float]] = {}
    for first, *later in tasks.values():
        again = next((r for r in later if r.kind == first.kind), None)
        if again is not None:
            saved.setdefault(first.kind, []).append(work_s(first, cpu) - work_s(again, cpu))
    return saved


def _saved_between_calls(timeline: Timeline, *, cpu: bool) -> dict[str, list[float]]:
    """:func:`warm_savings`' reading of a call run twice in a row (two calls in ``timeline``).

    Each rank's first task of a kind in the first call less its first of that kind in the
    second. The first call's task follows other calls (the rounds interleave them), as a
    call's first task does; the second's follows a call of its own kind, as a tiled call's
    later tasks do where each rank keeps its core (2 ranks here, held-out 4.7, 5.1, 5.6% with
    these; 5.6 to 6.9% in five runs with the savings in a call).
    """
    calls = timeline.runs()
    if len(calls) != 2:
        raise RuntimeError(f"a call run twice recorded {len(calls)} calls")
    firsts: dict[tuple[RunKey, int, str], float] = {}
    for r in sorted(timeline.records, key=lambda r: r.start_s):
        if r.stream is Stream.COMPUTE:
            firsts.setdefault((r.run, r.rank, r.kind), work_s(r, cpu))
    saved: dict[str, list[float]] = {}
    for (run, rank, kind), seconds in firsts.items():
        again = firsts.get((calls[1], rank, kind)) if run == calls[0] else None
        if again is not None:
            saved.setdefault(kind, []).append(seconds - again)
    return saved


KERNEL_TRAFFIC = 5.0
"""Bytes mc2sim's CPU kernels move per byte a plan counts (``Device.memory_traffic``): a
16-bit operand is read (2 bytes), written as a float32 copy (4) and read again by the float32
GEMM (4); a result is written in float32 (4), read (4) and written in 16 bits (2): 10 bytes
for each 2 counted (:func:`mc2sim.kernels._device.mm_float32` and the casts after it)."""


COLLECTIVE_BYTES = (64, 4096, 65536, 1048576, 4194304)
"""Bytes per rank of the AllReduce and AlltoAllv sweep of ``calibrate`` (bfloat16): from a
tiny message, where the latency and the per-call costs are all, to bandwidth."""


def _swept_buffers(
    comm: Communicator, sizes: Sequence[int] = COLLECTIVE_BYTES
) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """The buffers of the collectives' sweep, one triple for each of ``sizes`` (bytes).

    A flat bfloat16 tensor of that many bytes (the AllReduce's), and as many bfloat16 rows
    of 64 elements, the same number for every rank and at least one (the even AlltoAllv's),
    with those per-rank counts.
    """
    buffers = []
    for nbytes in sizes:
        elements = max(nbytes // 2, 1)
        rows_per_peer = max(elements // (64 * comm.size), 1)
        buffers.append(
            (
                torch.zeros(elements, dtype=torch.bfloat16),
                torch.zeros((rows_per_peer * comm.size, 64), dtype=torch.bfloat16),
                (rows_per_peer,) * comm.size,
            )
        )
    return buffers


def measure_collectives(comm: Communicator, reps: int) -> list[CommSample]:
    """Time a bfloat16 AllReduce and an even AlltoAllv at each of :data:`COLLECTIVE_BYTES`.

    Each call is posted and waited for again and again (every rank at once, after a
    barrier), its caches warm: the network's own latency and bandwidth, which the network
    fit reads and a ping-pong checks; its figure is the slowest rank's lower quartile over
    ``reps`` calls, the post included (``calibrate`` takes the issue overhead off every
    collective sample alike). The samples of one kind share one unit of weight. The
    profile times the same sizes as the ops meet them (:func:`collective_cases`).
    """
    samples = []
    for flat, rows, counts in _swept_buffers(comm):
        for kind, call in (
            ("allreduce", lambda flat=flat: comm.iallreduce(flat).wait()),
            ("alltoallv", lambda rows=rows, c=counts: comm.ialltoallv(rows, c, c).wait()),
        ):
            seconds = _quiet_time(comm, call, reps)
            size = float(flat.numel() * 2 if kind == "allreduce" else rows.numel() * 2)
            weight = 1.0 / len(COLLECTIVE_BYTES)
            samples.append(CommSample(kind=kind, nbytes=size, seconds=seconds, weight=weight))
    return samples


class _CollectiveRunner:
    """Runs a plan of collectives: AllReduces or even AlltoAllvs, each of its own zero tensor."""

    def __init__(self, comm: Communicator, data: Sequence[torch.Tensor]) -> None:
        self.comm, self.data = comm, data

    def compute(self, task: Task) -> None:
        raise ValueError(f"a collective's plan has no compute task ({task.name})")

    def start(self, task: Task) -> Work:
        data = self.data[task.id]
        if task.kind is TaskKind.ALLREDUCE:
            return self.comm.iallreduce(data)
        return self.comm.ialltoallv(data, task.send_splits, task.recv_splits)

    def land(self, task: Task, result: torch.Tensor) -> None:
        """Nothing to keep: the figure is the task's time."""


def _collective_case(
    comm: Communicator,
    kind: TaskKind,
    data: torch.Tensor,
    counts: tuple[int, ...],
    posts: int = 1,
) -> Case:
    """A call of ``posts`` collectives of ``kind``, posted at once, run by the executor.

    Each on a copy of ``data`` (an AllReduce's flat buffer, or an even AlltoAllv's rows of
    64 elements, ``counts`` to each rank); none depends on another, so the executor posts
    them all before it waits, as it posts the ops' collectives.
    """
    nbytes = data.numel() * 2
    if kind is TaskKind.ALLREDUCE:
        task = Task(id=0, name="allreduce", kind=kind, bytes=nbytes)
    else:
        task = Task(
            id=0,
            name="alltoallv",
            kind=kind,
            bytes=counts[0] * (comm.size - 1) * 128,  # sent away, as the MoE plans
            send_splits=counts,
            recv_splits=counts,
            row_bytes=128,
        )
    tasks = tuple(
        replace(task, id=i, name=f"{kind}{i}" if posts > 1 else task.name) for i in range(posts)
    )
    at_once = f", {posts} posted at once" if posts > 1 else ""
    plan = Plan(
        op=f"calibrate_{kind}",
        tiling=f"{nbytes} bytes{at_once}",
        rank=comm.rank,
        world_size=comm.size,
        tasks=tasks,
        dtype="bfloat16",
    )
    runner = _CollectiveRunner(comm, [data] + [data.clone() for _ in range(posts - 1)])
    return Case(
        name=f"{kind} of {nbytes} bytes{at_once}",
        tiling="serial" if posts == 1 else f"{posts} at once",
        run=functools.partial(execute, plan, comm, runner),
        plans=tuple(replace(plan, rank=r) for r in range(comm.size)),
    )


def collective_cases(comm: Communicator) -> list[Case]:
    """A bfloat16 AllReduce and an even AlltoAllv at each of :data:`COLLECTIVE_BYTES`.

    Each is a plan of that one collective, run by the executor as the ops' collectives are
    and timed in :func:`measure_rounds` with the other calls, so it meets the machine as they
    do: after other calls' compute, their caches and allocations (a 128 KiB AllReduce took
    90 us posted again and again, 157 us after 16 MiB of other memory traffic, 175 us inside
    a MatmulAllReduce call of the validation rounds; 2 ranks here). :func:`samples_of` reads
    them as it reads the serial calls' collectives, for the device's profile; the network's
    parameters come from :func:`measure_collectives`.
    """
    return [
        _collective_case(comm, kind, data, counts)
        for flat, rows, counts in _swept_buffers(comm)
        for kind, data in ((TaskKind.ALLREDUCE, flat), (TaskKind.ALLTOALLV, rows))
    ]


TOGETHER_BYTES = 65536
"""Bytes per rank of each collective :func:`together_cases` posts: one of
:data:`COLLECTIVE_BYTES` (so its time alone is in the profile), small enough for the latency
to weigh (a tile's AllReduce in the 4-rank validation sweep has 32 KiB)."""

TOGETHER_POSTS = 4
"""How many collectives :func:`together_cases` posts at once."""


def together_cases(comm: Communicator) -> list[Case]:
    """:data:`TOGETHER_POSTS` bfloat16 AllReduces, and as many even AlltoAllvs, posted at once.

    Each of :data:`TOGETHER_BYTES`; none on a single rank. The contention fit matches them
    with the others: how collectives in flight progress (together, one at a time, or
    together but for the reductions: :data:`mc2sim.model.fit.ORDERS`) shows in them
    undiluted. Four 32 KiB AllReduces posted at once took 2.6x one on 4 ranks of this
    2-core machine: overlapped latencies give 2.0x, one at a time 3.0x.
    """
    if comm.size < 2:
        return []
    flat, rows, counts = _swept_buffers(comm, (TOGETHER_BYTES,))[0]
    return [
        _collective_case(comm, kind, data, counts, TOGETHER_POSTS)
        for kind, data in ((TaskKind.ALLREDUCE, flat), (TaskKind.ALLTOALLV, rows))
    ]


def _quiet_time(comm: Communicator, fn: Callable[[], object], reps: int) -> float:
    """The slowest rank's lower quartile (:func:`typical`) of ``fn``, every rank at once."""
    return _quiet_times(comm, [fn], reps)[0]


def _quiet_times(comm: Communicator, fns: Sequence[Callable[[], object]], reps: int) -> list[float]:
    """:func:`_quiet_time` of each of ``fns``, in interleaved rounds (a slow spell lands on all).

    Each runs once to warm up, then ``max(reps, 3)`` rounds run them in turn, each call after
    a barrier.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(reps, 3)):
        for fn, mine in zip(fns, times, strict=True):
            comm.barrier()
            start = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - start)
    return [float(max(comm.allgather_object(typical(mine)))) for mine in times]


def _median_time(
    comm: Communicator, fn: Callable[[], object], reps: int, *, cpu: bool = False
) -> float:
    """The slowest rank's median time of ``fn`` (``cpu``: of the process's CPU time)."""
    clock = time.process_time if cpu else time.perf_counter
    fn()
    times = []
    for _ in range(reps):
        comm.barrier()
        start = clock()
        fn()
        times.append(clock() - start)
    return float(max(comm.allgather_object(statistics.median(times))))


# (m, k, n): from memory-bound (small k, wide output) to compute-bound; none of them is a
# size that ``validate-model`` checks.
COMPUTE_SIZES = (
    (512, 32, 2048),
    (3072, 48, 2048),
    (1024, 64, 1024),
    (256, 256, 512),
    (1536, 192, 1536),
    (2048, 512, 1024),
    (512, 1024, 1024),
    (4096, 128, 512),
)


def measure_compute(comm: Communicator, reps: int, *, cpu: bool = False) -> list[ComputeSample]:
    """Time the kernels at several shapes and dtypes, all ranks at once (``cpu``: CPU time)."""
    samples = []
    gen = torch.Generator().manual_seed(comm.rank)
    for dtype, sizes in (
        (torch.bfloat16, COMPUTE_SIZES),
        (torch.float16, COMPUTE_SIZES[::2]),
        (torch.float32, COMPUTE_SIZES[1::2]),
    ):
        name = str(dtype).removeprefix("torch.")
        size = torch.empty((), dtype=dtype).element_size()
        for m, k, n in sizes:
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = torch.randn(k, n, generator=gen).to(dtype)
            seconds = _median_time(comm, functools.partial(matmul, x, w), reps, cpu=cpu)
            nbytes = (m * k + k * n + m * n) * size
            samples.append(
                ComputeSample(dtype=name, flops=2.0 * m * k * n, nbytes=nbytes, seconds=seconds)
            )
    scale = torch.full((1,), 1e-3)
    for m, k, n in COMPUTE_SIZES[3::2]:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        run = functools.partial(quant_matmul, a, b, scale, output_dtype=torch.float16)
        seconds = _median_time(comm, run, reps, cpu=cpu)
        nbytes = m * k + k * n + 2 * m * n
        samples.append(
            ComputeSample(dtype="int8", flops=2.0 * m * k * n, nbytes=nbytes, seconds=seconds)
        )
    return samples


def measure_vector(
    comm: Communicator, reps: int, *, launch_us: float, memory_gbps: float, share: float = 1.0
) -> float:
    """Elementwise TFLOP/s of a reduce task, its launch and memory terms held fixed.

    Times what MatmulReduceScatter's reduce task does (one 16-bit partial per rank, summed in
    float32 and rounded once) and counts its FLOPs and bytes as the plan builder does; the
    rate is what is left after the launch and memory terms the compute fit found (a reduce
    costs ``launch + flops / rate + bytes / bandwidth``). Unbounded when the memory term
    already accounts for the whole time.
    """
    gen = torch.Generator().manual_seed(comm.rank)
    parts = [torch.randn(512, 1024, generator=gen).to(torch.bfloat16) for _ in range(comm.size)]

    def reduce() -> torch.Tensor:
        total = torch.zeros(parts[0].shape, dtype=torch.float32)
        for part in parts:
            total += part.float()
        return total.to(torch.bfloat16)

    seconds = _median_time(comm, reduce, reps) * share  # a whole core's time
    elements = parts[0].numel()
    flops = comm.size * elements
    nbytes = (comm.size + 1) * elements * parts[0].element_size()
    arithmetic = seconds - launch_us * 1e-6 - nbytes / (memory_gbps * 1e9)
    return flops / arithmetic / 1e12 if arithmetic > 0 else UNBOUNDED_TFLOPS


def samples_of(
    comm: Communicator,
    cases: Sequence[Case],
    rounds: Sequence[Sequence[Timeline]],
    *,
    warm_s: Mapping[str, float] | None = None,
    cpu: bool = False,
) -> tuple[list[ComputeSample], list[CommSample]]:
    """Per-task samples of serial op runs (``rounds[i]``: case i's gathered timelines).

    The tasks ran through the very code paths the model must predict (the kernels inside the
    ops, the communicator's collectives with their conversions and copies), so the fit sees
    their real costs, not only the bare kernels'. A compute task's time in one run is the
    slowest rank's (``cpu``: its CPU time, :func:`work_s`); a collective's runs from the
    last rank's arrival (before it, the others only wait) to the last rank's completion
    (when the op's span ends on an oversubscribed machine, where a rank may see its
    completion a time slice late); a round in which some
    rank computed while its part of the collective was in flight (a tiled plan's next tile)
    is left out, as that time holds contention, which :func:`fit_contention` fits. Each
    task's figure is the lower quartile over the rounds kept
    (:func:`mc2sim.model.accuracy.typical`), paired with the FLOPs and bytes of the
    busiest rank's task; the tasks of one case share one unit of weight in the fits. A
    compute task after the call's first gets ``warm_s`` of its kind (seconds as its own were
    read: :func:`warm_savings`) added back, so every sample is a cold task, as the model's
    profile holds them (``Device.warm_us``). The ranks'
    times line up (the executor puts a machine's ranks on its clock), also where they
    take turns on shared cores and start their calls a turn apart.
    """
    compute: list[ComputeSample] = []
    comm_samples: list[CommSample] = []
    for case, timelines in zip(cases, rounds, strict=True):
        durations: dict[int, list[float]] = {}
        for timeline in timelines:
            per_task: dict[int, list[TaskRecord]] = {}
            for r in timeline.records:
                per_task.setdefault(r.task, []).append(r)
            for task_id, records in per_task.items():
                if case.plans[0].tasks[task_id].resource is Resource.COMM:
                    if _overlapped(records, timeline):
                        continue  # its time holds contention, not the collective alone
                    # from the last rank's arrival to the last rank's completion
                    seconds = max(r.end_s for r in records) - max(r.start_s for r in records)
                else:
                    seconds = max(work_s(r, cpu) for r in records)
                durations.setdefault(task_id, []).append(seconds)
        plan = case.plans[comm.rank]
        warm = False  # a compute task of the call ran before
        n_compute = sum(t.resource is Resource.COMPUTE for t in plan.tasks)
        n_comm = sum(t.resource is Resource.COMM and t.id in durations for t in plan.tasks)
        for task in plan.tasks:
            if task.id not in durations:
                continue  # a collective that overlapped compute in every round
            seconds = typical(durations[task.id])
            if task.resource is Resource.COMPUTE:
                if warm:
                    seconds += (warm_s or {}).get(str(task.kind), 0.0)
                warm = True
                dtype = "int8" if task.kind is TaskKind.QUANT_MATMUL else plan.dtype
                busiest = max((p.tasks[task.id] for p in case.plans), key=lambda t: t.flops)
                compute.append(
                    ComputeSample(
                        dtype=dtype,
                        flops=busiest.flops,
                        nbytes=busiest.bytes,
                        seconds=seconds,
                        weight=1.0 / n_compute,
                        kind=str(task.kind),
                    )
                )
                continue
            weight = 1.0 / n_comm
            if task.kind is TaskKind.ALLGATHER:
                kind, nbytes = "allgather", float(task.bytes * comm.size)
            elif task.kind is TaskKind.ALLTOALLV:
                away = max(t.bytes for t in (p.tasks[task.id] for p in case.plans))
                kind, nbytes = "alltoallv", away * comm.size / max(comm.size - 1, 1)  # as even
            else:
                kind = "allreduce" if task.kind is TaskKind.ALLREDUCE else "reduce_scatter"
                nbytes = float(task.bytes)
            comm_samples.append(
                CommSample(kind=kind, nbytes=nbytes, seconds=seconds, weight=weight)
            )
    return compute, comm_samples


def _overlapped(records: Sequence[TaskRecord], timeline: Timeline) -> bool:
    """Whether some rank computed while its part of this collective was in flight."""
    spans = {r.rank: (r.start_s, r.end_s) for r in records}
    return any(
        r.stream is Stream.COMPUTE
        and r.rank in spans
        and r.start_s < spans[r.rank][1]
        and r.end_s > spans[r.rank][0]
        for r in timeline.records
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """A fitted topology and the rounds of the runs measured alongside the calibration."""

    topology: Topology
    """The fitted topology; the same on every rank."""
    alongside: list[list[Timeline]]
    """For each run passed as ``alongside``, its timeline (every rank's) in each round."""
    fitted_cases: list[Case]
    """The calls the fit was made on, run on every rank of the job (the in-sample cases)."""
    fitted_spans: list[list[float]]
    """Their spans (slowest rank), one per round, index as ``fitted_cases``."""
    independent: Independent
    """Figures of the machine measured apart from the fit, to check the fitted ones against."""
    speeds: tuple[float, ...] = ()
    """Each rank's compute time over the slowest rank's, in this job (:func:`rank_speeds`);
    the topology's figures are the slowest rank's."""
    probe_before: float = 0.0
    """The machine's speed probe before the rounds (:func:`mc2sim.study.measure.probe_tflops`),
    TFLOP/s; the one after them is the fit's (``Device.probe_tflops``). 0: not measured."""

    def stragglers(self) -> dict[int, Straggler]:
        """The ranks faster than the slowest, as stragglers of a compute factor below 1."""
        return {r: Straggler(compute=f) for r, f in enumerate(self.speeds) if f < 1.0}


SPEED_TASK_S = 1e-3
"""The least time of a task :func:`rank_speeds` reads: shorter ones hold more noise than
speed."""


def rank_speeds(
    rounds: Sequence[Sequence[Timeline]], world: int, *, cpu: bool = False
) -> tuple[float, ...]:
    """Each rank's compute time over the slowest rank's, from calls that give every rank alike.

    ``rounds[i]``: one call's gathered timelines on ``world`` ranks (the serial calibration
    calls: even routing, so every rank's task of an id does the same work). For every
    compute task of at least :data:`SPEED_TASK_S` on every rank: each rank's figure over the
    rounds (:func:`mc2sim.model.accuracy.typical` of :func:`work_s`) over the slowest rank's;
    a rank's speed is the median over the tasks, 1 without any. The profile holds the slowest
    rank's times (:func:`samples_of`), which set a call's pace where every rank does the
    same work; where one rank does more (skewed routing), its own speed does. Ranks of one
    job keep their speeds (where the scheduler placed them): on 8 ranks of the 16-core host
    one rank ran 1.25x the others' time in every call.
    """
    ratios: list[list[float]] = [[] for _ in range(world)]
    for figures, _ in _every_rank_tasks(rounds, world, cpu=cpu):
        slowest = max(figures.values())
        for rank, seconds in figures.items():
            ratios[rank].append(seconds / slowest)
    return tuple(statistics.median(v) if v else 1.0 for v in ratios)


def measure_rank_spread(
    rounds: Sequence[Sequence[Timeline]], world: int, *, cpu: bool = False
) -> float:
    """``Device.rank_spread``: a round's slowest rank over the slowest rank's own, typically.

    ``rounds`` as :func:`rank_speeds` reads them. For every compute task of at least
    :data:`SPEED_TASK_S` on every rank: the figure the profile holds, the lower quartile over
    the rounds of each round's slowest rank (:func:`samples_of`), over the slowest rank's
    own lower quartile; the median over the tasks, at least 1; 1 without any, or on one
    rank. Ranks whose times move from round to round each have their slow rounds, so the
    first is above the second (8 ranks of 16-core hosts: 1.08 to 1.21 where ranks' times
    spread, 1.00 where they did not); a rank slower in every round is its speed
    (:func:`rank_speeds`), not this.
    """
    spreads = [
        typical(maxima) / max(figures.values())
        for figures, maxima in _every_rank_tasks(rounds, world, cpu=cpu)
    ]
    return max(1.0, statistics.median(spreads)) if spreads and world > 1 else 1.0


def _every_rank_tasks(
    rounds: Sequence[Sequence[Timeline]], world: int, *, cpu: bool
) -> Iterator[tuple[dict[int, float], list[float]]]:
    """Each compute task every rank ran, of at least :data:`SPEED_TASK_S` on each.

    Yields ``(figures, maxima)``: each rank's lower quartile over the rounds
    (:func:`mc2sim.model.accuracy.typical` of :func:`work_s`), and each round's slowest
    rank's time.
    """
    for timelines in rounds:
        times: dict[int, dict[int, list[float]]] = {}
        for timeline in timelines:
            for r in timeline.records:
                if r.stream is Stream.COMPUTE:
                    times.setdefault(r.task, {}).setdefault(r.rank, []).append(work_s(r, cpu))
        for by_rank in times.values():
            if len(by_rank) < world:
                continue
            figures = {rank: typical(v) for rank, v in by_rank.items()}
            if min(figures.values()) < SPEED_TASK_S:
                continue
            # every rank's times are in round order: a round's slowest is its column's largest
            yield figures, [max(column) for column in zip(*by_rank.values(), strict=True)]


def calibrate(
    comm: Communicator,
    *,
    reps: int = 5,
    name: str = "this_machine",
    alongside: Sequence[Callable[[], object]] = (),
    progress: Callable[[int, int, str], None] | None = None,
) -> Calibration:
    """Measure this machine on the ranks of ``comm`` and fit its topology (every rank).

    Args:
        comm: every rank of the job.
        reps: interleaved rounds of every measured call (medians).
        name: the topology's name.
        alongside: further calls measured in the same rounds (``validate-model --calibrate``
            times its sweep there, ``run --calibrate`` its tilings, so the fit and the calls
            see the same state of the machine).
        progress: called after each round with ``(round, rounds, label)``.

    Returns:
        The fitted topology and the rounds of the ``alongside`` calls.
    """
    hosts = comm.allgather_object(socket.gethostname())
    before = probe_tflops(comm)  # the machine's pace as the rounds start: steady through them?
    levels, per_node = _levels(comm, hosts)
    cores = node_cores(comm, hosts)
    share = _share_of(cores, per_node)
    # where ranks share cores, a compute task's span holds the others' turns: take its CPU time
    on_cpu = share < 1.0
    serial = [(level.group, calibration_cases(level.group)) for level in levels]
    tiled = contention_cases(comm)
    # one host: the collectives over sizes, as the ops meet them, join the profile
    swept_cases = collective_cases(comm) if len(levels) == 1 else []
    together = together_cases(comm)
    warmed = warm_cases(comm, in_call=on_cpu)
    runs = [c.run for _, cases in serial for c in cases]
    groups = [group for group, cases in serial for _ in cases]
    measured = tiled + together + swept_cases + warmed
    runs += [c.run for c in measured] + list(alongside)
    groups += [comm] * (len(measured) + len(alongside))
    rounds = measure_rounds(comm, runs, reps=reps, progress=progress, groups=groups)
    serial_rounds, _tiled, swept_rounds, warm_rounds, beside = _consecutive(
        rounds,
        [
            sum(len(cases) for _, cases in serial),
            len(tiled) + len(together),
            len(swept_cases),
            len(warmed),
        ],
    )
    warm_s = warm_savings(warm_rounds, cpu=on_cpu, in_call=on_cpu)
    compute: list[ComputeSample] = []
    by_level: list[list[CommSample]] = []
    first = 0
    for group, cases in serial:
        mine = samples_of(
            group,
            cases,
            serial_rounds[first : first + len(cases)],
            warm_s=warm_s,
            cpu=on_cpu,
        )
        first += len(cases)
        # each group of a level measured its own copy: pool every group's (its rank 0 speaks)
        parts = comm.allgather_object(mine if group.rank == 0 else None)
        spoken = [p for p in parts if p is not None]
        compute += [replace(s, weight=s.weight / len(spoken)) for p in spoken for s in p[0]]
        by_level.append([replace(s, weight=s.weight / len(spoken)) for p in spoken for s in p[1]])
    # the calls run on the whole job, the fit's in-sample set: the serial ones, then the tiled
    on_job = [c for group, cases in serial if group is comm for c in cases]
    # the collectives posted at once join the tiled calls: how collectives in flight progress
    tiled = tiled + together
    job_rounds = _on_job(serial, rounds, comm, len(tiled))
    job_spans = [[t.metrics().total_s for t in mine] for mine in job_rounds]
    if on_cpu:  # the small calls run in two tiles for the warm savings join the contention fit's
        tiled = tiled + warmed
        job_spans += [[t.metrics().total_s for t in mine] for mine in warm_rounds]
    # posted back to back, as the sweep's are; then right after a compute task, as a plan
    # posts (and the profile's collectives, run among the other calls' compute, were)
    posting = measure_issue(comm, reps)
    after_task = measure_issue(comm, reps, after_task=True)
    in_ops: list[CommSample] = []
    if swept_cases:
        by_level[0] += measure_collectives(comm, reps)
        swept = [
            replace(s, weight=1.0 / len(COLLECTIVE_BYTES))
            for s in samples_of(comm, swept_cases, swept_rounds)[1]
        ]
        # the profile: the serial calls' collectives and the sweep's; a sub-tiled call's
        # chunks (cal_combine_64) are timed while the ranks take turns computing, which
        # the contention model accounts for
        whole = [(c, r) for c, r in zip(serial[0][1], rounds, strict=False) if c.tiling == "serial"]
        in_ops = samples_of(comm, [c for c, _ in whole], [r for _, r in whole])[1] + swept

    by_level = [[posting.taken_off(s) for s in mine] for mine in by_level]
    in_ops = [after_task.taken_off(s) for s in in_ops]
    bare = measure_compute(comm, reps, cpu=on_cpu)
    # a whole core's posts: where ranks share cores, their CPU time (one that gets its core
    # posts at a whole core's speed; a span may also hold another rank's turn)
    on_core = measure_issue(comm, reps, cpu=True, after_task=True) if on_cpu else after_task
    figures = _core_figures(compute, bare, on_core, warm_s)
    peaks, efficiency = figures.peaks, figures.efficiency
    launch_us, memory_gbps = figures.launch_us, figures.memory_gbps
    wide = comm.backend in WIDE_REDUCTIONS
    duplexes = [
        measure_duplex(level.group, reps) if level.group.size > 1 else None for level in levels
    ]
    network, reduce_gbps = _fit_levels(
        levels, by_level, wide=wide, per_node=per_node, duplexes=duplexes
    )
    issue_us, shared_issue_us, shared_latency_us = figures.issue_us, 0.0, 0.0
    if on_cpu:  # what sharing the cores adds: the figures again with cores of their own
        duplex = duplexes[0].duplex if duplexes[0] is not None else Duplex.FULL
        lone = measure_lone_pair(comm, reps, wide=wide, duplex=duplex)
        network, issue_us, shared_issue_us, shared_latency_us = split_sharing(
            network, issue_us, lone
        )
    reduce_gbps *= share
    vector_tflops = measure_vector(
        comm, reps, launch_us=launch_us, memory_gbps=memory_gbps, share=share
    )
    where = f"host {hosts[0]}" if len(network) == 1 else f"{network[-1].ranks} hosts"
    comm_profile = fit_comm_profile(in_ops, comm.size) if len(network) == 1 else ()
    base = Topology(
        name=name,
        description=f"{comm.size} ranks on {where}, fitted by mc2sim calibrate",
        device=Device(
            name=f"{hosts[0]} CPU share of one rank (mc2sim kernels)",
            matrix_tflops=peaks,
            vector_tflops=vector_tflops,
            # the fits' rate is of the bytes the plans count; the kernels move KERNEL_TRAFFIC
            # times those, so the machine moves bytes KERNEL_TRAFFIC times as fast
            memory_gbps=memory_gbps * KERNEL_TRAFFIC,
            memory_traffic=KERNEL_TRAFFIC,
            efficiency=efficiency,
            launch_us=launch_us,
            reduce_gbps=reduce_gbps,
            memory_overlap=False,
            reductions_in_float32=wide,
            cores_per_node=cores,
            issue_us=issue_us,
            shared_issue_us=shared_issue_us,
            shared_latency_us=shared_latency_us,
            issue_extra_us=figures.issue_extra_us,
            warm_us=figures.warm_us,
            issue_gbps=figures.issue_gbps,
            profile=figures.profile + comm_profile,
        ),
        network=network,
        contention=Contention(source="not yet fitted"),
        source=(
            "mc2sim calibrate: per-task times of serial runs of the five ops at calibration "
            "sizes (bfloat16), bare matmul kernels for float16, float32 and int8, "
            f"{reps} repetitions each, all {comm.size} ranks at once"
            + (
                ""
                if len(network) == 1
                else " (the collectives of each network level timed on groups of that level "
                "alone: the ranks of one host, and one rank of each host, every group at "
                "once)"
            )
            + "".join(
                f"; {level.name} transfers {measured.describe()}"
                for level, measured in zip(levels, duplexes, strict=True)
                if measured is not None
            )
            + "; memory bandwidth and the reductions' vector rate are effective figures of "
            "mc2sim's kernels and communicator on this machine, not of the chips"
        ),
    )
    share_left = measure_progress(comm, reps)
    polled = share_left > POLLED_SHARE

    # where ranks share cores: whether a waiting rank gives its core away, measured; the
    # serial calls join the tiled ones in fitting the slice
    waiting_share = measure_waiting(comm, reps) if on_cpu else 1.0
    sharing = sharing_of(waiting_share, share) if on_cpu else None
    if sharing is CoreSharing.PROCESSOR:  # a waiting rank's part of a busy one's share
        weight = waiting_weight_of(waiting_share, share)
        base = replace(base, device=replace(base.device, waiting_weight=weight))
    fitted = fit_contention(
        base,
        tiled,
        job_spans[len(on_job) :],
        sharing=sharing,
        serial=on_job if on_cpu else [],
        serial_spans=job_spans[: len(on_job)] if on_cpu else [],
        polled=polled,
        progress=(
            f"progress {'polled' if polled else 'on its own'}, measured: a collective posted "
            f"before its ranks computed had {share_left:.0%} of its time after the post "
            "still to run"
            + (
                f"; cores shared by {sharing}, measured: a rank "
                f"computing while half the ranks waited got {waiting_share:.2f} of a core"
                if on_cpu
                else ""
            )
        ),
    )
    independent = measure_independent(comm, reps)
    # the machine's speed at the fit: a run compared with it is simulated at its own speed
    # where a round's slowest rank is a different one each time: the figures over a lone rank's
    spread = measure_rank_spread(job_rounds[: len(on_job)], comm.size, cpu=on_cpu)
    fitted = replace(
        fitted,
        device=replace(
            fitted.device,
            probe_tflops=independent.matmul_tflops,
            rank_spread=spread,
            lone_memory_speedup=lone_memory_speedup_of(independent, fitted),
        ),
    )
    # every figure above is the slowest rank's, shared by all: each rank fits the same topology
    return Calibration(
        topology=fitted,
        alongside=[list(mine) for mine in beside],
        fitted_cases=on_job + tiled,
        fitted_spans=job_spans,
        independent=independent,
        speeds=rank_speeds(job_rounds[: len(on_job)], comm.size, cpu=on_cpu),
        probe_before=before,
    )


@dataclass(frozen=True)
class _CoreFigures:
    """The device's compute and posting figures, a whole core's.

    From one reading of the samples: the share each rank ran at (processor sharing, or turns).
    """

    peaks: dict[str, float]
    efficiency: Efficiency
    launch_us: float
    memory_gbps: float
    profile: tuple[ProfilePoint, ...]
    issue_us: float
    issue_extra_us: dict[str, float]
    warm_us: dict[str, float]
    issue_gbps: float

    def on(self, device: Device, comm_profile: tuple[ProfilePoint, ...]) -> Device:
        """``device`` with these figures, its profile these tasks' and ``comm_profile``."""
        return replace(
            device,
            matrix_tflops=self.peaks,
            efficiency=self.efficiency,
            launch_us=self.launch_us,
            memory_gbps=self.memory_gbps * KERNEL_TRAFFIC,
            issue_us=self.issue_us,
            issue_extra_us=self.issue_extra_us,
            warm_us=self.warm_us,
            issue_gbps=self.issue_gbps,
            profile=self.profile + comm_profile,
        )


def _core_figures(
    compute: Sequence[ComputeSample],
    bare: Sequence[ComputeSample],
    posting: Posting,
    warm_s: Mapping[str, float],
) -> _CoreFigures:
    """Fit a whole core's figures from samples timed with every rank at once.

    ``compute``: the serial calls' tasks; ``bare``: the bare kernels (:func:`measure_compute`)
    of the dtypes those lack; they, ``posting`` and ``warm_s`` are a whole core's already (CPU
    time where ranks share cores).
    """
    peaks, efficiency, launch_us, memory_gbps = fit_compute(
        [s for s in compute if s.kind in ROOFLINE_KINDS and s.dtype == "bfloat16"]
    )
    others = [s for s in bare if s.dtype not in peaks]
    peaks.update(fit_peaks(others, efficiency, launch_us, memory_gbps))
    return _CoreFigures(
        peaks=peaks,
        efficiency=efficiency,
        launch_us=launch_us,
        memory_gbps=memory_gbps,
        profile=fit_profile(compute),
        issue_us=posting.bare_s * 1e6,
        issue_extra_us={kind: v * 1e6 for kind, v in posting.extra_s.items()},
        warm_us={kind: seconds * 1e6 for kind, seconds in warm_s.items()},
        issue_gbps=posting.copy_gbps,
    )


def _consecutive(items: Sequence[_T], sizes: Sequence[int]) -> list[Sequence[_T]]:
    """``items`` cut into consecutive parts of ``sizes``, then what is left."""
    parts, first = [], 0
    for size in sizes:
        parts.append(items[first : first + size])
        first += size
    return [*parts, items[first:]]


def _on_job(
    serial: Sequence[tuple[Communicator, Sequence[Case]]],
    rounds: Sequence[Sequence[Timeline]],
    comm: Communicator,
    tiled: int,
) -> list[Sequence[Timeline]]:
    """The rounds of the serial calls run on the whole job, then of the ``tiled`` calls."""
    mine: list[Sequence[Timeline]] = []
    first = 0
    for group, cases in serial:
        if group is comm:
            mine += rounds[first : first + len(cases)]
        first += len(cases)
    return mine + list(rounds[first : first + tiled])


def share_of_cores(machine_cores: float, ranks_on_machine: int, ranks_per_node: int) -> float:
    """The cores a node's ranks share, where a machine's cores serve all ranks it runs.

    Nodes of one machine (network namespaces on one host) split its cores by their ranks:
    ``machine_cores * ranks_per_node / ranks_on_machine``.

    Raises:
        ParamInvalidError: a count below 1 or a node larger than its machine.
    """
    if ranks_on_machine < 1 or ranks_per_node < 1 or ranks_per_node > ranks_on_machine:
        raise ParamInvalidError(
            "ranks_per_node",
            ranks_per_node,
            f"must be between 1 and the ranks on the machine ({ranks_on_machine})",
        )
    if machine_cores <= 0:
        raise ParamInvalidError("machine_cores", machine_cores, "must be > 0")
    return machine_cores * ranks_per_node / ranks_on_machine


def _cgroup_cores() -> float:
    """The CPU quota of this process's cgroup, in cores (0: no quota found)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return 0.0
    return 0.0 if quota == "max" else float(quota) / float(period)


def core_share(comm: Communicator) -> float:
    """The share of a core each rank of a node gets (at most 1; every rank)."""
    hosts = comm.allgather_object(socket.gethostname())
    return _share_of(node_cores(comm, hosts), comm.size // max(len(set(hosts)), 1))


def _share_of(cores: float, per_node: int) -> float:
    """A node's ``cores`` over its ``per_node`` ranks, at most 1 (1 where none were read)."""
    return min(1.0, cores / per_node) if cores > 0 else 1.0


def node_cores(comm: Communicator, hosts: Sequence[str]) -> float:
    """The CPU cores each node's ranks share (``Device.cores_per_node``; every rank).

    A machine's cores are the union of its ranks' CPU affinities (ranks bound to distinct
    cores by the launcher get one each), capped by a cgroup quota; nodes of one machine
    split them by ranks (:func:`share_of_cores`). The smallest node's figure is kept.
    """
    mine = (machine_id(), sorted(os.sched_getaffinity(0)), _cgroup_cores())
    every = comm.allgather_object(mine)
    per_node = comm.size // max(len(set(hosts)), 1)
    figures = []
    for machine in {m for m, _, _ in every}:
        here = [(cpus, quota) for m, cpus, quota in every if m == machine]
        cores = float(len(set().union(*(set(c) for c, _ in here))))
        quotas = [q for _, q in here if q > 0]
        if quotas:
            cores = min(cores, min(quotas))
        figures.append(share_of_cores(cores, len(here), per_node))
    return min(figures)


@dataclass(frozen=True, kw_only=True, slots=True)
class Posting:
    """What posting a nonblocking collective costs a rank (LogP's ``o``), slowest rank's."""

    bare_s: float
    """Seconds to post a collective that converts nothing (a 1-element float32 AllReduce):
    ``Device.issue_us``."""
    extra_s: dict[str, float]
    """Seconds a post of each kind takes beyond ``bare_s`` (a 1-row-per-peer bfloat16
    AlltoAllv's counts and displacements; a 256-element bfloat16 AllReduce's float32 copy's
    fixed part, a ReduceScatter's alike): ``Device.issue_extra_us``."""
    copy_gbps: float
    """Where reductions sum in float32: the rate of their float32 copy per 16-bit byte posted
    (``Device.issue_gbps``); 0 where there is none."""

    def of(self, kind: str, nbytes: float) -> float:
        """Seconds of posting a collective of ``kind`` (a ``CommSample`` kind) of ``nbytes``."""
        copied = kind in FLOAT32_COPIED and self.copy_gbps > 0  # TaskKind is a StrEnum
        return (
            self.bare_s
            + self.extra_s.get(kind, 0.0)
            + (nbytes / (self.copy_gbps * 1e9) if copied else 0.0)
        )

    def taken_off(self, sample: CommSample) -> CommSample:
        """``sample`` without its post, never below a tenth of its span.

        A collective's span includes its last rank's posting, which the model holds apart.
        """
        seconds = sample.seconds - self.of(sample.kind, sample.nbytes)
        return replace(sample, seconds=max(seconds, 0.1 * sample.seconds))


def _slowest_post(
    comm: Communicator,
    post: Callable[[], Work],
    reps: int,
    *,
    cpu: bool = False,
    before: Callable[[], object] | None = None,
) -> float:
    """The slowest rank's median seconds of ``post`` alone (every rank at once), waited after.

    ``cpu``: of the process's CPU time over the post, not its span. ``before``: run after the
    barrier, right before each post, and not timed.
    """
    clock = time.process_time if cpu else time.perf_counter
    times = []
    for i in range(max(reps, 3) + 1):
        comm.barrier()
        if before is not None:
            before()
        start = clock()
        work = post()
        posted = clock() - start
        work.wait()
        if i > 0:  # the first warms up
            times.append(posted)
    return float(max(comm.allgather_object(statistics.median(times))))


POST_AFTER_MNK = (64, 64, 256)
"""The bfloat16 matmul (``m, k, n``) :func:`measure_issue` runs before each post with
``after_task``: a tile of the small tiled MatmulAllReduces, whose posts weigh most."""


def _task_before_post() -> Callable[[], object]:
    """The compute task :func:`measure_issue` runs right before a post (:data:`POST_AFTER_MNK`)."""
    m, k, n = POST_AFTER_MNK
    a = torch.ones(m, k, dtype=torch.bfloat16)
    b = torch.ones(k, n, dtype=torch.bfloat16)
    return functools.partial(torch.mm, a, b)


def measure_issue(
    comm: Communicator, reps: int, *, cpu: bool = False, after_task: bool = False
) -> Posting:
    """Seconds a rank spends posting a nonblocking collective (LogP's ``o``), kind by kind.

    Every rank posts at once, timing the post alone (the slowest rank's median): a
    1-element float32 AllReduce (the bare post, as a ping-pong's), a 1-row-per-peer
    bfloat16 AlltoAllv and a 256-element bfloat16 AllReduce, as the tiled plans post them
    (their excess over the bare post is their kind's extra; a ReduceScatter's is the
    AllReduce's: the same float32 copy); then, where the communicator sums in float32 (its
    float32 copy is made while posting), bfloat16 AllReduces of :data:`POSTED_BYTES`: the
    least-squares slope through the origin of their posts over the small one's, by bytes,
    gives ``Device.issue_gbps``. The bare post alone was 6.1 us of a 7.8 us float32
    exchange on 2 ranks here, the AlltoAllv's 8.6 us and the bfloat16 AllReduce's 11.1.

    ``after_task``: each post right after a compute task (:func:`_task_before_post`, not
    timed), as a plan posts every collective: that is the overhead the model charges. A post
    costs more there than back to back: on 2 ranks here a 32 KiB bfloat16 AllReduce's post
    took 35 us after a barrier and 53 us right after a 64 x 64 x 256 bfloat16 matmul, the
    bare post 8.4 and 13.6 us; a 4 MiB memcpy before them added 2 and 8 us, a 50 us busy
    wait -7 and +1 us. Without it, the posts are back to back, as :func:`measure_collectives`
    posts (what comes off that sweep's samples).
    """
    rows = torch.zeros((comm.size, 64), dtype=torch.bfloat16)
    ones = [1] * comm.size
    flat = torch.zeros(256, dtype=torch.bfloat16)
    single = torch.zeros(1)
    before = _task_before_post() if after_task else None
    timed = functools.partial(_slowest_post, comm, reps=reps, cpu=cpu, before=before)
    bare = timed(lambda: comm.iallreduce(single))
    alltoallv = timed(lambda: comm.ialltoallv(rows, ones, ones))
    reduction = timed(lambda: comm.iallreduce(flat))
    extra = {
        "alltoallv": max(alltoallv - bare, 0.0),
        "allreduce": max(reduction - bare, 0.0),
        "reduce_scatter": max(reduction - bare, 0.0),
    }
    if comm.backend not in WIDE_REDUCTIONS:
        return Posting(bare_s=bare, extra_s=extra, copy_gbps=0.0)
    over = []
    for nbytes in POSTED_BYTES:
        post = functools.partial(comm.iallreduce, torch.zeros(nbytes // 2, dtype=torch.bfloat16))
        over.append(timed(post) - reduction)
    return Posting(bare_s=bare, extra_s=extra, copy_gbps=fit_rate(POSTED_BYTES, over))


PROGRESS_BYTES = 4 * 1024 * 1024
"""Bytes of the float32 AllReduce :func:`measure_progress` leaves in flight while it computes:
several chunks of a pipelined shared-memory collective, so its transfer outlasts its post
(MPICH's 2-rank post did about half of its 3 ms here)."""

POLLED_SHARE = 0.5
"""The share of a collective's time after its post still to run after its rank computed for
twice that time, above which it progresses only inside the communicator's calls
(:func:`measure_progress`). Measured on this project's machines: MPICH 0.74 to 0.81 on 2
ranks and 0.65 to 1.4 on 4 ranks of a 2-core machine; gloo 0.01 to 0.02 on 2 ranks, 0.79 on
4 (its progress threads starved of cores by the ranks computing: polled, as the model sees
it)."""


def measure_progress(comm: Communicator, reps: int) -> float:
    """The share of a nonblocking collective left to run after its rank computed meanwhile.

    Every rank posts a float32 AllReduce of :data:`PROGRESS_BYTES` and waits for it (its
    time ``t``, of which the post took ``p``); then posts it again, computes (matmuls) for
    ``2 t`` without calling the communicator, and waits, ``w``. The figure is the median
    over the ranks of each rank's median ``w / (t - p)`` over ``reps`` trials (after one
    that warms up): about 1 where a collective advances only inside the communicator's
    calls (a CPU MPI without a progress thread: ``Contention.polled``), about 0 where it
    advances on its own (gloo's threads, a NIC, a GPU's stream). The same on every rank.

    Returns:
        The share, >= 0; 0 on a single rank (nothing to exchange).
    """
    if comm.size < 2:
        return 0.0
    buffer = torch.ones(PROGRESS_BYTES // 4)
    work_unit = torch.ones(64, 64)
    shares = []
    for trial in range(max(reps, 3) + 1):
        comm.barrier()
        start = time.perf_counter()
        work = comm.iallreduce(buffer)
        posted = time.perf_counter()
        work.wait()
        alone = time.perf_counter() - start
        comm.barrier()
        work = comm.iallreduce(buffer)
        until = time.perf_counter() + 2 * alone
        while time.perf_counter() < until:
            torch.mm(work_unit, work_unit)
        waiting = time.perf_counter()
        work.wait()
        waited = time.perf_counter() - waiting
        if trial > 0:
            shares.append(waited / max(alone - (posted - start), 1e-9))
    return float(statistics.median(comm.allgather_object(statistics.median(shares))))


WAITING_SIZE = 1024
"""The float32 matmul (``n x n x n``) :func:`measure_waiting`'s busy ranks compute: 12 ms on
a core here, a few time slices of the scheduler."""


def measure_waiting(comm: Communicator, reps: int) -> float:
    """The share of a core a rank computing gets while other ranks of its machine wait.

    In each of ``reps`` rounds (after one that warms up) half the ranks, drawn afresh (the
    same draw on every rank), compute a float32 matmul of :data:`WAITING_SIZE` while the
    others wait in the communicator's barrier; each busy rank's figure is its CPU time over
    its span. The median over the rounds and ranks: about ``cores / busy ranks`` (at most 1)
    where a waiting rank gives its core away (the ranks take turns:
    ``CoreSharing.TURNS``), about ``cores / ranks`` where it keeps its share (it polls:
    ``CoreSharing.PROCESSOR``). The same on every rank. 4 ranks of MPICH on this 2-core
    machine: 0.53 to 0.54 in three runs (processor sharing's 0.5; turns would give 1).

    Returns:
        The share, in (0, 1]; 1 on a single rank.
    """
    if comm.size < 2:
        return 1.0
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(WAITING_SIZE, WAITING_SIZE, generator=gen)
    draw = random.Random(comm.size)
    shares = []
    for trial in range(max(reps, 3) + 1):
        busy = set(draw.sample(range(comm.size), comm.size // 2))
        comm.barrier()
        if comm.rank in busy:
            start, cpu = time.perf_counter(), time.process_time()
            torch.mm(x, x)
            span = time.perf_counter() - start
            if trial > 0:
                shares.append(min(1.0, (time.process_time() - cpu) / max(span, 1e-9)))
        comm.barrier()
    every = [v for mine in comm.allgather_object(shares) for v in mine]
    return float(statistics.median(every))


def sharing_of(waiting_share: float, share: float) -> CoreSharing:
    """How ranks share cores, from :func:`measure_waiting`'s figure and their ``share``.

    Turns where the busy half of the ranks got nearer to the cores they would have with the
    waiting half off them (``min(1, 2 * share)``) than to processor sharing's ``share``.
    """
    turns = min(1.0, 2.0 * share)
    return (
        CoreSharing.TURNS
        if abs(waiting_share - turns) < abs(waiting_share - share)
        else CoreSharing.PROCESSOR
    )


def waiting_weight_of(waiting_share: float, share: float) -> float:
    """``Device.waiting_weight`` from :func:`measure_waiting`'s figure and the ranks' ``share``.

    Half a node's ranks busy, the other half waiting at the weight ``w``: a busy one gets
    ``share / ((1 + w) / 2)`` of a core, so ``w = 2 * share / waiting_share - 1``, in [0, 1]
    (4 ranks on 2 cores here, 0.535 of a core: 0.87).
    """
    return min(1.0, max(0.0, 2.0 * share / waiting_share - 1.0))


DUPLEX_BYTES = 4 * 1024 * 1024
"""Bytes each sending rank moves in :func:`measure_duplex`'s exchanges: enough that one
latency per peer is a few percent of the transfer (a 4 MiB one-way pair took 0.4 ms on 2
cores under MPICH and 0.65 ms on the 16-core host under Open MPI)."""

_DUPLEX_ROW = 64
"""bfloat16 elements per row of :func:`measure_duplex`'s exchanges (128-byte rows)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DuplexMeasure:
    """Three AlltoAllvs of one level's group, and whose work moves their bytes."""

    one_way_s: float
    """Ranks in pairs (0-1, 2-3, ...), the first of each sending :data:`DUPLEX_BYTES` to the
    second."""
    both_ways_s: float
    """The same pairs, each rank sending :data:`DUPLEX_BYTES` to the other."""
    one_to_all_s: float
    """Rank 0 sending :data:`DUPLEX_BYTES` split evenly among all the others."""
    duplex: Duplex
    """The duplex the ratios point to (:func:`nearest_duplex`)."""

    def describe(self) -> str:
        """The measurement in words, for a fitted topology's ``source``."""
        return (
            f"{self.duplex} duplex, measured: two-way pairs took "
            f"x{self.both_ways_s / self.one_way_s:.2f} a one-way pair's time and one rank "
            f"sending to all x{self.one_to_all_s / self.one_way_s:.2f}"
        )


def measure_duplex(comm: Communicator, reps: int) -> DuplexMeasure:
    """Time the exchanges of :class:`DuplexMeasure` on ``comm`` (every rank at once).

    Each is the slowest rank's lower quartile over ``reps`` rounds (at least 3) after one
    that warms up, each round running the three in turn (:func:`_quiet_times`), posted and
    waited for as the executor does. The same on every rank.
    """
    size, rank = comm.size, comm.rank
    if size < 2:
        raise ParamInvalidError("comm", size, "must have at least 2 ranks to exchange between")
    rows = DUPLEX_BYTES // (2 * _DUPLEX_ROW)
    partner = rank ^ 1 if (rank ^ 1) < size else rank

    def exchange(send_to: dict[int, int]) -> Callable[[], object]:
        send = [send_to.get(peer, 0) for peer in range(size)]
        recv = comm.allgather_object(send)
        counts = [recv[peer][rank] for peer in range(size)]
        data = torch.zeros((sum(send), _DUPLEX_ROW), dtype=torch.bfloat16)
        return lambda: comm.ialltoallv(data, send, counts).wait()

    one_way = {partner: rows} if rank % 2 == 0 and partner != rank else {}
    both = {partner: rows} if partner != rank else {}
    spread = {peer: rows // (size - 1) for peer in range(1, size)} if rank == 0 else {}
    one_way_s, both_ways_s, one_to_all_s = _quiet_times(
        comm, [exchange(pattern) for pattern in (one_way, both, spread)], reps
    )
    return DuplexMeasure(
        one_way_s=one_way_s,
        both_ways_s=both_ways_s,
        one_to_all_s=one_to_all_s,
        duplex=nearest_duplex(both_ways_s / one_way_s, one_to_all_s / one_way_s, size),
    )


def nearest_duplex(both_ways: float, one_to_all: float, ranks: int) -> Duplex:
    """The duplex whose predicted ratios are nearest the measured ones (:class:`DuplexMeasure`).

    Predicted (both ways, one to all) over one way: ``full`` (1, 1), ``half`` (2, 1),
    ``receiver`` (1, 1 / (ranks - 1)); nearest in squared log ratio, ``full`` where it ties
    (2 ranks cannot tell ``receiver`` from it: neither can their AlltoAllvs).

    Args:
        both_ways: two-way pairs' time over one-way pairs'.
        one_to_all: one rank sending to all the others, over one-way pairs.
        ranks: the group's ranks (>= 2).
    """
    predicted = {
        Duplex.FULL: (1.0, 1.0),
        Duplex.HALF: (2.0, 1.0),
        Duplex.RECEIVER: (1.0, 1.0 / max(ranks - 1, 1)),
    }

    def distance(duplex: Duplex) -> float:
        return sum(
            math.log(m / p) ** 2
            for m, p in zip((both_ways, one_to_all), predicted[duplex], strict=True)
        )

    return min(predicted, key=distance)  # dicts keep order: full first where it ties


POSTED_BYTES = (262144, 1048576, 4194304)
"""Bytes of the bfloat16 AllReduces whose posts :func:`measure_issue` times for the per-byte
part of posting a reduction (its float32 copy)."""


UPCAST_ELEMENTS = 16 * 1024 * 1024
"""Elements of :func:`measure_independent`'s bfloat16 to float32 conversion (32 MiB read, 64
MiB written): past the caches, as the kernels' memory passes and large posts go."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Independent:
    """Figures of the machine measured apart from the fit, printed beside the fitted ones.

    Each is timed on one rank while the others sleep, so on a whole core, unless it says it
    is timed on every rank at once.
    """

    matmul_tflops: float
    """A plain float32 matmul (1024 x 1024 x 1024, torch, one thread:
    :func:`mc2sim.study.measure.matmul_tflops`), TFLOP/s; the fit keeps it as its speed
    probe (``Device.probe_tflops``)."""
    memcpy_gbps: float
    """A 64 MiB copy, bytes read plus written per second, GB/s."""
    upcast_gbps: float
    """A bfloat16 to float32 conversion of 32 MiB, bytes of bfloat16 data per second, GB/s:
    the memory pass of the reference kernels, whose plans count 16-bit bytes."""
    pingpong_us: float
    """One exchange of 4 bytes between two ranks (a 2-rank float32 AllReduce, posted and
    waited for as the executor does: one message each way at once), the other ranks asleep,
    microseconds."""
    pingpong_loaded_us: float
    """The same, every pair of ranks exchanging at once (ranks 0-1, 2-3, ...): a message as
    the job's own ranks, sharing the cores, see it."""
    upcast_loaded_gbps: float
    """:attr:`upcast_gbps`'s conversion on every rank at once, by CPU time (the slowest
    rank's median), GB/s: the memory the ranks' posts share where every rank posts at once,
    as ``Device.issue_gbps`` is measured (8 ranks of a 16-core host fitted that 2.2 to 4.2
    times below one rank's lone conversion)."""


def lone_memory_speedup_of(independent: Independent, topology: Topology) -> float:
    """``Device.lone_memory_speedup``: one rank's conversion over every rank's at once.

    :attr:`Independent.upcast_gbps` (the others asleep) over
    :attr:`Independent.upcast_loaded_gbps` (every rank at once, by CPU time), at least 1,
    where each rank of a node has a core of its own and a node has more than one rank; 1
    elsewhere: where ranks share cores, the processor sharing (``Device.waiting_weight``)
    already speeds a task up as its node's other ranks go idle.
    """
    if topology.ranks_per_node < 2 or topology.core_share < 1.0:
        return 1.0
    if independent.upcast_loaded_gbps <= 0.0 or independent.upcast_gbps <= 0.0:
        return 1.0
    return max(1.0, independent.upcast_gbps / independent.upcast_loaded_gbps)


def measure_independent(comm: Communicator, reps: int) -> Independent:
    """Time the figures of :class:`Independent` (rank 0 alone, ranks 0 and 1, every rank).

    A float32 matmul, a memcpy and a bfloat16 to float32 conversion on rank 0, a ping-pong
    on ranks 0 and 1 and on every pair, then the conversion on every rank at once.
    """
    figures: dict[str, float] = {}
    half = torch.ones(UPCAST_ELEMENTS, dtype=torch.bfloat16)  # converted alone, then by all
    wide = torch.empty(UPCAST_ELEMENTS)

    def upcast_gbps(seconds: float) -> float:  # as 16-bit bytes read
        return half.numel() * 2 / max(seconds, 1e-9) / 1e9

    # the speed probe, as a run measures it: once every rank is done with what came before
    # (the contention fit runs on every rank, and one still fitting shared rank 0's core: 4
    # ranks here read 0.045 to 0.053 TFLOP/s against 0.085 to 0.093 before the rounds)
    matmul = probe_tflops(comm)
    if comm.rank == 0:
        src = torch.ones(16 * 1024 * 1024)  # 64 MiB of float32
        dst = torch.empty_like(src)
        seconds = alone_median(lambda: dst.copy_(src), reps)
        figures["memcpy"] = 2.0 * src.numel() * 4 / seconds / 1e9
        figures["upcast"] = upcast_gbps(alone_median(lambda: wide.copy_(half), reps))
    asleep_until_done(comm, comm.rank == 0)
    pair = comm.split(0 if comm.rank < 2 else 1, comm.rank)
    if comm.size >= 2 and comm.rank < 2:
        x = torch.zeros(1)
        seconds = alone_median(lambda: pair.iallreduce(x).wait(), 20 * reps)
        figures["pingpong"] = seconds * 1e6
    asleep_until_done(comm, comm.rank < 2)
    pairs = comm.split(comm.rank // 2, comm.rank)
    paired = pairs.size == 2
    if paired:
        x = torch.zeros(1)
        figures["loaded"] = alone_median(lambda: pairs.iallreduce(x).wait(), 20 * reps) * 1e6
    asleep_until_done(comm, paired)
    every = comm.allgather_object(figures)  # rank 0's figures, and every pair's exchange
    shared = every[0]
    converted = _median_time(comm, lambda: wide.copy_(half), max(reps, 3), cpu=True)
    return Independent(
        matmul_tflops=matmul,
        memcpy_gbps=shared["memcpy"],
        upcast_gbps=shared["upcast"],
        pingpong_us=shared.get("pingpong", 0.0),
        pingpong_loaded_us=max((f.get("loaded", 0.0) for f in every), default=0.0),
        upcast_loaded_gbps=upcast_gbps(converted),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LonePair:
    """Ranks 0 and 1 alone, each on a core of its own (:func:`measure_lone_pair`)."""

    latency_us: float
    """The shared-memory level's latency fitted on the pair's collectives, microseconds."""
    issue_us: float
    """The CPU time of a bare post (a 1-element float32 AllReduce) right after a compute task,
    as ``Device.issue_us`` is timed (:func:`measure_issue`), microseconds."""


def measure_lone_pair(
    comm: Communicator, reps: int, *, wide: bool, duplex: Duplex = Duplex.FULL
) -> LonePair:
    """The level latency and the bare post of ranks 0 and 1 alone, the others asleep (every rank).

    Where ranks share cores, a collective timed on every rank at once waits, at every
    message, for peers off their cores, and a post runs cold after another rank's turn: the
    figures ``calibrate`` fits from those timings hold both. Timed again with two ranks
    (of the first host, where several hosts) on cores of their own, as
    :func:`measure_collectives`'s sweep with its posts taken off (:func:`measure_issue`) and
    fitted as one level of two ranks at ``duplex`` (:func:`mc2sim.model.fit.fit_levels`),
    and the bare post by CPU time (the slower rank's median), they are the machine's own;
    the difference is what sharing the cores adds. Every rank returns rank 0's figures.
    """
    asleep_until_done(comm, False)  # every rank done with what came before
    paired = comm.rank < 2
    pair = comm.split(0 if paired else 1, comm.rank)
    mine: LonePair | None = None
    if paired and pair.size == 2:
        sweep = measure_collectives(pair, reps)
        posting = measure_issue(pair, reps)
        single = torch.zeros(1)
        bare = _slowest_post(
            pair, lambda: pair.iallreduce(single), reps, cpu=True, before=_task_before_post()
        )
        apart = [posting.taken_off(s) for s in sweep]
        dims, _ = fit_levels(
            [
                LevelSamples(
                    name="shared-memory",
                    world=2,
                    samples=apart,
                    kinds=(LinkKind.FULL_MESH,),
                    duplex=duplex,
                )
            ],
            reductions_in_float32=wide,
        )
        mine = LonePair(latency_us=dims[0].latency_us, issue_us=bare * 1e6)
    asleep_until_done(comm, paired)
    lone = comm.allgather_object(mine)[0]
    if not isinstance(lone, LonePair):  # a job of one rank: no pair
        raise ValueError("measure_lone_pair needs a communicator of at least 2 ranks")
    return lone


def split_sharing(
    network: Sequence[NetworkDim], issue_us: float, lone: LonePair
) -> tuple[tuple[NetworkDim, ...], float, float, float]:
    """Figures fitted with the ranks sharing cores, split by a lone pair's (:class:`LonePair`).

    ``network`` and ``issue_us`` were fitted with every rank at once; the part of the
    innermost level's latency and of the post above the lone pair's is what sharing the
    cores adds (``Device.shared_latency_us``, ``Device.shared_issue_us``), and it comes off
    every level's latency (never below 0) and off the post. Where the lone figure is the
    larger, sharing adds nothing and the figure stays. At the fitted core share the model's
    times are unchanged (:func:`mc2sim.model.cost.message_latency`,
    :func:`mc2sim.model.cost.issue_times`).

    Returns:
        ``(network, issue_us, shared_issue_us, shared_latency_us)``.
    """
    shared_latency = max(network[0].latency_us - lone.latency_us, 0.0)
    own = tuple(replace(d, latency_us=max(d.latency_us - shared_latency, 0.0)) for d in network)
    shared_issue = max(issue_us - lone.issue_us, 0.0)
    return own, issue_us - shared_issue, shared_issue, shared_latency


WIDE_REDUCTIONS = ("mpi", "gloo", "threads")
"""Backends whose reductions move float32 copies of 16-bit data (``Device.reductions_in_float32``):
mc2sim's MPI, gloo and thread communicators sum 16-bit floats in float32."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Level:
    """A network level and the group its collectives are timed on."""

    name: str
    """The level's network dimension's name."""
    group: Communicator
    """This rank's group of the level."""


def _levels(comm: Communicator, hosts: Sequence[str]) -> tuple[list[_Level], int]:
    """The levels of the network, innermost first, and the ranks each host holds.

    One host: one level, the whole job on shared memory. Several: the ranks of this rank's
    host (when it holds more than one), then one rank of each host (the ranks of one local
    index: every host's ranks form such a group at once, sharing the hosts' links as a job
    of all ranks does).

    Raises:
        ParamInvalidError: the hosts do not hold equal consecutive blocks of ranks.
    """
    where = Placement.of_hosts(hosts)
    if where.node_count == 1:
        return [_Level(name="shared-memory", group=comm)], comm.size
    per_node = comm.size // where.node_count
    if list(where.nodes) != [r // per_node for r in range(comm.size)]:
        raise ParamInvalidError(
            "hosts",
            list(hosts),
            "calibrating several hosts needs the same number of ranks on each, placed by host "
            "(mpiexec -hosts a:K,b:K)",
        )
    levels = [_Level(name="inter-node", group=comm.split(comm.rank % per_node, comm.rank))]
    if per_node > 1:
        intra = comm.split(comm.rank // per_node, comm.rank)
        levels.insert(0, _Level(name="shared-memory", group=intra))
    return levels, per_node


def _fit_levels(
    levels: Sequence[_Level],
    samples: Sequence[Sequence[CommSample]],
    *,
    wide: bool,
    per_node: int,
    duplexes: Sequence[DuplexMeasure | None],
) -> tuple[tuple[NetworkDim, ...], float]:
    """Each level's network dimension and the reductions' rate, fitted together.

    The inter-node level is a ``switch``: each host reaches the others through its port.
    With one rank per host, the host is a dimension of one rank, which carries no traffic
    (its figures, copied from the level above, are never used). Each level's duplex is
    measured (``duplexes``, None for a group of one rank: ``full``).
    """
    dims, reduce_gbps = fit_levels(
        [
            LevelSamples(
                name=level.name,
                world=level.group.size,
                samples=mine,
                kinds=(LinkKind.SWITCH,)
                if level.name == "inter-node"
                else (LinkKind.FULL_MESH, LinkKind.SWITCH),
                duplex=measured.duplex if measured is not None else Duplex.FULL,
            )
            for level, mine, measured in zip(levels, samples, duplexes, strict=True)
        ],
        reductions_in_float32=wide,
    )
    if per_node == 1 and len(dims) == 1 and levels[0].name == "inter-node":
        dims = (replace(dims[0], ranks=1, name="one rank per host"), *dims)
    return dims, reduce_gbps
