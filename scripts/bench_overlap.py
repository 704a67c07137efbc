"""Serial against tiled execution of the fused ops on real ranks: overlap and speedup.

Run under mpiexec, e.g. ``mpiexec -n 2 python scripts/bench_overlap.py``. For each case
(MatmulAllReduce and GroupedMatMulAlltoAllv at sizes where compute and communication are of
the same order on this machine) and each progress mode, the serial plan and the tiled plans
alternate repetition by repetition. Each call is timed from a barrier to its end on the
slowest rank; its timeline (every task's start and end, all ranks) gives the compute and
communication busy times, the exposed communication and the overlap %, against the serial
run of the same repetition as the pure-communication baseline. The table gives medians.

Recording overhead: the cost recording adds per task (a plan of 20000 no-op tasks executed
with and without a recording) times the tasks of a call, as a fraction of the call's time
("rec %"); and, noisier, the same tiled call with and without a recording, alternating.

MPICH's own progress thread is switched on from the environment, before MPI starts:
``MPIR_CVAR_ASYNC_PROGRESS=1 mpiexec -n 2 python scripts/bench_overlap.py --label async``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from mpi4py import MPI

from mc2sim import ops
from mc2sim.comm import MpiCommunicator, Work
from mc2sim.routing import RoutingConfig, RoutingKind, route
from mc2sim.schedule import Plan, Task, TaskKind
from mc2sim.schedule.executor import execute
from mc2sim.timeline import Timeline, gather, record


@dataclass
class Case:
    """One op call with its inputs bound; ``run(tiling, progress)`` calls it."""

    name: str
    shape: str
    run: Callable[[str | int, str], object]


def mm_all_reduce_case(comm: MpiCommunicator, m: int, k: int, n: int) -> Case:
    gen = torch.Generator().manual_seed(comm.rank)
    x1 = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x2 = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    return Case(
        name="mm_all_reduce",
        shape=f"m={m} k={k} n={n} bf16",
        run=lambda tiling, progress: ops.mm_all_reduce(
            x1, x2, comm, tiling=tiling, progress=progress
        ),
    )


def gmm_alltoallv_case(comm: MpiCommunicator, tokens: int, e: int, h1: int, n1: int) -> Case:
    table = route(
        RoutingConfig(kind=RoutingKind.UNIFORM, seed=1),
        world_size=comm.size,
        experts_per_rank=e,
        tokens_per_rank=tokens,
        top_k=2,
    )
    send = table.send_counts(comm.rank, "combine")
    recv = table.recv_counts(comm.rank, "combine")
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(sum(send), h1, generator=gen).to(torch.bfloat16)
    w = torch.randn(e, h1, n1, generator=gen).to(torch.bfloat16)
    return Case(
        name="gmm_alltoallv",
        shape=f"BS={tokens} K=2 e={e} H1={h1} N1={n1} bf16",
        run=lambda tiling, progress: ops.gmm_alltoallv(
            x, w, comm, comm.size, send, recv, tiling=tiling, progress=progress
        ),
    )


def timed(world: MPI.Intracomm, fn: Callable[[], object]) -> tuple[float, Timeline]:
    """Slowest rank's time of one call, and the call's timeline gathered from every rank."""
    world.Barrier()
    with record() as rec:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
    return float(world.allreduce(elapsed, op=MPI.MAX)), rec.timeline


class _NoWork:
    """A tile runner whose tasks do nothing: what remains is the executor's own cost."""

    def compute(self, task: Task) -> None:
        pass

    def start(self, task: Task) -> Work:
        raise AssertionError("compute-only plan")

    def land(self, task: Task, result: torch.Tensor) -> None:
        pass


def per_record_cost(comm: MpiCommunicator, tasks: int = 20000, reps: int = 5) -> float:
    """Seconds that recording adds per task: a plan of no-op tasks run with and without.

    Median over alternating repetitions of (time recorded - time not recorded) / tasks.
    """
    plan = Plan(
        op="noop",
        tiling="cost",
        rank=comm.rank,
        world_size=comm.size,
        tasks=tuple(Task(id=i, name=f"noop[{i}]", kind=TaskKind.MATMUL) for i in range(tasks)),
    )
    deltas = []
    for _ in range(reps):
        start = time.perf_counter()
        execute(plan, comm, _NoWork())
        plain = time.perf_counter() - start
        with record():
            start = time.perf_counter()
            execute(plan, comm, _NoWork())
            recorded = time.perf_counter() - start
        deltas.append((recorded - plain) / tasks)
    return statistics.median(deltas)


def run_tilings(
    world: MPI.Intracomm,
    comm: MpiCommunicator,
    case: Case,
    tilings: list[str | int],
    progress: str,
    reps: int,
) -> dict[str | int, list[tuple[float, Timeline]]]:
    """Time every tiling ``reps`` times (after one warm-up round), alternating the order."""
    results: dict[str | int, list[tuple[float, Timeline]]] = {t: [] for t in tilings}
    for rep in range(reps + 1):
        for tiling in tilings if rep % 2 == 0 else list(reversed(tilings)):
            seconds, mine = timed(world, functools.partial(case.run, tiling, progress))
            everyone = gather(comm, mine)
            if rep:
                results[tiling].append((seconds, everyone))
    return results


def row(
    case: Case,
    progress: str,
    tiling: str | int,
    runs: list[tuple[float, Timeline]],
    serial: list[tuple[float, Timeline]],
    plain_serial: float,
    cost: float,
) -> str:
    """One table row: medians over repetitions; overlap against the same rep's serial run."""
    metrics = [tl.metrics(baseline=base) for (_, tl), (_, base) in zip(runs, serial, strict=True)]
    total = statistics.median(s for s, _ in runs)
    tasks = len(runs[0][1].for_rank(0).records)

    def median_ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    return (
        f"{case.name:<14}{progress:<7}{tiling!s:<9}{_plan_label(runs[0][1]):<22}"
        f"{total * 1e3:>9.1f}{median_ms([m.compute_s for m in metrics]):>10.1f}"
        f"{median_ms([m.per_rank[0].pure_comm_s for m in metrics]):>10.1f}"
        f"{median_ms([m.exposed_comm_s for m in metrics]):>10.1f}"
        f"{statistics.median(m.overlap_pct for m in metrics):>9.1f}"
        f"{plain_serial / total:>9.2f}{tasks:>7}{100 * tasks * cost / total:>9.3f}"
    )


def recording_overhead(world: MPI.Intracomm, case: Case, progress: str, reps: int) -> str:
    """The same 4-tile call with and without an active recording, alternating."""
    on: list[float] = []
    off: list[float] = []
    for rep in range(reps):
        pairs = [(True, on), (False, off)] if rep % 2 == 0 else [(False, off), (True, on)]
        for recording, bucket in pairs:
            world.Barrier()
            start = time.perf_counter()
            if recording:
                with record():
                    case.run(4, progress)
            else:
                case.run(4, progress)
            bucket.append(world.allreduce(time.perf_counter() - start, op=MPI.MAX))
    with_ms, without_ms = statistics.median(on) * 1e3, statistics.median(off) * 1e3
    return (
        f"{case.name:<14}{progress:<7}with {with_ms:.1f} ms, without {without_ms:.1f} ms: "
        f"{100 * (with_ms / without_ms - 1):+.2f}%"
    )


def _plan_label(timeline: Timeline) -> str:
    """The plan's tiling in words, as its run key names it."""
    return timeline.runs()[0].tiling


def main(argv: Sequence[str] | None = None) -> int:
    """Run every case, print the table on rank 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions per tiling (>= 5)")
    parser.add_argument("--tilings", nargs="*", default=["serial", "hardware", "2", "4", "8"])
    parser.add_argument("--progress", nargs="*", default=["poll", "thread"])
    parser.add_argument("--label", default="", help="a tag for the table (e.g. async)")
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    comm = MpiCommunicator(world)
    tilings: list[str | int] = [int(t) if t.isdigit() else t for t in args.tilings]
    cases = [
        mm_all_reduce_case(comm, m=4096, k=48, n=2048),
        gmm_alltoallv_case(comm, tokens=2048, e=4, h1=16, n1=2048),
    ]
    rows: list[str] = []
    overheads: list[str] = []
    cost = per_record_cost(comm)
    for case in cases:
        plain_serial: float | None = None  # the baseline: serial plan, polled progress
        for progress in args.progress:
            results = run_tilings(world, comm, case, tilings, progress, args.reps)
            serial = results["serial"]
            if plain_serial is None:
                plain_serial = statistics.median(s for s, _ in serial)
            for tiling in tilings:
                rows.append(
                    row(case, progress, tiling, results[tiling], serial, plain_serial, cost)
                )
            overheads.append(recording_overhead(world, case, progress, args.reps))
    if world.Get_rank() == 0:
        async_progress = os.environ.get("MPIR_CVAR_ASYNC_PROGRESS", "0")
        label = f" {args.label}" if args.label else ""
        print(
            f"# bench_overlap{label}: {world.Get_size()} ranks, median of {args.reps} reps, "
            f"MPIR_CVAR_ASYNC_PROGRESS={async_progress}, "
            f"torch threads {torch.get_num_threads()}"
        )
        for case in cases:
            print(f"# {case.name}: {case.shape}")
        print(
            f"{'op':<14}{'prog':<7}{'tiling':<9}{'plan':<22}{'total ms':>9}{'compute':>10}"
            f"{'pure comm':>10}{'exposed':>10}{'overlap%':>9}{'speedup':>9}{'tasks':>7}{'rec %':>9}"
        )
        print("\n".join(rows))
        print("# speedup: against the serial plan with polled progress, the plain baseline")
        print(f"# recording one task costs {cost * 1e6:.2f} us; 'rec %' = tasks x that / total")
        print("# recording on vs off, 4 tiles (median of alternating calls):")
        print("\n".join("#   " + o for o in overheads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
