"""The cost model against runs across network namespaces, their link capped by tc: 2 x 2 ranks.

Run as root: ``python scripts/bench_multinode.py`` (``--help`` for the options). It builds a
cluster of 2 namespaces of 2 ranks (:mod:`mc2sim.cluster`) and runs one job on it that

1. calibrates the topology once, on the unlimited links (:func:`mc2sim.study.calibrate`:
   shared memory within a namespace, TCP across, both levels fitted), and
2. between the calibration's rounds, runs every case at every link cap (4 and 1 Gbit/s,
   the order rotating from round to round; rank 0 asks this process for each change through
   a pair of FIFOs, the ranks wait at a barrier), while the calibration rounds themselves
   time the cases on the unlimited links (``alongside``): a slow spell of the shared machine
   lands on the fit and on every cap alike.

The cases: AlltoAllv of 8 and 32 MiB and AllReduce of 8 and 16 MiB per rank (bfloat16, each
a one-task plan run by the executor), GroupedMatMulAlltoAllv of 1024 and 4096 tokens per
rank (8 and 32 MiB sent per rank), serial and hardware-tiled. The smaller sizes lie within
the calibration's (its largest collectives are about 8 to 13 MB), the larger beyond.

Then it predicts every case at every cap by simulating its plans on the calibrated topology
with a wire under the inter-node dimension (``NetworkDim.link_gbps``): the token bucket's
rate in TCP payload (:func:`mc2sim.cluster.tcp_payload_rate`) shared by the node's ranks,
and prints, per case and cap, the measured span (slowest rank; the lower quartile of the
rounds, as the calibration takes its figures), the prediction and
the error. ``--report`` prints the table of a finished run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

RATES: tuple[float | None, ...] = (None, 4e9, 1e9)
"""Link caps in bits per second (None: no cap)."""

COLLECTIVES = (
    ("alltoallv", 8 << 20),
    ("allreduce", 8 << 20),
    ("alltoallv", 32 << 20),
    ("allreduce", 16 << 20),
)
"""(kind, bytes per rank) of the collective cases."""
COLUMNS = 1024  # bfloat16 elements per row of the collectives' buffers
NODES, PER_NODE = 2, 2
GMM_TOKENS = (1024, 4096)
"""Tokens per rank of the GroupedMatMulAlltoAllv cases (8 and 32 MiB sent per rank)."""
GMM_SETS = ("shape.h1=32", "routing.seed=11", "tilings=serial,hardware")
"""The rest of their shape: calibration's cal_combine_1024 with other sizes and routing."""


def rate_label(rate: float | None) -> str:
    return "none" if rate is None else f"{rate / 1e9:g} Gbit/s"


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Bench:
    """A case: its name and every rank's plan (the same on the driver and the ranks)."""

    name: str
    plans: tuple[object, ...]


def collective_plans(kind: str, nbytes: int, world: int) -> tuple[object, ...]:
    """One-task plans of a bfloat16 AlltoAllv (even splits) or AllReduce, index = rank."""
    from mc2sim.schedule import Plan, Task, TaskKind

    row_bytes = COLUMNS * 2
    plans = []
    for rank in range(world):
        if kind == "alltoallv":
            rows = nbytes // (world * row_bytes)
            splits = (rows,) * world
            task = Task(
                id=0, name="alltoallv", kind=TaskKind.ALLTOALLV,
                bytes=rows * (world - 1) * row_bytes,
                send_splits=splits, recv_splits=splits, row_bytes=row_bytes,
            )  # fmt: skip
        else:
            task = Task(id=0, name="allreduce", kind=TaskKind.ALLREDUCE, bytes=nbytes)
        plans.append(
            Plan(
                op=kind,
                tiling="serial",
                rank=rank,
                world_size=world,
                tasks=(task,),
                dtype="bfloat16",
            )  # fmt: skip
        )
    return tuple(plans)


def gmm_scenario(tokens: int) -> object:
    from mc2sim.scenario import load
    from mc2sim.study.calibrate import calibration_dir

    return load(calibration_dir() / "cal_combine_1024.yaml", (f"shape.tokens={tokens}", *GMM_SETS))


def benches(world: int) -> list[Bench]:
    """Every case's plans, built from shapes alone."""
    from mc2sim.study.simulate import plans_for

    out = [
        Bench(f"{kind} {nbytes >> 20} MiB", collective_plans(kind, nbytes, world))
        for kind, nbytes in COLLECTIVES
    ]
    for tokens in GMM_TOKENS:
        scenario = gmm_scenario(tokens)
        for tiling in scenario.tilings:  # type: ignore[attr-defined]
            plans = plans_for(scenario, world, tiling)  # type: ignore[arg-type]
            name = f"gmm_alltoallv {tokens} {plans[0].tiling}"
            out.append(Bench(name, tuple(plans[r] for r in range(world))))
    return out


# ----------------------------------------------------------------------------- the ranks


def work(args: argparse.Namespace) -> int:
    """On every rank: calibrate, and between its rounds run the cases at every link cap."""
    import random

    import torch

    from mc2sim.comm import init
    from mc2sim.runtime import steady_allocator
    from mc2sim.schedule.executor import execute
    from mc2sim.schedule.plan import Plan, Task, TaskKind
    from mc2sim.study.calibrate import calibrate
    from mc2sim.study.measure import cases_of
    from mc2sim.timeline import gather, record
    from mc2sim.topology import dump

    steady_allocator()  # as every mc2sim command does: repeated calls reuse their memory
    comm = init("mpi")
    gen = torch.Generator().manual_seed(comm.rank)

    class Collective:
        """The TileRunner of a one-task collective plan."""

        def __init__(self, plan: Plan) -> None:
            task = plan.tasks[0]
            rows = sum(task.send_splits) if task.kind is TaskKind.ALLTOALLV else task.bytes // 2
            cols = COLUMNS if task.kind is TaskKind.ALLTOALLV else 1
            self.x = torch.randn(rows, cols, generator=gen).to(torch.bfloat16).squeeze(1)

        def compute(self, task: Task) -> None:
            raise RuntimeError("a collective plan has no compute task")

        def start(self, task: Task) -> object:
            if task.kind is TaskKind.ALLTOALLV:
                return comm.ialltoallv(self.x, task.send_splits, task.recv_splits)
            return comm.iallreduce(self.x)

        def land(self, task: Task, result: torch.Tensor) -> None:
            pass

    runs: list[Callable[[], object]] = []
    names = []
    for bench in benches(comm.size)[: len(COLLECTIVES)]:
        plan = bench.plans[comm.rank]
        runner = Collective(plan)  # type: ignore[arg-type]
        runs.append(lambda plan=plan, runner=runner: execute(plan, comm, runner))  # type: ignore[misc]
        names.append(bench.name)
    for tokens in GMM_TOKENS:
        for case in cases_of(gmm_scenario(tokens), comm):  # type: ignore[arg-type]
            runs.append(case.run)
            names.append(f"gmm_alltoallv {tokens} {case.tiling}")
    capped = [float(r) for r in args.rates.split(",")]
    spans: dict[str, dict[str, list[float]]] = {n: {rate_label(None): []} for n in names}
    for name in names:
        spans[name].update({rate_label(r): [] for r in capped})
    ask = answer = None
    if comm.rank == 0:
        ask = open(Path(args.fifo) / "ask", "w")  # noqa: SIM115 - held for the whole run
        answer = open(Path(args.fifo) / "answer")  # noqa: SIM115

    def cap(rate: float | None) -> None:
        if ask is not None and answer is not None:
            ask.write("none\n" if rate is None else f"{rate}\n")
            ask.flush()
            answer.readline()
        comm.barrier()

    shuffle = random.Random(0)  # the same order on every rank

    def between(rnd: int, rounds: int, label: str) -> None:
        """After each calibration round but the warm-up: every case at every cap, once."""
        if rnd == 0:
            return
        for rate in capped[rnd % len(capped) :] + capped[: rnd % len(capped)]:
            cap(rate)
            order = list(range(len(runs)))
            shuffle.shuffle(order)
            for i in order:
                with record() as rec:
                    runs[i]()
                span = gather(comm, rec.timeline).metrics().total_s
                spans[names[i]][rate_label(rate)].append(span)
        cap(None)
        if comm.rank == 0:
            print(f"round {rnd}/{rounds - 1}", flush=True)

    fit = calibrate(comm, reps=args.reps, name="cluster_2x2", alongside=runs, progress=between)
    for name, mine in zip(names, fit.alongside, strict=True):
        spans[name][rate_label(None)] = [t.metrics().total_s for t in mine]
    if ask is not None and answer is not None:
        ask.close()
        answer.close()
        dump(fit.topology, Path(args.out) / "cluster_2x2.yaml")
        (Path(args.out) / "measured.json").write_text(json.dumps(spans, indent=1))
    return 0


# ----------------------------------------------------------------------------- the driver


def serve(cluster: object, fifo: Path) -> None:
    """Apply the rates rank 0 asks for, one line each, until it closes the FIFO."""
    with open(fifo / "ask") as ask, open(fifo / "answer", "w") as answer:
        for line in ask:
            text = line.strip()
            cluster.limit(None if text == "none" else float(text))  # type: ignore[attr-defined]
            answer.write("ok\n")
            answer.flush()


def limited(topology: object, rate: float | None) -> object:
    """The topology with a wire of ``rate`` bit/s under its inter-node dimension.

    The wire carries ``tcp_payload_rate(rate)`` bytes of payload a second for all the
    node's ranks: each gets its share (``NetworkDim.link_gbps``).
    """
    from mc2sim.cluster import tcp_payload_rate

    if rate is None:
        return topology
    inner, outer = topology.network  # type: ignore[attr-defined]
    per_rank = tcp_payload_rate(rate) / topology.ranks_per_node / 1e9  # type: ignore[attr-defined]
    return replace(topology, network=(inner, replace(outer, link_gbps=per_rank)))  # type: ignore[type-var]


def report(
    topology_path: Path, measured: dict[str, dict[str, list[float]]], rates: Sequence[float | None]
) -> list[str]:
    from mc2sim.model import simulate
    from mc2sim.model.accuracy import typical
    from mc2sim.topology import load

    topology = load(topology_path)
    lines = [
        f"# bench_multinode: {NODES} x {PER_NODE} ranks over network namespaces, "
        f"topology {topology_path.name} (calibrated unlimited, in the same rounds)",
        f"# {'case':<34} {'link cap':>12} {'measured':>10} {'predicted':>10} {'error':>8}",
    ]
    for bench in benches(NODES * PER_NODE):
        for rate in rates:
            spans = measured[bench.name][rate_label(rate)]
            real = typical(spans)  # the lower quartile, as calibrate takes its figures
            plans = dict(enumerate(bench.plans))
            sim = simulate(plans, limited(topology, rate)).metrics().total_s  # type: ignore[arg-type]
            lines.append(
                f"  {bench.name:<34} {rate_label(rate):>12} {real * 1e3:>8.1f}ms "
                f"{sim * 1e3:>8.1f}ms {100 * (sim / real - 1):>+7.1f}%"
            )
    return lines


def drive(args: argparse.Namespace) -> int:
    from mc2sim.cluster import Cluster, unavailable

    out = Path(args.out)
    rates = [None, *(float(r) for r in args.rates.split(","))]
    if args.report:
        measured = json.loads((out / "measured.json").read_text())
        print("\n".join(report(out / "cluster_2x2.yaml", measured, rates)))
        return 0
    reason = unavailable()
    if reason is not None:
        print(f"bench_multinode: skipped: {reason}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(nodes=NODES, ranks_per_node=PER_NODE) as cluster:
        env = {**os.environ, **cluster.env(), "OMP_NUM_THREADS": "1"}
        with tempfile.TemporaryDirectory(prefix="mc2sim-bench-") as fifo:
            os.mkfifo(Path(fifo) / "ask")
            os.mkfifo(Path(fifo) / "answer")
            server = threading.Thread(target=serve, args=(cluster, Path(fifo)), daemon=True)
            server.start()
            argv = [sys.executable, __file__, "--worker", "--fifo", fifo, "--out", str(out),
                    "--rates", args.rates, "--reps", str(args.reps)]  # fmt: skip
            subprocess.run(cluster.mpiexec(argv), env=env, check=True)
            server.join(timeout=10)
    lines = report(out / "cluster_2x2.yaml", json.loads((out / "measured.json").read_text()), rates)
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench-multinode", help="folder of the results")
    parser.add_argument("--reps", type=int, default=15, help="calibration rounds")
    parser.add_argument(
        "--rates", default=",".join(f"{r:g}" for r in RATES if r is not None),
        help="link caps in bit/s, measured between the calibration rounds",
    )  # fmt: skip
    parser.add_argument(
        "--report", action="store_true", help="only print the report of the results in --out"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fifo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return work(args) if args.worker else drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
