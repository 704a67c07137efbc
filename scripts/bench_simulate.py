"""Time the cost-model simulation of GroupedMatMulAlltoAllv at thousands of ranks.

For each world size W (a multiple of 16: servers of 16 Ascend 910C dies) the builtin
topology ``atlas_a3_superpod_384`` is resized with ``with_world(W)``; a Zipf routing
(``route(..., sparse=True)``) gives every rank its combine-direction counts as
``SparseCounts``; every rank's GroupedMatMulAlltoAllv plan is built with the hardware tiling
(one GMM and one AlltoAllv per local expert); then ``simulate`` runs them all. Each stage is
timed on its own (routing, plans, ``simulate``, ``Timeline.metrics``), with the simulated op
time and the peak resident memory. Each W runs in a fresh process (``--in-process`` to turn
that off), so the peak RSS is that W's own.

Targets (the issue's): ``simulate`` at 1024 ranks within 2 s, at 8192 ranks within 30 s;
the script exits 1 if one is missed. ``--profile`` runs cProfile over ``simulate`` at the
largest W and prints where the time goes.

    python scripts/bench_simulate.py                       # W = 64 ... 8192
    python scripts/bench_simulate.py --ranks 1024 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import pstats
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mc2sim.errors import ParamInvalidError
from mc2sim.model import simulate
from mc2sim.routing import Direction, RoutingConfig, RoutingKind, route
from mc2sim.schedule import Plan, Tiling, plan_gmm_alltoallv
from mc2sim.schedule.builders import MoeShape
from mc2sim.topology import Topology, builtin

DEFAULT_RANKS = (64, 256, 1024, 2048, 4096, 8192)
TARGETS_S = {1024: 2.0, 8192: 30.0}
"""Seconds ``simulate`` may take at these world sizes (the issue's targets)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """The MoE layer every rank runs (DeepSeek-V3-like by default)."""

    topology: str
    """Builtin topology, resized to each W."""
    experts: int
    """Local experts per rank."""
    tokens: int
    """Tokens per rank (BS)."""
    top_k: int
    """Experts per token."""
    h1: int
    """Hidden size of the routed experts."""
    n1: int
    """Output size of the routed experts."""
    skew: float
    """Zipf exponent of the routing."""
    seed: int
    """Routing seed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """The measurements at one world size."""

    ranks: int
    """World size W."""
    servers: int
    """Servers of the resized topology (its outermost dimension)."""
    routing_s: float
    """Seconds of ``route(..., sparse=True)``."""
    plans_s: float
    """Seconds to build every rank's plan (counts sliced from the routing included)."""
    simulate_s: float
    """Seconds of ``simulate``."""
    metrics_s: float
    """Seconds of ``Timeline.metrics`` on the result."""
    tasks: int
    """Tasks over all ranks."""
    total_s: float
    """The simulated op time (slowest rank)."""
    peak_rss_mib: float
    """Peak resident memory of the process, MiB."""


def resized(case: Case, ranks: int) -> Topology:
    """The case's topology resized to ``ranks`` (a multiple of its inner dimensions)."""
    return builtin(case.topology).with_world(ranks)


def build_plans(case: Case, ranks: int) -> tuple[dict[int, Plan], float, float]:
    """Every rank's plan; also the seconds of the routing and of the plan building."""
    start = time.perf_counter()
    routing = route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=case.seed, skew=case.skew),
        world_size=ranks,
        experts_per_rank=case.experts,
        tokens_per_rank=case.tokens,
        top_k=case.top_k,
        sparse=True,
    )
    routed = time.perf_counter()
    plans = {}
    for rank in range(ranks):
        shape = MoeShape(
            e=case.experts,
            send=routing.send_counts(rank, Direction.COMBINE),
            recv=routing.recv_counts(rank, Direction.COMBINE),
            h1=case.h1,
            n1=case.n1,
            elem_bytes=2,
            dtype="bfloat16",
        )
        plans[rank] = plan_gmm_alltoallv(shape=shape, tiling=Tiling(), rank=rank)
    built = time.perf_counter()
    return plans, routed - start, built - routed


def measure(case: Case, ranks: int) -> Row:
    """Route, plan and simulate at ``ranks``; time each stage.

    Args:
        case: the MoE layer.
        ranks: the world size.

    Returns:
        The measurements.
    """
    topology = resized(case, ranks)
    plans, routing_s, plans_s = build_plans(case, ranks)
    start = time.perf_counter()
    timeline = simulate(plans, topology)
    simulated = time.perf_counter()
    metrics = timeline.metrics()
    done = time.perf_counter()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return Row(
        ranks=ranks,
        servers=topology.network[-1].ranks,
        routing_s=routing_s,
        plans_s=plans_s,
        simulate_s=simulated - start,
        metrics_s=done - simulated,
        tasks=sum(len(p) for p in plans.values()),
        total_s=metrics.total_s,
        peak_rss_mib=rss_kib / 1024,
    )


def measure_isolated(case: Case, ranks: int) -> Row:
    """:func:`measure` in a fresh process, so its peak RSS is this W's alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        row: Row = pool.apply(measure, (case, ranks))
    return row


def profile(case: Case, ranks: int, top: int = 20) -> str:
    """Profile ``simulate`` at ``ranks``; the top functions by own and by cumulative time."""
    topology = resized(case, ranks)
    plans, _, _ = build_plans(case, ranks)
    profiler = cProfile.Profile()
    profiler.enable()
    simulate(plans, topology)
    profiler.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        out.write(f"--- simulate() at W={ranks}, top {top} by {key}\n")
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table, with each W's target and the time per rank."""
    head = (
        f"{'W':>6} {'servers':>7} {'tasks':>7} {'routing s':>9} {'plans s':>8} "
        f"{'simulate s':>10} {'us/rank':>7} {'metrics s':>9} {'sim total':>10} "
        f"{'RSS MiB':>8}  target"
    )
    lines = [head]
    for r in rows:
        target = TARGETS_S.get(r.ranks)
        verdict = (
            ""
            if target is None
            else f"<= {target:g} s " + ("ok" if r.simulate_s <= target else "MISSED")
        )
        lines.append(
            f"{r.ranks:>6} {r.servers:>7} {r.tasks:>7} {r.routing_s:>9.3f} {r.plans_s:>8.3f} "
            f"{r.simulate_s:>10.3f} {1e6 * r.simulate_s / r.ranks:>7.0f} {r.metrics_s:>9.3f} "
            f"{1e3 * r.total_s:>7.3f} ms {r.peak_rss_mib:>8.0f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the world sizes and print the table.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, or 1 when ``simulate`` misses a target (or a W cannot be simulated).
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=list(DEFAULT_RANKS),
        help="world sizes, multiples of 16 (default: %(default)s)",
    )
    parser.add_argument("--topology", default="atlas_a3_superpod_384", help="builtin topology")
    parser.add_argument("--experts", type=int, default=8, help="local experts per rank")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    parser.add_argument("--h1", type=int, default=7168, help="expert hidden size")
    parser.add_argument("--n1", type=int, default=4096, help="expert output size")
    parser.add_argument("--skew", type=float, default=1.2, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=0, help="routing seed")
    parser.add_argument(
        "--in-process", action="store_true", help="run every W in this process (RSS cumulative)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile simulate() at the largest W"
    )
    args = parser.parse_args(argv)
    case = Case(
        topology=args.topology,
        experts=args.experts,
        tokens=args.tokens,
        top_k=args.top_k,
        h1=args.h1,
        n1=args.n1,
        skew=args.skew,
        seed=args.seed,
    )
    print(
        f"# GroupedMatMulAlltoAllv, hardware tiling; {case.topology} resized; "
        f"{case.experts} experts/rank, BS={case.tokens}, top-{case.top_k}, "
        f"H1={case.h1}, N1={case.n1}, bf16; zipf skew {case.skew:g}, seed {case.seed}",
        flush=True,
    )
    rows: list[Row] = []
    failed = False
    for ranks in sorted(set(args.ranks)):
        try:
            resized(case, ranks)  # refuse a W the topology cannot take before timing anything
        except ParamInvalidError as err:
            print(f"W={ranks}: {err}", file=sys.stderr)
            failed = True
            continue
        row = measure(case, ranks) if args.in_process else measure_isolated(case, ranks)
        rows.append(row)
        print(f"#   W={ranks}: {asdict(row)}", flush=True)
    print(table(rows))
    missed = [r.ranks for r in rows if r.simulate_s > TARGETS_S.get(r.ranks, float("inf"))]
    if missed:
        print(f"# simulate() missed its target at W = {missed}")
    if args.profile and rows:
        print(profile(case, max(r.ranks for r in rows)))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
