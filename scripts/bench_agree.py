"""Per-call cost of the cross-rank agreement and of the watchdog's bookkeeping.

Run under mpiexec, e.g. ``mpiexec -n 2 python scripts/bench_agree.py``. Three measurements:

* ``agree``: the agreement's collective as it was (one int64 allreduce, MIN) against as it is
  (three int64 and the digest of a MoE op's eight must-match entries), alternating batch by
  batch in ABBA order; each batch is ``--calls`` calls between barriers, timed on the slowest
  rank. Both the median and the fastest batch are given per call: on a machine whose cores
  other jobs share, a collective's time is mostly waiting for the other rank to be scheduled,
  and the fastest batch is the better estimate of the cost itself.
* ``watch``: the bookkeeping every collective now does (issue, wait, done), in one process.
* ``ops``: whole calls of tiny ops (``--ops-only`` runs only these, with no import of the new
  modules, so the same script times a tree from before the change for comparison).
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections.abc import Callable

import torch
from mpi4py import MPI

from mc2sim import ops
from mc2sim.comm import Communicator, MpiCommunicator


def _batch(world: MPI.Intracomm, fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn`` over a batch of ``calls``, on the slowest rank."""
    world.Barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls
    return float(world.allreduce(elapsed, op=MPI.MAX))


def _abba(
    world: MPI.Intracomm,
    before: Callable[[], object],
    after: Callable[[], object],
    reps: int,
    calls: int,
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``before`` and ``after`` in each batch, batches in ABBA order."""
    _batch(world, before, calls)
    _batch(world, after, calls)
    a: list[float] = []
    b: list[float] = []
    for rep in range(reps):
        pair = [(before, a), (after, b)]
        for fn, out in pair if rep % 2 == 0 else pair[::-1]:
            out.append(_batch(world, fn, calls))
    return a, b


def _us(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e6:.1f} us (fastest {min(times) * 1e6:.1f})"


MOE_ENTRIES: tuple[tuple[str, object], ...] = (
    ("gmm_x.dtype", "bfloat16"),
    ("e", 4),
    ("H1", 7168),
    ("N1", 2048),
    ("shared expert (H2, N2)", (7168, 2048)),
    ("tiling", "hardware"),
    ("validate_counts", True),
)
"""What a MoE op names (the op's name is the eighth entry)."""


def bench_agree(comm: MpiCommunicator, reps: int, calls: int) -> list[str]:
    from mc2sim.comm.agree import MustMatch, agree
    from mc2sim.comm.watchdog import op_call

    def before() -> None:  # what agree() did: the lowest failing rank, nothing else
        mine = torch.tensor([comm.size], dtype=torch.int64)
        int(comm.allreduce(mine, op="min").item())

    def after() -> None:
        with op_call("gmm_alltoallv"):
            same = MustMatch()
        for name, value in MOE_ENTRIES:
            same(name, value, "why every rank must pass the same")
        agree(comm, None, same)

    def fingerprint() -> int:  # the local part alone: entries and digest
        with op_call("gmm_alltoallv"):
            same = MustMatch()
        for name, value in MOE_ENTRIES:
            same(name, value, "why every rank must pass the same")
        return same.digest()

    was, now = _abba(comm.comm, before, after, reps, calls)
    local = min(timeit.repeat(fingerprint, number=calls * 10, repeat=5)) / (calls * 10)
    return [
        f"agree, one call: before {_us(was)}, now {_us(now)}",
        f"  building and hashing the 8 entries alone (one process, fastest of 5): "
        f"{local * 1e6:.1f} us",
    ]


def bench_watch(calls: int) -> list[str]:
    from mc2sim.comm.watchdog import Watch, op_call

    watch = Watch(timeout=300.0)
    n = calls * 100

    def blocking() -> None:
        watch.enter("allreduce")
        watch.done()

    def nonblocking() -> None:
        watch.wait(watch.issue("alltoallv"))
        watch.done()

    with op_call("gmm_alltoallv"):
        one = min(timeit.repeat(blocking, number=n, repeat=5)) / n
        two = min(timeit.repeat(nonblocking, number=n, repeat=5)) / n
    return [
        f"watch, per collective (one process, fastest of 5): blocking {one * 1e6:.2f} us, "
        f"non-blocking {two * 1e6:.2f} us (issue + wait + done)"
    ]


def bench_ops(comm: Communicator, world: MPI.Intracomm, reps: int, calls: int) -> list[str]:
    bf16 = torch.bfloat16
    x1, x2 = torch.ones(2, 16, dtype=bf16), torch.ones(16, 4, dtype=bf16)
    counts = [1] * (comm.size * 2)
    gmm_x, gmm_weight = torch.ones(sum(counts), 8, dtype=bf16), torch.ones(2, 8, 4, dtype=bf16)

    def mm() -> None:
        ops.mm_all_reduce(x1, x2, comm, tiling="serial")

    def gmm() -> None:
        ops.gmm_alltoallv(gmm_x, gmm_weight, comm, comm.size, counts, counts, tiling="serial")

    lines = []
    for name, fn in (("mm_all_reduce m=2 k=16 n=4", mm), ("gmm_alltoallv e=2 H1=8 N1=4", gmm)):
        one, two = _abba(world, fn, fn, reps, calls)
        lines.append(f"{name}, serial: {_us(one + two)} per call")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21, help="batches of each (median)")
    parser.add_argument("--calls", type=int, default=50, help="calls per batch")
    parser.add_argument("--ops-only", action="store_true", help="time whole op calls only")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    comm = MpiCommunicator(world)
    lines = [f"# bench_agree: {comm.size} ranks, median of {args.reps} batches of {args.calls}"]
    if not args.ops_only:
        lines += bench_agree(comm, args.reps, args.calls)
        lines += bench_watch(args.calls)
    lines += bench_ops(comm, world, args.reps, args.calls)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
