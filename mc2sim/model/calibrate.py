"""Calibrate a topology for the ranks at hand from microbenchmarks and overlapped runs.

Run on every rank (under mpiexec). All ranks measure at the same time, so each rank's
figures include what the others take from the machine, as in real runs:

1. serial runs of every op at calibration sizes (MatmulAllReduce at six shapes from
   memory-bound to compute-bound, both MoE ops, AllGatherMatmul, MatmulReduceScatter, all
   bfloat16), recorded task by task: their compute tasks fit ``launch + flops / (peak *
   util(flops)) + bytes / bandwidth`` with ``util(f) = small + (large - small) * f / (f +
   half)``, rising or falling (least squares on relative error; the reference kernels'
   memory passes add to their arithmetic: ``memory_overlap: false``), and their AllReduce,
   AlltoAllv, AllGather and ReduceScatter tasks fit the alpha-beta model of one network
   dimension (the better of full mesh and switch) jointly with the vector rate of the
   reductions' additions. Tasks timed inside the ops carry every cost the model must
   predict (conversions, copies, the communicator's own work), which bare-kernel timings
   miss;
2. the bare kernels at several shapes in float16, float32 and int8 give those dtypes' peaks,
   and a reduce task's float32 sum of every rank's partial gives the vector rate, the other
   terms held fixed;
3. contention: tiled runs of four ops (MatmulAllReduce at two shapes, both MoE ops,
   AllGatherMatmul, and a GroupedMatMulAlltoAllv of a few KiB per chunk), measured for real
   and simulated over a grid of compute and communication slowdowns and of whether
   collectives in flight progress together (``Device.concurrent_collectives``); the point
   with the smallest squared log error is kept.

Every measurement runs its calls in interleaved rounds (each round calls each once, after a
warm-up round) and keeps medians, so a slow spell of a shared machine lands on all of them
alike. Sizes here differ from the ones ``mc2sim validate-model`` checks the model on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mc2sim.comm import Communicator
from mc2sim.kernels import matmul, quant_matmul
from mc2sim.schedule.plan import Resource, TaskKind
from mc2sim.timeline import Stream, TaskRecord, Timeline
from mc2sim.topology import Contention, Device, Efficiency, LinkKind, NetworkDim, Topology

if TYPE_CHECKING:
    from mc2sim.model.validate import Case

__all__ = [
    "Calibration",
    "ComputeSample",
    "calibrate",
    "fit_compute",
    "fit_contention",
    "fit_network",
    "samples_of",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ComputeSample:
    """One timed compute call."""

    dtype: str
    """The compute dtype."""
    flops: float
    """Its FLOPs."""
    nbytes: float
    """Bytes it reads and writes, counted as the plan builders count them."""
    seconds: float
    """Median seconds (slowest rank)."""
    weight: float = 1.0
    """Its weight in the fit: the tasks of one op call share one unit, so a call of many
    small tiles does not outweigh the others."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CommSample:
    """One timed collective."""

    kind: str
    """``allreduce``, ``alltoallv``, ``allgather`` or ``reduce_scatter``."""
    nbytes: float
    """Bytes per rank: the AllReduce buffer, the AlltoAllv send buffer, the AllGather result."""
    seconds: float
    """Median seconds (slowest rank)."""
    weight: float = 1.0
    """Its weight in the fit (as :attr:`ComputeSample.weight`)."""


def _median_time(comm: Communicator, fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        comm.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def measure_compute(comm: Communicator, reps: int) -> list[ComputeSample]:
    """Time the kernels at several shapes and dtypes, all ranks at once."""
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
            seconds = _median_time(comm, functools.partial(matmul, x, w), reps)
            nbytes = (m * k + k * n + m * n) * size
            samples.append(
                ComputeSample(dtype=name, flops=2.0 * m * k * n, nbytes=nbytes, seconds=seconds)
            )
    scale = torch.full((1,), 1e-3)
    for m, k, n in COMPUTE_SIZES[3::2]:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        run = functools.partial(quant_matmul, a, b, scale, output_dtype=torch.float16)
        seconds = _median_time(comm, run, reps)
        nbytes = m * k + k * n + 2 * m * n
        samples.append(
            ComputeSample(dtype="int8", flops=2.0 * m * k * n, nbytes=nbytes, seconds=seconds)
        )
    return samples


def fit_compute(
    samples: Sequence[ComputeSample],
) -> tuple[dict[str, float], Efficiency, float, float]:
    """Fit ``launch + flops / (peak(dtype) * util(flops)) + bytes / bandwidth``.

    The CPU reference kernels make separate memory passes (upcast, matmul, cast), so memory
    time adds to arithmetic. For each efficiency curve on a grid (rising from ``small_util``
    to 1, or falling from 1 to ``large_util``, with ``half_flops`` from 1e5 to 1e10) the
    model is linear in (launch, 1/peak per dtype, 1/bandwidth): least squares on relative
    error, each sample weighted by its ``weight``; the curve with the smallest error wins.

    Returns:
        ``(peak TFLOP/s by dtype, efficiency, launch_us, memory GB/s)``.
    """
    dtypes = sorted({s.dtype for s in samples})
    flops = np.array([s.flops for s in samples])
    nbytes = np.array([s.nbytes for s in samples])
    seconds = np.array([s.seconds for s in samples])
    root_weight = np.sqrt([s.weight for s in samples])
    best: tuple[float, float, float, float, np.ndarray] | None = None
    # rising (small tiles underuse the unit) or falling (time-shared cores): see Efficiency
    curves = [(u, 1.0) for u in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    curves += [(1.0, u) for u in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    for small_util, large_util in curves:
        for half in np.logspace(5, 10, 26):
            util = small_util + (large_util - small_util) * flops / (flops + half)
            columns = [np.ones_like(flops), nbytes] + [
                np.where([s.dtype == d for s in samples], flops / util, 0.0) for d in dtypes
            ]
            a = np.stack(columns, axis=1) * (root_weight / seconds)[:, None]
            coef = _nonnegative_lstsq(a, root_weight)
            if np.any(coef[2:] <= 0):  # every dtype needs a finite peak
                continue
            error = float(np.sum((a @ coef - root_weight) ** 2))
            if best is None or error < best[0]:
                best = (error, small_util, large_util, float(half), coef)
    if best is None:
        raise RuntimeError("compute timings could not be fitted (no positive solution)")
    _, small_util, large_util, half, coef = best
    peaks = {d: float(1.0 / coef[i + 2] / 1e12) for i, d in enumerate(dtypes)}
    efficiency = Efficiency(small_util=small_util, large_util=large_util, half_flops=half)
    memory_gbps = 1.0 / coef[1] / 1e9 if coef[1] > 0 else _UNBOUNDED_GBPS
    return peaks, efficiency, float(coef[0] * 1e6), float(memory_gbps)


def measure_vector(comm: Communicator, reps: int, *, launch_us: float, memory_gbps: float) -> float:
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

    seconds = _median_time(comm, reduce, reps)
    elements = parts[0].numel()
    flops = comm.size * elements
    nbytes = (comm.size + 1) * elements * parts[0].element_size()
    arithmetic = seconds - launch_us * 1e-6 - nbytes / (memory_gbps * 1e9)
    return flops / arithmetic / 1e12 if arithmetic > 0 else _UNBOUNDED_TFLOPS


def fit_peaks(
    samples: Sequence[ComputeSample], efficiency: Efficiency, launch_us: float, memory_gbps: float
) -> dict[str, float]:
    """Peak TFLOP/s of further dtypes, the efficiency, launch and memory terms held fixed."""
    peaks = {}
    for dtype in sorted({s.dtype for s in samples}):
        mine = [s for s in samples if s.dtype == dtype]
        arithmetic = np.array(
            [s.seconds - launch_us * 1e-6 - s.nbytes / (memory_gbps * 1e9) for s in mine]
        )
        work = np.array([s.flops / efficiency.util(s.flops) for s in mine])
        inv_peak = float(np.sum(work * arithmetic) / np.sum(work * work))  # least squares
        if inv_peak > 0:
            peaks[dtype] = 1.0 / inv_peak / 1e12
    return peaks


_UNBOUNDED_GBPS = 1e6
"""Memory bandwidth written when the fit finds memory traffic costs nothing measurable."""

_UNBOUNDED_TFLOPS = 1e6
"""Vector rate written when a reduce's memory traffic accounts for all of its time."""


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sub, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if np.all(sub >= 0):
            coef[active] = sub
            return coef
        active.pop(int(np.argmin(sub)))
    return coef


def samples_of(
    comm: Communicator, cases: Sequence[Case], rounds: Sequence[Sequence[Timeline]]
) -> tuple[list[ComputeSample], list[CommSample]]:
    """Per-task samples of serial op runs (``rounds[i]``: case i's gathered timelines).

    The tasks ran through the very code paths the model must predict (the kernels inside the
    ops, the communicator's collectives with their conversions and copies), so the fit sees
    their real costs, not only the bare kernels'. A compute task's time in one run is the
    slowest rank's; a collective's runs from the last rank's arrival (before it, the others
    only wait) to the last rank's completion (when the op's span ends on an oversubscribed
    machine, where a rank may see its completion a time slice late); a round in which some
    rank computed while its part of the collective was in flight (a tiled plan's next tile)
    is left out, as that time holds contention, which :func:`fit_contention` fits. Each
    task's figure is the median over the rounds kept, paired with the FLOPs and bytes of the
    busiest rank's task; the tasks of one case share one unit of weight in the fits.
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
                    seconds = max(r.duration_s for r in records)
                durations.setdefault(task_id, []).append(seconds)
        plan = case.plans[comm.rank]
        n_compute = sum(t.resource is Resource.COMPUTE for t in plan.tasks)
        n_comm = sum(t.resource is Resource.COMM and t.id in durations for t in plan.tasks)
        for task in plan.tasks:
            if task.id not in durations:
                continue  # a collective that overlapped compute in every round
            seconds = statistics.median(durations[task.id])
            if task.resource is Resource.COMPUTE:
                dtype = "int8" if task.kind is TaskKind.QUANT_MATMUL else plan.dtype
                busiest = max((p.tasks[task.id] for p in case.plans), key=lambda t: t.flops)
                compute.append(
                    ComputeSample(
                        dtype=dtype,
                        flops=busiest.flops,
                        nbytes=busiest.bytes,
                        seconds=seconds,
                        weight=1.0 / n_compute,
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


def _coefficients(
    kind: LinkKind, sample: CommSample, world: int, *, doubling: bool = False
) -> tuple[float, float, float]:
    """(a, b, c) with t = a * alpha + b * beta + c / reduce_rate under one link kind.

    The same formulas as :mod:`mc2sim.model.cost` for one dimension of ``world`` ranks; an
    AllReduce by recursive doubling when ``doubling`` (else the ring or mesh phases).
    """
    n, p = sample.nbytes, world
    mesh = kind is LinkKind.FULL_MESH
    if sample.kind == "allreduce":
        if doubling:
            rounds = float(math.ceil(math.log2(p))) if p > 1 else 0.0
            return rounds, rounds * n, rounds * n
        steps = 2.0 if mesh else 2.0 * (p - 1)
        return steps, steps * n / p, (p - 1) / p * n
    if sample.kind == "allgather":
        steps = 1.0 if mesh else float(p - 1)
        return steps, steps * n / p, 0.0
    if sample.kind == "reduce_scatter":
        steps = 1.0 if mesh else float(p - 1)
        return steps, steps * n / p, (p - 1) / p * n
    return float(p - 1), (n / p if mesh else n * (p - 1) / p), 0.0


def fit_network(samples: Sequence[CommSample], world: int) -> tuple[NetworkDim, float]:
    """Fit latency, 1 / bandwidth and the reduction's vector rate; keep the better link kind.

    Weighted least squares on relative error, as :func:`fit_compute`. The model times an
    AllReduce by the cheaper of two algorithms, which depends on the figures being fitted:
    each AllReduce sample starts on the ring (or mesh) phases, then takes the algorithm the
    fitted figures make cheaper, and the fit is repeated until no sample changes side.

    Returns:
        ``(the network dimension, the collectives' reduction rate in GB/s)``; a rate of 0
        means the additions cost nothing measurable.
    """
    best: tuple[float, NetworkDim, float] | None = None
    seconds = np.array([s.seconds for s in samples])
    root_weight = np.sqrt([s.weight for s in samples])
    for kind in (LinkKind.FULL_MESH, LinkKind.SWITCH):
        doubling = [False] * len(samples)
        for _ in range(len(samples) + 1):  # a fixed point, or as many passes as samples
            rows = [
                _coefficients(kind, s, world, doubling=d)
                for s, d in zip(samples, doubling, strict=True)
            ]
            a = np.array(rows) * (root_weight / seconds)[:, None]
            coef = _nonnegative_lstsq(a, root_weight)
            cheaper = [
                s.kind == "allreduce"
                and float(np.dot(_coefficients(kind, s, world, doubling=True), coef))
                < float(np.dot(_coefficients(kind, s, world), coef))
                for s in samples
            ]
            if cheaper == doubling:
                break
            doubling = cheaper
        alpha, beta, inv_reduce = float(coef[0]), float(coef[1]), float(coef[2])
        if beta <= 0:
            continue
        error = float(np.sum((a @ coef - root_weight) ** 2))
        dim = NetworkDim(
            kind=kind,
            ranks=world,
            bandwidth_gbps=1.0 / beta / 1e9,
            latency_us=alpha * 1e6,
            name="shared-memory",
        )
        if best is None or error < best[0]:
            best = (error, dim, 1.0 / inv_reduce / 1e9 if inv_reduce > 0 else 0.0)
    if best is None:
        raise RuntimeError("communication timings could not be fitted")
    return best[1], best[2]


COMPUTE_SLOWDOWNS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
"""The grid :func:`fit_contention` searches for the compute slowdown."""

COMM_SLOWDOWNS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0)
"""The grid :func:`fit_contention` searches for the communication slowdown."""


def fit_contention(
    base: Topology, cases: Sequence[Case], spans: Sequence[Sequence[float]]
) -> Topology:
    """Grid-search how overlapped work slows down, to make simulated tiled runs match.

    The grid: the compute and communication slowdowns, and whether collectives in flight
    progress together or one at a time (``Device.concurrent_collectives``).

    Args:
        base: the fitted topology, contention aside.
        cases: tiled op calls (every rank's plan).
        spans: each case's measured spans (slowest rank); their medians are matched.

    Returns:
        ``base`` at the grid point with the smallest sum of squared log errors over the cases.
    """
    from mc2sim.model.simulator import simulate

    measured = [(statistics.median(mine), c.plans) for c, mine in zip(cases, spans, strict=True)]
    source = (
        "fitted by mc2sim calibrate: simulated against measured tiled runs of "
        f"{', '.join(c.name for c in cases)} on this machine, grid search on squared log "
        "error (with device.concurrent_collectives)"
    )
    devices = {
        concurrent: dataclasses.replace(base.device, concurrent_collectives=concurrent)
        for concurrent in (False, True)
    }
    best: tuple[float, Topology] | None = None
    grid = itertools.product(devices.values(), COMPUTE_SLOWDOWNS, COMM_SLOWDOWNS)
    for device, cs, ms in grid:
        trial = dataclasses.replace(
            base,
            device=device,
            contention=Contention(compute_slowdown=cs, comm_slowdown=ms, source=source),
        )
        error = 0.0
        for real, plans in measured:
            sim = simulate(dict(enumerate(plans)), trial).metrics().total_s
            error += math.log(sim / real) ** 2
        if best is None or error < best[0]:
            best = (error, trial)
    if best is None:
        raise RuntimeError("contention could not be fitted")
    return best[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """A fitted topology and the spans of the runs measured alongside the calibration."""

    topology: Topology
    """The fitted topology; the same on every rank."""
    alongside: list[list[float]]
    """For each run passed as ``alongside``, its spans (slowest rank), one per round."""


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
            times its sweep there, so the fit and the sweep see the same state of the machine).
        progress: called after each round with ``(round, rounds, label)``.

    Returns:
        The fitted topology and the spans of the ``alongside`` calls.
    """
    from mc2sim.model.validate import calibration_cases, contention_cases, measure_rounds

    serial, tiled = calibration_cases(comm), contention_cases(comm)
    runs = [c.run for c in (*serial, *tiled)] + list(alongside)
    rounds = measure_rounds(comm, runs, reps=reps, progress=progress)
    spans = [[t.metrics().total_s for t in mine] for mine in rounds]
    compute, collectives = samples_of(comm, serial, rounds[: len(serial)])
    peaks, efficiency, launch_us, memory_gbps = fit_compute(compute)
    others = [s for s in measure_compute(comm, reps) if s.dtype not in peaks]
    peaks.update(fit_peaks(others, efficiency, launch_us, memory_gbps))
    network, reduce_gbps = fit_network(collectives, comm.size)
    vector_tflops = measure_vector(comm, reps, launch_us=launch_us, memory_gbps=memory_gbps)
    host = socket.gethostname()
    base = Topology(
        name=name,
        description=f"{comm.size} ranks on host {host}, fitted by mc2sim calibrate",
        device=Device(
            name=f"{host} CPU share of one rank (mc2sim kernels)",
            matrix_tflops=peaks,
            vector_tflops=vector_tflops,
            memory_gbps=memory_gbps,
            efficiency=efficiency,
            launch_us=launch_us,
            reduce_gbps=reduce_gbps,
            memory_overlap=False,
        ),
        network=(network,),
        contention=Contention(source="not yet fitted"),
        source=(
            "mc2sim calibrate: per-task times of serial runs of the five ops at calibration "
            "sizes (bfloat16), bare matmul kernels for float16, float32 and int8, "
            f"{reps} repetitions each, all {comm.size} ranks at once; memory bandwidth and the "
            "reductions' vector rate are effective figures of mc2sim's kernels and "
            "communicator on this machine, not of the chips"
        ),
    )
    first_tiled = len(serial)
    fitted = fit_contention(base, tiled, spans[first_tiled : first_tiled + len(tiled)])
    # every figure above is the slowest rank's, shared by all: each rank fits the same topology
    return Calibration(
        topology=fitted,
        alongside=spans[first_tiled + len(tiled) :],
    )
