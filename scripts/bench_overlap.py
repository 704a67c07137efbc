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

On an accelerator (``--device cuda``) the executor runs each plan on a compute stream and a
comm stream and times it by device events; the cases take the seed shapes (GMM-AlltoAllv:
BS 4096, K 2, H 7168, e 4, N1 = N2 = 4096 with the shared expert; MatmulAllReduce: x1
(8192, 3584) by (3584, 8192), bfloat16), and the table adds, per op, the compute alone (the
same calls with every plan collective skipped), the comm alone (the serial plan's
collective on ready data), ideal = max of the two, and per tiling fused/ideal. The world
size is the launcher's (``--world-size`` checks it): ranks sharing one GPU go through MPI
staged in pinned host memory (``--backend mpi``); with a GPU per rank ``--backend torch``
uses NCCL, under mpiexec or torchrun::

    mpiexec -n 2 python scripts/bench_overlap.py --device cuda --world-size 2
    torchrun --nproc-per-node 4 scripts/bench_overlap.py --device cuda --backend torch
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from mc2sim import ops
from mc2sim.comm import Communicator, Completed, Work, describe_device, init, rank_device, transport
from mc2sim.routing import RoutingConfig, RoutingKind, route
from mc2sim.runtime import steady_allocator
from mc2sim.schedule import Plan, Task, TaskKind
from mc2sim.schedule.executor import execute
from mc2sim.timeline import Timeline, gather, record

DEVICE = torch.device("cpu")
"""Where the ranks' tensors live (``--device``)."""


def _sync() -> None:
    """Wait for this rank's device work (nothing on the CPU)."""
    if DEVICE.type != "cpu":
        torch.get_device_module(DEVICE).synchronize(DEVICE)


@dataclass
class Case:
    """One op call with its inputs bound.

    ``call(comm, tiling, progress)`` calls it over ``comm``; ``comm_alone(comm)`` runs the
    serial plan's collective on ready data.
    """

    name: str
    shape: str
    call: Callable[[Communicator, str | int, str], object]
    comm_alone: Callable[[Communicator], object]


def mm_all_reduce_case(comm: Communicator, m: int, k: int, n: int) -> Case:
    gen = torch.Generator().manual_seed(comm.rank)
    x1 = (torch.randn(m, k, generator=gen) / k**0.5).to(torch.bfloat16).to(DEVICE)
    x2 = torch.randn(k, n, generator=gen).to(torch.bfloat16).to(DEVICE)
    y = torch.zeros(m, n, dtype=torch.bfloat16, device=DEVICE)
    return Case(
        name="mm_all_reduce",
        shape=f"x1 ({m}, {k}) x2 ({k}, {n}) bf16",
        call=lambda c, tiling, progress: ops.mm_all_reduce(
            x1, x2, c, tiling=tiling, progress=progress
        ),
        comm_alone=lambda c: c.iallreduce(y).wait(),
    )


def gmm_alltoallv_case(
    comm: Communicator, tokens: int, e: int, h1: int, n1: int, shared: bool
) -> Case:
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
    dtype = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16
    x = torch.randn(sum(send), h1, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(e, h1, n1, generator=gen) / h1**0.5).to(dtype).to(DEVICE)
    mm_x = torch.randn(tokens, h1, generator=gen).to(dtype).to(DEVICE) if shared else None
    mm_w = (torch.randn(h1, n1, generator=gen) / h1**0.5).to(dtype).to(DEVICE) if shared else None
    y = torch.zeros(sum(send), n1, dtype=dtype, device=DEVICE)
    per_rank_send = [sum(send[q * e : (q + 1) * e]) for q in range(comm.size)]
    per_rank_recv = [sum(recv[r * e : (r + 1) * e]) for r in range(comm.size)]
    return Case(
        name="gmm_alltoallv",
        shape=(
            f"BS={tokens} K=2 e={e} H1={h1} N1={n1}"
            + (f" shared ({tokens}, {h1}) x ({h1}, {n1})" if shared else "")
            + f" {str(dtype).removeprefix('torch.')}"
        ),
        call=lambda c, tiling, progress: ops.gmm_alltoallv(
            x,
            w,
            c,
            c.size,
            send,
            recv,
            mm_x=mm_x,
            mm_weight=mm_w,
            tiling=tiling,
            progress=progress,
        ),  # fmt: skip
        comm_alone=lambda c: c.ialltoallv(y, per_rank_send, per_rank_recv).wait(),
    )


class ComputeOnly:
    """``comm`` with the plans' non-blocking collectives skipped: the op's compute alone.

    Everything else (agreement, barriers, the recording's gathers) goes to ``comm``.
    """

    def __init__(self, comm: Communicator) -> None:
        self._comm = comm

    def __getattr__(self, name: str) -> object:
        return getattr(self._comm, name)

    def iallreduce(
        self, t: torch.Tensor, op: str = "sum", *, out: torch.Tensor | None = None
    ) -> Work:
        """Skip the AllReduce: this rank's own values stand for the sum."""
        return Completed(t if out is None else out, stream_ordered=True)

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> Work:
        """Skip the AlltoAllv: an uninitialised landing buffer of the received rows."""
        if out is None:
            out = t.new_empty((sum(int(r) for r in recv_splits), *t.shape[1:]))
        return Completed(out, stream_ordered=True)


def _slowest(comm: Communicator, seconds: float) -> float:
    return max(float(s) for s in comm.allgather_object(seconds))


def timed(comm: Communicator, fn: Callable[[], object]) -> tuple[float, Timeline]:
    """Slowest rank's time of one call, and the call's timeline gathered from every rank."""
    _sync()
    comm.barrier()
    with record() as rec:
        start = time.perf_counter()
        fn()
        _sync()  # the executor ends synchronised; a collective alone may not
        elapsed = time.perf_counter() - start
    return _slowest(comm, elapsed), rec.timeline


def alone(comm: Communicator, fn: Callable[[], object], reps: int) -> float:
    """Median over ``reps`` (after a warm-up) of the slowest rank's time of ``fn``."""
    times = [timed(comm, fn)[0] for _ in range(reps + 1)]
    return statistics.median(times[1:])


class _NoWork:
    """A tile runner whose tasks do nothing: what remains is the executor's own cost."""

    def compute(self, task: Task) -> None:
        pass

    def start(self, task: Task) -> Work:
        raise AssertionError("compute-only plan")

    def land(self, task: Task, result: torch.Tensor) -> None:
        pass


def per_record_cost(comm: Communicator, tasks: int = 20000, reps: int = 5) -> float:
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
    comm: Communicator,
    case: Case,
    tilings: list[str | int],
    progress: str,
    reps: int,
) -> dict[str | int, list[tuple[float, Timeline]]]:
    """Time every tiling ``reps`` times (after one warm-up round), alternating the order."""
    results: dict[str | int, list[tuple[float, Timeline]]] = {t: [] for t in tilings}
    for rep in range(reps + 1):
        for tiling in tilings if rep % 2 == 0 else list(reversed(tilings)):
            seconds, mine = timed(comm, functools.partial(case.call, comm, tiling, progress))
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
    ideal: float | None,
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
        f"{plain_serial / total:>9.2f}{tasks:>7}"
        + (f"{100 * tasks * cost / total:>9.3f}" if ideal is None else f"{total / ideal:>12.2f}")
    )


def recording_overhead(comm: Communicator, case: Case, progress: str, reps: int) -> str:
    """The same 4-tile call with and without an active recording, alternating."""
    on: list[float] = []
    off: list[float] = []
    for rep in range(reps):
        pairs = [(True, on), (False, off)] if rep % 2 == 0 else [(False, off), (True, on)]
        for recording, bucket in pairs:
            comm.barrier()
            start = time.perf_counter()
            if recording:
                with record():
                    case.call(comm, 4, progress)
            else:
                case.call(comm, 4, progress)
            bucket.append(_slowest(comm, time.perf_counter() - start))
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
    global DEVICE
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions per tiling (>= 5)")
    parser.add_argument("--tilings", nargs="*", default=["serial", "hardware", "2", "4", "8"])
    parser.add_argument(
        "--progress", nargs="*", default=None, help="default poll thread (CPU), poll (device)"
    )
    parser.add_argument("--label", default="", help="a tag for the table (e.g. async)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--backend", choices=("mpi", "torch"), default="mpi")
    parser.add_argument("--world-size", type=int, default=None, help="check the launched ranks")
    parser.add_argument(
        "--ideal", action="store_true", help="also on the CPU: compute alone, comm alone, ideal"
    )
    parser.add_argument("--cases", nargs="*", default=["mm_all_reduce", "gmm_alltoallv"])
    parser.add_argument(
        "--shapes", choices=("seed", "small"), default=None,
        help="seed shapes (the issue's; default on a device) or small ones (default on the CPU)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steady_allocator()  # as every mc2sim command does: repeated calls reuse their memory
    comm = init(args.backend)
    if args.world_size is not None and args.world_size != comm.size:
        if comm.rank == 0:
            print(f"bench_overlap: --world-size {args.world_size} but {comm.size} ranks launched")
        return 2
    DEVICE = rank_device(args.device, "--device")
    on_device = DEVICE.type != "cpu"
    shapes = args.shapes or ("seed" if on_device else "small")
    progresses = args.progress or (["poll"] if on_device else ["poll", "thread"])
    tilings: list[str | int] = [int(t) if t.isdigit() else t for t in args.tilings]
    builders = {
        "mm_all_reduce": (
            lambda: (
                mm_all_reduce_case(comm, m=8192, k=3584, n=8192)
                if shapes == "seed"
                else mm_all_reduce_case(comm, m=4096, k=48, n=2048)
            )
        ),
        "gmm_alltoallv": (
            lambda: (
                gmm_alltoallv_case(comm, tokens=4096, e=4, h1=7168, n1=4096, shared=True)
                if shapes == "seed"
                else gmm_alltoallv_case(comm, tokens=2048, e=4, h1=16, n1=2048, shared=False)
            )
        ),
    }
    cases = [builders[name]() for name in args.cases]
    rows: list[str] = []
    overheads: list[str] = []
    ideals: list[str] = []
    cost = 0.0 if on_device else per_record_cost(comm)
    for case in cases:
        ideal = None
        if on_device or args.ideal:
            compute_alone = alone(
                comm,
                functools.partial(
                    case.call, cast(Communicator, ComputeOnly(comm)), "serial", "poll"
                ),
                args.reps,
            )
            comm_alone = alone(comm, functools.partial(case.comm_alone, comm), args.reps)
            ideal = max(compute_alone, comm_alone)
            ideals.append(
                f"{case.name}: compute alone {compute_alone * 1e3:.2f} ms, comm alone "
                f"{comm_alone * 1e3:.2f} ms, ideal = max {ideal * 1e3:.2f} ms"
            )
        plain_serial: float | None = None  # the baseline: serial plan, first progress mode
        for progress in progresses:
            results = run_tilings(comm, case, tilings, progress, args.reps)
            serial = results["serial"]
            if plain_serial is None:
                plain_serial = statistics.median(s for s, _ in serial)
            for tiling in tilings:
                rows.append(
                    row(case, progress, tiling, results[tiling], serial, plain_serial, cost, ideal)
                )
            if not on_device:
                overheads.append(recording_overhead(comm, case, progress, args.reps))
    devices = comm.allgather_object(describe_device(DEVICE))
    if comm.rank == 0:
        async_progress = os.environ.get("MPIR_CVAR_ASYNC_PROGRESS", "0")
        label = f" {args.label}" if args.label else ""
        print(
            f"# bench_overlap{label}: {comm.size} ranks on {', '.join(sorted(set(devices)))} "
            f"via {transport(comm, DEVICE)}, median of {args.reps} reps, "
            f"MPIR_CVAR_ASYNC_PROGRESS={async_progress}, torch threads {torch.get_num_threads()}"
        )
        for case in cases:
            print(f"# {case.name}: {case.shape}")
        for line in ideals:
            print(f"# {line}")
        print(
            f"{'op':<14}{'prog':<7}{'tiling':<9}{'plan':<22}{'total ms':>9}{'compute':>10}"
            f"{'pure comm':>10}{'exposed':>10}{'overlap%':>9}{'speedup':>9}{'tasks':>7}"
            + (f"{'fused/ideal':>12}" if ideals else f"{'rec %':>9}")
        )
        print("\n".join(rows))
        print("# speedup: against the serial plan with the first progress mode, the plain baseline")
        if ideals:
            print(
                "# compute, pure comm, exposed: from the device-timed timeline (pure comm: the "
                "serial run's comm busy time); fused/ideal = total / max(compute alone, comm alone)"
            )
        else:
            print(f"# recording one task costs {cost * 1e6:.2f} us; 'rec %' = tasks x that / total")
            print("# recording on vs off, 4 tiles (median of alternating calls):")
            print("\n".join("#   " + o for o in overheads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
