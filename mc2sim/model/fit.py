"""Fitting a topology's figures to measured samples: pure functions, no ranks, no ops.

:mod:`mc2sim.study.calibrate` measures a machine and hands its samples here:

* compute tasks fit ``launch + flops / (peak * util(flops)) + bytes / bandwidth`` with
  ``util(f) = small + (large - small) * f / (f + half)``, rising to 1 (least squares on
  relative error; :func:`fit_compute`), further dtypes' peaks with the rest held fixed
  (:func:`fit_peaks`);
* collectives fit the alpha-beta model of each network level (the better of full mesh and
  switch) jointly with one vector rate of the reductions' additions (:func:`fit_levels`;
  :func:`fit_network` for one level);
* tiled runs fit the contention of overlapped work by grid search over simulated runs of
  their plans (:func:`fit_contention`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mc2sim.model.accuracy import typical
from mc2sim.model.cost import nonnegative_lstsq
from mc2sim.model.simulator import simulate
from mc2sim.schedule.plan import Plan
from mc2sim.topology import (
    Contention,
    CoreSharing,
    Duplex,
    Efficiency,
    LinkKind,
    NetworkDim,
    ProfilePoint,
    Topology,
)

__all__ = [
    "COMM_SLOWDOWNS",
    "ORDERS",
    "SLICES_US",
    "TURNS_US",
    "COMPUTE_SLOWDOWNS",
    "UNBOUNDED_GBPS",
    "UNBOUNDED_TFLOPS",
    "CommSample",
    "ComputeSample",
    "LevelSamples",
    "PlannedCall",
    "fit_compute",
    "fit_contention",
    "fit_levels",
    "fit_network",
    "fit_peaks",
    "fit_comm_profile",
    "fit_profile",
    "fit_rate",
]


class PlannedCall(Protocol):
    """An op call the contention fit simulates: its name and every rank's plan."""

    @property
    def name(self) -> str:
        """The call, in words."""

    @property
    def plans(self) -> Sequence[Plan]:
        """Every rank's plan, index = rank."""


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
    kind: str = "matmul"
    """The task kind (``TaskKind`` value): the profile keeps one curve per kind and dtype."""


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


def fit_compute(
    samples: Sequence[ComputeSample],
) -> tuple[dict[str, float], Efficiency, float, float]:
    """Fit ``launch + flops / (peak(dtype) * util(flops)) + bytes / bandwidth``.

    The CPU reference kernels make separate memory passes (upcast, matmul, cast), so memory
    time adds to arithmetic. For each efficiency curve on a grid (rising from ``small_util``
    to 1, with ``half_flops`` from 1e5 to 1e10) the model is linear in (launch, 1/peak per
    dtype, 1/bandwidth): least squares on relative error, each sample weighted by its
    ``weight``; the curve with the smallest error wins.

    The curve never falls: a task's utilisation does not drop as it grows, and every sample
    is a whole core's (CPU time where ranks share cores), so no time-sharing bends it
    either. A falling curve, fitted until the twenty-eighth session, read the peak as about
    ten times a core's, ran small tasks at it, and ran large ones at 0.1 of it: 4 ranks here,
    bfloat16 at 0.86 to 0.97 TFLOP/s, where a float32 1024^3 matmul measured 0.09.

    Returns:
        ``(peak TFLOP/s by dtype, efficiency, launch_us, memory GB/s)``.
    """
    dtypes = sorted({s.dtype for s in samples})
    flops = np.array([s.flops for s in samples])
    nbytes = np.array([s.nbytes for s in samples])
    seconds = np.array([s.seconds for s in samples])
    root_weight = np.sqrt([s.weight for s in samples])
    best: tuple[float, float, float, float, np.ndarray] | None = None
    curves = [(u, 1.0) for u in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    for small_util, large_util in curves:
        for half in np.logspace(5, 10, 26):
            util = small_util + (large_util - small_util) * flops / (flops + half)
            columns = [np.ones_like(flops), nbytes] + [
                np.where([s.dtype == d for s in samples], flops / util, 0.0) for d in dtypes
            ]
            a = np.stack(columns, axis=1) * (root_weight / seconds)[:, None]
            coef = nonnegative_lstsq(a, root_weight)
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
    memory_gbps = _gbps(float(coef[1]))
    return peaks, efficiency, float(coef[0] * 1e6), float(memory_gbps)


def fit_peaks(
    samples: Sequence[ComputeSample], efficiency: Efficiency, launch_us: float, memory_gbps: float
) -> dict[str, float]:
    """Peak TFLOP/s of further dtypes, the efficiency, launch and memory terms held fixed.

    Where those terms already take a dtype's samples' whole time (a fast bare kernel beside
    the reference kernels' fixed costs: a float32 matmul of one rank, one round), its peak is
    the fastest sample's own rate, a rate the kernel reached; every dtype gets one.
    """
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
        else:
            peaks[dtype] = max(w / s.seconds for w, s in zip(work, mine, strict=True)) / 1e12
    return peaks


def fit_rate(nbytes: Sequence[float], seconds: Sequence[float]) -> float:
    """GB/s of ``seconds = nbytes / rate``: the least-squares slope through the origin.

    Args:
        nbytes: each sample's bytes.
        seconds: each sample's time beyond its fixed part.

    Returns:
        The rate in GB/s; 0 where the slope is not positive (no per-byte cost measured).
    """
    sizes = np.asarray(nbytes, dtype=np.float64)
    per_byte = float(np.dot(sizes, np.asarray(seconds, dtype=np.float64)) / np.dot(sizes, sizes))
    return 1.0 / per_byte / 1e9 if per_byte > 0 else 0.0


def fit_profile(samples: Sequence[ComputeSample]) -> tuple[ProfilePoint, ...]:
    """The machine's profile: one point per distinct task (kind, dtype, FLOPs, bytes).

    A task timed in several places (the tiles of one call) keeps the median of its times.
    Sorted by kind, dtype and FLOPs.
    """
    groups: dict[tuple[str, str, float, float], list[float]] = {}
    for s in samples:
        groups.setdefault((s.kind, s.dtype, s.flops, s.nbytes), []).append(s.seconds)
    return tuple(
        ProfilePoint(
            kind=kind, dtype=dtype, flops=flops, bytes=nbytes, us=statistics.median(t) * 1e6
        )
        for (kind, dtype, flops, nbytes), t in sorted(groups.items())
    )


def fit_comm_profile(samples: Sequence[CommSample], world: int) -> tuple[ProfilePoint, ...]:
    """The collectives' profile: one point per (kind, bytes) timed on ``world`` ranks.

    Several samples of one kind and size (the chunks of one call) keep their median.
    """
    groups: dict[tuple[str, float], list[float]] = {}
    for s in samples:
        groups.setdefault((s.kind, s.nbytes), []).append(s.seconds)
    return tuple(
        ProfilePoint(
            kind=kind,
            dtype="",
            flops=0.0,
            bytes=nbytes,
            us=statistics.median(t) * 1e6,
            ranks=world,
        )
        for (kind, nbytes), t in sorted(groups.items())
        if statistics.median(t) > 0
    )


UNBOUNDED_GBPS = 1e6
"""Memory bandwidth written when the fit finds memory traffic costs nothing measurable."""

UNBOUNDED_TFLOPS = 1e6
"""Vector rate written when a reduce's memory traffic accounts for all of its time."""


def _gbps(seconds_per_byte: float) -> float:
    """GB/s of a fitted cost per byte, at most :data:`UNBOUNDED_GBPS`.

    Least squares may leave a cost per byte of rounding size (1e-27 s) where none is
    measurable: that is an unbounded rate, not 1e17 GB/s.
    """
    if seconds_per_byte <= 0:
        return UNBOUNDED_GBPS
    return min(1.0 / seconds_per_byte / 1e9, UNBOUNDED_GBPS)


def _coefficients(
    kind: LinkKind,
    sample: CommSample,
    world: int,
    *,
    doubling: bool = False,
    wire: float = 1.0,
    duplex: Duplex = Duplex.FULL,
) -> tuple[float, float, float]:
    """(a, b, c) with t = a * alpha + b * beta + c / reduce_rate under one link kind.

    The same formulas as :mod:`mc2sim.model.cost` for one dimension of ``world`` ranks; an
    AllReduce by recursive doubling when ``doubling`` (else the ring or mesh phases); a
    reduction's transfers carry ``wire`` bytes per byte of the sample. Every sample moves as
    much each way, which a ``half`` duplex dimension pays twice.
    """
    n, p = sample.nbytes, world
    both = 2.0 if duplex is Duplex.HALF else 1.0
    mesh = kind is LinkKind.FULL_MESH
    if sample.kind == "allreduce":
        if doubling:
            rounds = float(math.ceil(math.log2(p))) if p > 1 else 0.0
            return rounds, both * rounds * n * wire, rounds * n
        steps = 2.0 if mesh else 2.0 * (p - 1)
        return steps, both * steps * n * wire / p, (p - 1) / p * n
    if sample.kind == "allgather":
        steps = 1.0 if mesh else float(p - 1)
        return steps, both * steps * n / p, 0.0
    if sample.kind == "reduce_scatter":
        steps = 1.0 if mesh else float(p - 1)
        return steps, both * steps * n * wire / p, (p - 1) / p * n
    return float(p - 1), both * (n / p if mesh else n * (p - 1) / p), 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LevelSamples:
    """The collectives timed on one level of the network (one dimension of the topology)."""

    name: str
    """The dimension's name, e.g. ``shared-memory``."""
    world: int
    """Ranks of the groups the samples were timed on: the dimension's ``ranks``."""
    samples: Sequence[CommSample]
    """The timed collectives."""
    kinds: Sequence[LinkKind] = (LinkKind.FULL_MESH, LinkKind.SWITCH)
    """The link kinds to try (a host's network port is a ``switch`` whatever the number of
    hosts; with two, their timings cannot tell the kinds apart)."""
    duplex: Duplex = Duplex.FULL
    """Whose work moves the level's bytes, as measured
    (:func:`mc2sim.study.calibrate.measure_duplex`): the fitted dimension's ``duplex``."""


def fit_network(
    samples: Sequence[CommSample],
    world: int,
    *,
    name: str = "shared-memory",
    reductions_in_float32: bool = False,
) -> tuple[NetworkDim, float]:
    """Fit one network dimension and the reductions' rate: :func:`fit_levels` of one level.

    Returns:
        ``(the network dimension, the collectives' reduction rate in GB/s)``.
    """
    dims, reduce_gbps = fit_levels(
        [LevelSamples(name=name, world=world, samples=samples)],
        reductions_in_float32=reductions_in_float32,
    )
    return dims[0], reduce_gbps


def fit_levels(
    levels: Sequence[LevelSamples], *, reductions_in_float32: bool = False
) -> tuple[tuple[NetworkDim, ...], float]:
    """Fit every level's latency and 1 / bandwidth, and one rate of the reductions' additions.

    Weighted least squares on relative error, as :func:`fit_compute`, over the samples of
    all levels at once: each level has its own link figures, while the additions are the
    ranks' own work, one rate for all (an AllReduce's excess over what its transfers cost,
    beside the AlltoAllv and AllGather samples that pin the links). Every combination of the
    levels' link kinds is tried; the one with the smallest error is kept. The model times an
    AllReduce by the cheaper of two algorithms, which depends on the figures being fitted:
    each AllReduce sample starts on the ring (or mesh) phases, then takes the algorithm the
    fitted figures make cheaper, and the fit is repeated until no sample changes side.

    Args:
        levels: each level's timed collectives, innermost first.
        reductions_in_float32: whether reductions move twice the bytes the samples count
            (``Device.reductions_in_float32``).

    Returns:
        ``(the network dimensions, innermost first; the reductions' rate in GB/s)``; a rate
        of 0 means the additions cost nothing measurable.
    """
    flat = [(i, s) for i, level in enumerate(levels) for s in level.samples]
    seconds = np.array([s.seconds for _, s in flat])
    root_weight = np.sqrt([s.weight for _, s in flat])
    wire = 2.0 if reductions_in_float32 else 1.0
    width = 2 * len(levels) + 1  # (alpha, beta) per level, then 1 / reduce rate

    def row(kinds: Sequence[LinkKind], i: int, sample: CommSample, doubling: bool) -> np.ndarray:
        a, b, c = _coefficients(
            kinds[i], sample, levels[i].world, doubling=doubling, wire=wire, duplex=levels[i].duplex
        )
        out = np.zeros(width)
        out[2 * i : 2 * i + 2] = a, b
        out[-1] = c
        return out

    best: tuple[float, tuple[NetworkDim, ...], float] | None = None
    for kinds in itertools.product(*(level.kinds for level in levels)):
        doubling = [False] * len(flat)
        for _ in range(len(flat) + 1):  # a fixed point, or as many passes as samples
            rows = np.array([row(kinds, i, s, d) for (i, s), d in zip(flat, doubling, strict=True)])
            a = rows * (root_weight / seconds)[:, None]
            coef = nonnegative_lstsq(a, root_weight)
            cheaper = [
                s.kind == "allreduce"
                and float(np.dot(row(kinds, i, s, True), coef))
                < float(np.dot(row(kinds, i, s, False), coef))
                for i, s in flat
            ]
            if cheaper == doubling:
                break
            doubling = cheaper
        error = float(np.sum((a @ coef - root_weight) ** 2))
        dims = tuple(
            NetworkDim(
                kind=kind,
                ranks=level.world,
                # no cost per byte found (noise, or latency explains all): unbounded
                bandwidth_gbps=_gbps(float(coef[2 * i + 1])),
                latency_us=float(coef[2 * i]) * 1e6,
                name=level.name,
                duplex=level.duplex,
            )
            for i, (kind, level) in enumerate(zip(kinds, levels, strict=True))
        )
        inv_reduce = float(coef[-1])
        if best is None or error < best[0]:
            best = (error, dims, 1.0 / inv_reduce / 1e9 if inv_reduce > 0 else 0.0)
    if best is None:  # only when ``levels`` offers no link kind to try
        raise RuntimeError("communication timings could not be fitted: no link kind to try")
    return best[1], best[2]


COMPUTE_SLOWDOWNS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
"""The grid :func:`fit_contention` searches for the compute slowdown."""

SLICES_US = (0.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 10000.0)
"""The grid :func:`fit_contention` searches for ``Device.slice_us`` where ranks share cores
by processor sharing (``CoreSharing.PROCESSOR``: the wait for a peer off its core)."""

TURNS_US = (250.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0)
"""The grid :func:`fit_contention` searches for ``Device.slice_us`` where ranks take turns on
the cores they share (``CoreSharing.TURNS``: how long a rank holds a core while another
waits for one)."""


ORDERS: tuple[tuple[bool, tuple[str, ...]], ...] = (
    (False, ()),
    (True, ()),
    (True, ("allgather", "allreduce", "reduce_scatter")),
)
"""The grid :func:`fit_contention` searches for how collectives in flight progress
(``Device.concurrent_collectives``, ``Device.one_at_a_time``): one at a time; together; and,
where ranks share cores, together but for the reductions and gathers. A CPU MPI runs a
nonblocking reduction as rounds, each waiting for its peers; where they are off their cores
a round waits for a time slice (``Device.slice_us``), and the rounds of reductions in flight
together wait in turn: four 64 KiB AllReduces posted at once on 4 ranks of this 2-core
machine took x2.9 one, where overlapping waits gave x2.2 and one at a time x2.7. Where each
rank has a core, no round waits for a slice: four took x2.9 again on 2 ranks, but there
"together" is x1.95 and one at a time x4.0, and fits that chose the reductions alone
predicted the held-out cases worse (2 ranks: 5.4, 5.4, 5.6% against 4.8, 5.3, 5.4%, and on an
evening at half the machine's pace 5.0, 3.4, 5.2% against 4.9, 4.5, 4.0%; a 4-rank dump of the
16-core host refitted, 7.5 against 6.5%)."""

COMM_SLOWDOWNS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0)
"""The grid :func:`fit_contention` searches for the communication slowdown."""


def fit_contention(
    base: Topology,
    cases: Sequence[PlannedCall],
    spans: Sequence[Sequence[float]],
    *,
    polled: bool | None = None,
    progress: str = "",
    sharing: CoreSharing | None = None,
    serial: Sequence[PlannedCall] = (),
    serial_spans: Sequence[Sequence[float]] = (),
) -> Topology:
    """Grid-search how overlapped work slows down, to make simulated tiled runs match.

    The grid: where ranks share cores, how (``Device.core_sharing``: processor sharing, with
    the wait for a peer off its core, or turns, with how long a turn lasts: both
    ``Device.slice_us``); the compute and communication slowdowns, or polled progress (a
    transfer stops while a rank computes: ``Contention.polled``) in place of the latter, and
    how collectives in flight progress: together, one at a time, or (where ranks share
    cores) together but for some kinds (:data:`ORDERS`: ``Device.concurrent_collectives``,
    ``Device.one_at_a_time``).

    Args:
        base: the fitted topology, contention aside.
        cases: tiled op calls (every rank's plan).
        spans: each case's measured spans (slowest rank); their lower quartiles
            (:func:`mc2sim.model.accuracy.typical`) are matched.
        polled: whether the machine's collectives progress only inside the communicator's
            calls, where that was measured (``calibrate``'s
            :func:`~mc2sim.study.calibrate.measure_progress`): the grid then keeps to it
            (True: polled progress, no communication slowdown to fit; False: the
            slowdowns). None: the grid tries both. Measured, it is not left to the
            spans: on 2 ranks of a 2-core machine a compute slowdown of 3 (not physical:
            the later tiles of a tiled MatmulAllReduce run at their serial speed) matched
            them within 2% of polled progress in squared error on two measurements of
            five, and predicted the held-out cases 1.1 to 1.9 points worse.
        progress: how ``polled`` was found, in words, for the fit's ``source``.
        sharing: where ranks share cores, how, where that was measured (``calibrate``'s
            :func:`~mc2sim.study.calibrate.measure_waiting`): the grid keeps to it. None:
            it tries both. Left to the spans, the grid chose turns of 2 to 3 ms on five
            4-rank runs of this 2-core machine (with no floor of ``launch_us`` under warm
            tasks), where a rank computing while the others waited in MPI got 0.53 of a
            core: held-out 8.7, 8.7, 8.6, 8.2, 6.9%, against 6.4, 5.9, 5.7, 5.5, 6.2% kept
            to processor sharing.
        serial: further calls whose errors the grid also sums: where ranks share cores,
            the serial calls show how they share them as much as the tiled ones (who runs
            first, who waits), and there are more of them. Five 4-rank runs on this 2-core
            machine, refitted both ways on the same measurements: held-out 7.6, 5.5, 7.0,
            5.8, 6.9% on the tiled calls alone, 5.1, 8.7, 5.8, 5.3, 6.2% with the serial ones.
        serial_spans: each of ``serial``'s measured spans, as ``spans``.

    Returns:
        ``base`` at the grid point with the smallest sum of absolute log errors over the cases
        (not squared: one call the model cannot follow would steer the grid. On 4 ranks here
        ``cal_dispatch_128 experts x 2``, +47 to +72% at every grid point, pulled the squared
        fit off the others; paired runs held out 4.8, 4.5, 4.8% against 6.1, 6.2, 7.3% with
        squares on 4 ranks, 3.5, 5.0, 4.4% against 6.1, 5.3, 4.8% on 2).
    """
    measured = [
        (typical(mine), c.plans)
        for c, mine in zip([*cases, *serial], [*spans, *serial_spans], strict=True)
    ]
    source = (
        "fitted by mc2sim calibrate: simulated against measured tiled runs of "
        f"{', '.join(c.name for c in cases)}"
        + (f" and {len(serial)} serial calls" if serial else "")
        + " on this machine, grid search on absolute log "
        "error (with device.concurrent_collectives and one_at_a_time)"
        + (f"; {progress}" if progress else "")
    )
    devices = [
        dataclasses.replace(base.device, concurrent_collectives=together, one_at_a_time=kinds)
        for together, kinds in ORDERS
        if base.core_share < 1.0 or not kinds  # some kinds alone: only where ranks share cores
    ]
    best: tuple[float, Topology] | None = None
    comm = ([] if polled is True else [(ms, False) for ms in COMM_SLOWDOWNS]) + (
        [] if polled is False else [(1.0, True)]
    )
    ways = (
        [(CoreSharing.PROCESSOR, slice_us) for slice_us in SLICES_US]
        + [(CoreSharing.TURNS, turn_us) for turn_us in TURNS_US]
        if base.core_share < 1.0
        else [(CoreSharing.PROCESSOR, 0.0)]
    )
    if sharing is not None and base.core_share < 1.0:
        ways = [(cores, slice_us) for cores, slice_us in ways if cores is sharing]
    grid = itertools.product(devices, ways, COMPUTE_SLOWDOWNS, comm)
    for device, (cores, slice_us), cs, (ms, polled) in grid:
        trial = dataclasses.replace(
            base,
            device=dataclasses.replace(device, slice_us=slice_us, core_sharing=cores),
            contention=Contention(
                compute_slowdown=cs, comm_slowdown=ms, polled=polled, source=source
            ),
        )
        error = 0.0
        for real, plans in measured:
            sim = simulate(dict(enumerate(plans)), trial).metrics().total_s
            error += abs(math.log(sim / real))
        if best is None or error < best[0]:
            best = (error, trial)
    if best is None:
        raise RuntimeError("contention could not be fitted")
    return best[1]
