"""Calibrate a topology for the ranks at hand from microbenchmarks and overlapped runs.

Run on every rank (under mpiexec). All ranks measure at the same time, so each rank's
figures include what the others take from the machine, as in real runs:

1. compute: mc2sim's matmul kernels at several sizes and dtypes (and the int8 quant matmul);
   fitted to ``launch + flops / (peak(dtype) * util(flops))`` with the device's efficiency
   curve ``util(f) = min + (1 - min) * f / (f + half)``, least squares on relative error;
   memory bandwidth from a large copy, vector throughput from a large sum;
2. communication: AllReduce and AlltoAllv (even splits) at several sizes through the
   communicator, fitted to the alpha-beta model of one network dimension of every link kind;
   the kind with the smaller error is kept;
3. contention: tiled MatmulAllReduce and GroupedMatMulAlltoAllv runs, measured for real and
   simulated over a grid of compute and communication slowdowns; the pair with the smallest
   squared log error is kept.

Sizes here differ from the ones ``mc2sim validate-model`` checks the model on.
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

import numpy as np
import torch

from mc2sim.comm import Communicator, Work
from mc2sim.kernels import matmul, quant_matmul
from mc2sim.schedule.plan import Plan
from mc2sim.timeline import gather, record
from mc2sim.topology import Contention, Device, Efficiency, LinkKind, NetworkDim, Topology

__all__ = ["ComputeSample", "calibrate", "fit_compute", "fit_network"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ComputeSample:
    """One timed compute call."""

    dtype: str
    """The compute dtype."""
    flops: float
    """Its FLOPs."""
    seconds: float
    """Median seconds (slowest rank)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CommSample:
    """One timed collective."""

    kind: str
    """``allreduce`` or ``alltoallv``."""
    nbytes: float
    """Bytes per rank (AllReduce buffer; AlltoAllv send buffer)."""
    seconds: float
    """Median seconds (slowest rank)."""


def _median_time(comm: Communicator, fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        comm.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(max(comm.allgather_object(statistics.median(times))))


def measure_compute(comm: Communicator, reps: int) -> list[ComputeSample]:
    """Time the matmul kernels at several sizes (float16, bfloat16, float32, int8)."""
    samples = []
    gen = torch.Generator().manual_seed(comm.rank)
    sizes = [
        (64, 256, 256),
        (256, 256, 512),
        (512, 512, 512),
        (1024, 512, 1024),
        (2048, 1024, 1024),
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, k, n in sizes:
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = torch.randn(k, n, generator=gen).to(dtype)
            seconds = _median_time(comm, functools.partial(matmul, x, w), reps)
            samples.append(
                ComputeSample(
                    dtype=str(dtype).removeprefix("torch."), flops=2.0 * m * k * n, seconds=seconds
                )
            )
    scale = torch.full((1,), 1e-3)
    for m, k, n in sizes[1:]:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        run = functools.partial(quant_matmul, a, b, scale, output_dtype=torch.float16)
        seconds = _median_time(comm, run, reps)
        samples.append(ComputeSample(dtype="int8", flops=2.0 * m * k * n, seconds=seconds))
    return samples


def fit_compute(samples: Sequence[ComputeSample]) -> tuple[dict[str, float], Efficiency, float]:
    """Fit peak FLOP/s per dtype, the efficiency curve and the launch cost.

    Returns:
        ``(peak TFLOP/s by dtype, Efficiency(min_util, max_util=1, half_flops), launch_us)``.
    """
    dtypes = sorted({s.dtype for s in samples})
    flops = np.array([s.flops for s in samples])
    seconds = np.array([s.seconds for s in samples])
    best: tuple[float, float, float, np.ndarray] | None = None
    for min_util in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        for half in np.logspace(5, 10, 26):
            util = min_util + (1 - min_util) * flops / (flops + half)
            # t = launch + sum_d [dtype == d] * (flops / util) * inv_peak_d, weighted by 1/t
            columns = [np.ones_like(flops)] + [
                np.where([s.dtype == d for s in samples], flops / util, 0.0) for d in dtypes
            ]
            a = np.stack(columns, axis=1) / seconds[:, None]
            coef, *_ = np.linalg.lstsq(a, np.ones_like(seconds), rcond=None)
            if coef[0] < 0 or np.any(coef[1:] <= 0):
                continue
            error = float(np.sum((a @ coef - 1.0) ** 2))
            if best is None or error < best[0]:
                best = (error, min_util, float(half), coef)
    if best is None:
        raise RuntimeError("compute timings could not be fitted (no positive solution)")
    _, min_util, half, coef = best
    peaks = {d: float(1.0 / coef[i + 1] / 1e12) for i, d in enumerate(dtypes)}
    return peaks, Efficiency(min_util=min_util, max_util=1.0, half_flops=half), float(coef[0] * 1e6)


def measure_memory(comm: Communicator, reps: int) -> tuple[float, float]:
    """(memory GB/s from a 256 MiB copy, vector TFLOP/s from a 64 Mi-element sum)."""
    big = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    out = torch.empty_like(big)
    copy = _median_time(comm, lambda: out.copy_(big), reps)
    summed = _median_time(comm, lambda: torch.add(big, big, out=out), reps)
    nbytes = big.numel() * 4
    return 2 * nbytes / copy / 1e9, big.numel() / summed / 1e12


def measure_comm(comm: Communicator, reps: int) -> list[CommSample]:
    """Time AllReduce and even AlltoAllv through the communicator, 64 KiB to 16 MiB."""
    samples = []
    for nbytes in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24):
        t = torch.ones(nbytes // 2, dtype=torch.bfloat16)
        out = torch.empty_like(t)
        seconds = _median_time(comm, _waited(comm.iallreduce, t, out=out), reps)
        samples.append(CommSample(kind="allreduce", nbytes=nbytes, seconds=seconds))
        rows = max(comm.size, nbytes // 2 // 1024 // comm.size * comm.size)
        x = torch.ones(rows, 1024, dtype=torch.bfloat16)
        splits = [rows // comm.size] * comm.size
        seconds = _median_time(comm, _waited(comm.ialltoallv, x, splits, splits), reps)
        samples.append(CommSample(kind="alltoallv", nbytes=x.numel() * 2, seconds=seconds))
    return samples


def _waited(start: Callable[..., Work], *args: object, **kwargs: object) -> Callable[[], object]:
    """A call that starts a non-blocking collective and waits for it, as the executor does."""
    return lambda: start(*args, **kwargs).wait()


def _coefficients(kind: LinkKind, sample: CommSample, world: int) -> tuple[float, float]:
    """(a, b) with t = a * alpha + b * beta for one sample under one link kind."""
    n, p = sample.nbytes, world
    if sample.kind == "allreduce":
        if kind is LinkKind.FULL_MESH:
            return 2.0, 2.0 * n / p
        return 2.0 * (p - 1), 2.0 * (p - 1) * n / p
    away, peers = n * (p - 1) / p, p - 1
    if kind is LinkKind.FULL_MESH:
        return float(peers), n / p
    return float(peers), away


def fit_network(samples: Sequence[CommSample], world: int) -> NetworkDim:
    """Fit latency and 1 / bandwidth of one dimension per link kind; keep the best fit."""
    best: tuple[float, NetworkDim] | None = None
    seconds = np.array([s.seconds for s in samples])
    for kind in (LinkKind.FULL_MESH, LinkKind.SWITCH):
        a = np.array([_coefficients(kind, s, world) for s in samples]) / seconds[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(seconds), rcond=None)
        alpha, beta = max(float(coef[0]), 0.0), float(coef[1])
        if beta <= 0:
            continue
        error = float(np.sum((a @ np.array([alpha, beta]) - 1.0) ** 2))
        dim = NetworkDim(
            kind=kind,
            ranks=world,
            bandwidth_gbps=1.0 / beta / 1e9,
            latency_us=alpha * 1e6,
            name="shared-memory",
        )
        if best is None or error < best[0]:
            best = (error, dim)
    if best is None:
        raise RuntimeError("communication timings could not be fitted")
    return best[1]


def _overlapped_runs(comm: Communicator) -> list[tuple[Callable[[], object], tuple[Plan, ...]]]:
    """Tiled op calls to fit contention on, with every rank's plan for the simulator."""
    from mc2sim.model.validate import mm_all_reduce_case  # the same case builder

    cases = [mm_all_reduce_case(comm, m=2048, k=64, n=2048, tiling=4)]
    return [(c.run, c.plans) for c in cases]


def fit_contention(comm: Communicator, base: Topology, reps: int) -> Contention:
    """Grid-search the slowdowns that make simulated tiled runs match measured ones."""
    from mc2sim.model.simulator import simulate

    measured = []
    for run, plans in _overlapped_runs(comm):
        spans = []
        for _ in range(reps + 1):
            with record() as rec:
                run()
            spans.append(gather(comm, rec.timeline).metrics().total_s)
        measured.append((statistics.median(spans[1:]), plans))
    grid = [1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0]
    best: tuple[float, float, float] | None = None
    for cs, ms in itertools.product(grid, grid):
        trial = dataclasses.replace(
            base, contention=Contention(compute_slowdown=cs, comm_slowdown=ms)
        )
        error = 0.0
        for real, plans in measured:
            sim = simulate(dict(enumerate(plans)), trial).metrics().total_s
            error += math.log(sim / real) ** 2
        if best is None or error < best[0]:
            best = (error, cs, ms)
    if best is None:
        raise RuntimeError("contention could not be fitted")
    _, cs, ms = best
    return Contention(
        compute_slowdown=cs,
        comm_slowdown=ms,
        source=(
            "fitted by mc2sim calibrate: simulated against measured tiled MatmulAllReduce "
            "(m=2048, k=64, n=2048, 4 tiles) on this machine, grid search on squared log error"
        ),
    )


def calibrate(comm: Communicator, *, reps: int = 5, name: str = "this_machine") -> Topology:
    """Measure this machine on the ranks of ``comm`` and return its topology (every rank).

    Args:
        comm: every rank of the job.
        reps: repetitions per measurement (medians).
        name: the topology's name.

    Returns:
        The fitted topology; the same on every rank.
    """
    compute = measure_compute(comm, reps)
    peaks, efficiency, launch_us = fit_compute(compute)
    memory_gbps, vector_tflops = measure_memory(comm, reps)
    network = fit_network(measure_comm(comm, reps), comm.size)
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
        ),
        network=(network,),
        contention=Contention(source="not yet fitted"),
        source=(
            "mc2sim calibrate: matmul kernels at 5 sizes x 4 dtypes, AllReduce and AlltoAllv "
            f"at 64 KiB to 16 MiB, {reps} repetitions each, all {comm.size} ranks at once"
        ),
    )
    contention = fit_contention(comm, base, reps)
    # every figure above is the slowest rank's, shared by all: each rank fits the same topology
    return dataclasses.replace(base, contention=contention)
