"""Validate the cost model: a sweep of fused-op cases run for real and simulated.

Each case is one op call with its tiling, sizes and routing. The real side runs it on the
ranks at hand (under mpiexec), recording its timeline; the simulated side runs every rank's
plan (built by the same builders the op uses) on a topology. Both compare the same thing:
the span of the plan's execution on the slowest rank (``Timeline.metrics().total_s``).
The error of a case is ``max(sim, real) / min(sim, real) - 1``; the sweep's error is the
geometric mean of those ratios, minus one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc2sim import ops
from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError
from mc2sim.model.accuracy import geomean_of, model_error
from mc2sim.model.simulator import simulate
from mc2sim.routing import RoutingConfig, RoutingKind, route
from mc2sim.schedule import (
    Plan,
    TaskKind,
    plan_all_gather_matmul,
    plan_alltoallv_gmm,
    plan_gmm_alltoallv,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
    tiling_of,
)
from mc2sim.schedule.builders import MatmulShape, MoeShape
from mc2sim.schedule.tiling import Tiling
from mc2sim.timeline import Timeline, gather, record
from mc2sim.topology import Topology

__all__ = [
    "Case",
    "CaseResult",
    "calibration_cases",
    "contention_cases",
    "default_cases",
    "geomean_error",
    "measure_rounds",
    "score_cases",
    "run_cases",
]

TilingSpec = None | str | int | Tiling
"""What the ops' ``tiling=`` takes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One op call: how to run it for real, and every rank's plan."""

    name: str
    """Op, tiling, sizes and routing, in words."""
    run: Callable[[], object]
    """Runs the op on this rank (every rank calls it)."""
    plans: tuple[Plan, ...]
    """Every rank's plan of the call, index = rank."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CaseResult:
    """Measured and simulated span of one case."""

    name: str
    """The case."""
    measured_s: float
    """Median measured span (slowest rank)."""
    simulated_s: float
    """Simulated span (slowest rank)."""

    @property
    def error(self) -> float:
        """``max / min - 1`` of the two spans."""
        return model_error(self.measured_s, self.simulated_s)


def _bf16(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def mm_all_reduce_case(comm: Communicator, *, m: int, k: int, n: int, tiling: TilingSpec) -> Case:
    """MatmulAllReduce of bfloat16 (m, k) x (k, n)."""
    gen = torch.Generator().manual_seed(comm.rank)
    x1, x2 = _bf16(gen, m, k), _bf16(gen, k, n)
    shape = MatmulShape(k=k, n=n, in_bytes=2, w_bytes=2, out_bytes=2, dtype="bfloat16")
    plans = tuple(
        plan_mm_all_reduce(
            m=m, shape=shape, kind=TaskKind.MATMUL, tiling=tiling_of(tiling),
            rank=r, world_size=comm.size,
        )
        for r in range(comm.size)
    )  # fmt: skip
    return Case(
        name=f"mm_all_reduce m={m} k={k} n={n} {plans[0].tiling}",
        run=lambda: ops.mm_all_reduce(x1, x2, comm, tiling=tiling),
        plans=plans,
    )


def moe_case(
    comm: Communicator,
    *,
    op: str,
    tokens: int,
    e: int,
    h1: int,
    n1: int,
    routing: RoutingConfig,
    tiling: TilingSpec,
) -> Case:
    """GroupedMatMulAlltoAllv (``op="combine"``) or AlltoAllvGroupedMatMul (``"dispatch"``)."""
    table = route(
        routing, world_size=comm.size, experts_per_rank=e, tokens_per_rank=tokens, top_k=2
    )
    direction = "combine" if op == "combine" else "dispatch"
    send = [table.send_counts(r, direction) for r in range(comm.size)]
    recv = [table.recv_counts(r, direction) for r in range(comm.size)]
    gen = torch.Generator().manual_seed(comm.rank)
    x = _bf16(gen, sum(send[comm.rank]), h1)
    w = _bf16(gen, e, h1, n1)
    builder = plan_gmm_alltoallv if op == "combine" else plan_alltoallv_gmm
    plans = tuple(
        builder(
            shape=MoeShape(
                e=e, send=tuple(send[r]), recv=tuple(recv[r]), h1=h1, n1=n1, elem_bytes=2,
                dtype="bfloat16",
            ),
            tiling=tiling_of(tiling),
            rank=r,
        )
        for r in range(comm.size)
    )  # fmt: skip
    fn = ops.gmm_alltoallv if op == "combine" else ops.alltoallv_gmm
    return Case(
        name=f"{plans[0].op} BS={tokens} e={e} H1={h1} N1={n1} {routing.kind} {plans[0].tiling}",
        run=lambda: fn(x, w, comm, comm.size, send[comm.rank], recv[comm.rank], tiling=tiling),
        plans=plans,
    )


def tp_pair_case(
    comm: Communicator, *, op: str, m: int, k: int, n: int, tiling: TilingSpec
) -> Case:
    """AllGatherMatmul (``op="all_gather"``) or MatmulReduceScatter (``"reduce_scatter"``)."""
    gen = torch.Generator().manual_seed(comm.rank)
    x1, x2 = _bf16(gen, m, k), _bf16(gen, k, n)
    shape = MatmulShape(k=k, n=n, in_bytes=2, w_bytes=2, out_bytes=2, dtype="bfloat16")
    builder = plan_all_gather_matmul if op == "all_gather" else plan_matmul_reduce_scatter
    plans = tuple(
        builder(m=m, shape=shape, tiling=tiling_of(tiling), rank=r, world_size=comm.size)
        for r in range(comm.size)
    )
    fn = ops.all_gather_matmul if op == "all_gather" else ops.matmul_reduce_scatter
    return Case(
        name=f"{plans[0].op} m={m} k={k} n={n} {plans[0].tiling}",
        run=lambda: fn(x1, x2, comm, comm.size, tiling=tiling),
        plans=plans,
    )


def default_cases(comm: Communicator) -> list[Case]:
    """The validation sweep: 16 cases of 4 ops x tilings x sizes x routing skew."""
    uniform = RoutingConfig(kind=RoutingKind.UNIFORM, seed=2)
    skewed = RoutingConfig(kind=RoutingKind.ZIPF, seed=2, skew=1.5)
    cases = []
    for m, k, n in ((2048, 64, 2048), (4096, 128, 1024)):
        for tiling in ("serial", None, 4):
            cases.append(mm_all_reduce_case(comm, m=m, k=k, n=n, tiling=tiling))
    for routing in (uniform, skewed):
        for tiling in ("serial", None):
            cases.append(
                moe_case(
                    comm,
                    op="combine",
                    tokens=2048,
                    e=4,
                    h1=64,
                    n1=1024,
                    routing=routing,
                    tiling=tiling,
                )
            )
    for tiling in ("serial", None):
        cases.append(
            moe_case(
                comm,
                op="dispatch",
                tokens=2048,
                e=4,
                h1=1024,
                n1=64,
                routing=uniform,
                tiling=tiling,
            )
        )
    for op in ("all_gather", "reduce_scatter"):
        for tiling in ("serial", None):
            cases.append(tp_pair_case(comm, op=op, m=512 * comm.size, k=256, n=1024, tiling=tiling))
    return cases


def calibration_cases(comm: Communicator) -> list[Case]:
    """Serial runs of every op at sizes ``default_cases`` does not use (``mc2sim calibrate``)."""
    uniform = RoutingConfig(kind=RoutingKind.UNIFORM, seed=5)
    cases = [
        mm_all_reduce_case(comm, m=m, k=k, n=n, tiling="serial")
        for m, k, n in (
            (1024, 64, 1024),
            (3072, 48, 2048),
            (2048, 192, 1536),
            (4096, 128, 512),
            (64, 256, 256),  # small: per-task and per-message fixed costs dominate
            (256, 128, 512),
        )
    ]
    cases.append(
        moe_case(
            comm, op="combine", tokens=1024, e=4, h1=64, n1=2048, routing=uniform, tiling="serial"
        )
    )
    cases.append(
        moe_case(
            comm, op="dispatch", tokens=1024, e=4, h1=2048, n1=64, routing=uniform, tiling="serial"
        )
    )
    cases.append(  # small chunks: the executor's per-task costs
        moe_case(comm, op="combine", tokens=64, e=4, h1=128, n1=256, routing=uniform, tiling=4)
    )
    for op in ("all_gather", "reduce_scatter"):
        cases.append(tp_pair_case(comm, op=op, m=384 * comm.size, k=512, n=768, tiling="serial"))
    return cases


def contention_cases(comm: Communicator) -> list[Case]:
    """Tiled runs of four ops at calibration sizes, to fit contention on (``mc2sim calibrate``).

    Their chunks range from large (bandwidth shared with compute) to a few KiB (latency), so
    the fit also sees whether collectives in flight progress together.
    """
    uniform = RoutingConfig(kind=RoutingKind.UNIFORM, seed=5)
    return [
        mm_all_reduce_case(comm, m=3072, k=48, n=2048, tiling=4),
        mm_all_reduce_case(comm, m=2048, k=192, n=1536, tiling=4),
        moe_case(
            comm, op="combine", tokens=1024, e=4, h1=64, n1=2048, routing=uniform, tiling=None
        ),
        moe_case(
            comm, op="dispatch", tokens=1024, e=4, h1=2048, n1=64, routing=uniform, tiling=None
        ),
        tp_pair_case(comm, op="all_gather", m=384 * comm.size, k=512, n=768, tiling=None),
        # small messages in flight together: whether collectives progress at once
        moe_case(comm, op="combine", tokens=128, e=4, h1=128, n1=256, routing=uniform, tiling=None),
    ]


def run_cases(
    comm: Communicator,
    cases: Sequence[Case],
    topology: Topology,
    *,
    reps: int = 5,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CaseResult]:
    """Run every case for real (median span over ``reps`` rounds) and simulated.

    Every rank calls it and gets the same results.
    """
    rounds = measure_rounds(comm, [c.run for c in cases], reps=reps, progress=progress)
    return score_cases(cases, [[t.metrics().total_s for t in mine] for mine in rounds], topology)


def score_cases(
    cases: Sequence[Case], spans: Sequence[Sequence[float]], topology: Topology
) -> list[CaseResult]:
    """Each case's median measured span (``spans[i]``) against its simulated span."""
    return [
        CaseResult(
            name=case.name,
            measured_s=statistics.median(mine),
            simulated_s=simulate(dict(enumerate(case.plans)), topology).metrics().total_s,
        )
        for case, mine in zip(cases, spans, strict=True)
    ]


def measure_rounds(
    comm: Communicator,
    runs: Sequence[Callable[[], object]],
    *,
    reps: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[list[Timeline]]:
    """Each run's recorded timeline (every rank's) in ``reps`` interleaved rounds.

    Each round calls every run once, so a slow spell of a shared machine lands on all of them
    alike instead of on the few that ran during it, in a new shuffled order (seeded: the same
    on every rank), so no run always follows the same one (a call after another of other
    shapes can pay for the caches and the allocator); a first round warms up and is not kept.

    Returns:
        For every run, its ``reps`` gathered timelines; the same on every rank.

    Raises:
        ParamInvalidError: ``reps`` below 1.
    """
    if reps < 1:
        raise ParamInvalidError("reps", reps, "must be >= 1 (rounds measured after the warm-up)")
    kept: list[list[Timeline]] = [[] for _ in runs]
    rounds = reps + 1
    shuffle = np.random.default_rng(0)  # the same order on every rank
    for rnd in range(rounds):
        for i in shuffle.permutation(len(runs)):
            with record() as rec:
                runs[i]()
            if rnd > 0:
                kept[i].append(gather(comm, rec.timeline))
        if progress is not None:
            progress(rnd, rounds, "warm-up" if rnd == 0 else f"round {rnd}/{reps}")
    return kept


def geomean_error(results: Sequence[CaseResult]) -> float:
    """Geometric mean of ``max/min`` over the cases, minus one."""
    return geomean_of(r.error for r in results)
