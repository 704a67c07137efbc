"""The executor on a CUDA GPU, ranks sharing it through MPI staging (pinned host memory).

Run on a GPU host at 1, 2 and 4 ranks::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        mpiexec -n 4 python -m pytest -m gpu --with-mpi tests/mpi/test_gpu_overlap.py

Marked ``gpu`` and skipped where there is no CUDA device (CI has none);
``MC2SIM_GPU_TEST_DEVICE=cpu`` dry-runs the tests' own logic through the CPU executor.

* Every fused op, in every quantisation mode, under serial, hardware and tiled plans, on the
  GPU against its float64 golden (the spec's real case, as ``mc2sim run --device cuda``
  builds it).
* A plan whose compute and comm tasks are independent: the device-timed intervals of the
  compute stream and of the comm stream overlap on every rank, and the collectives' results
  are right.
* A run's timeline span agrees with the wall time of the call within 5%.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from mc2sim.comm import Communicator, MpiCommunicator, Work, init
from mc2sim.compare import check_all
from mc2sim.scenario import builtin
from mc2sim.schedule import Plan, Task, TaskKind
from mc2sim.schedule.executor import execute
from mc2sim.study.measure import real_case
from mc2sim.timeline import Clock, Stream, Timeline, gather, record

DEVICE = torch.device(os.environ.get("MC2SIM_GPU_TEST_DEVICE", "cuda"))
"""The GPU; ``MC2SIM_GPU_TEST_DEVICE=cpu`` dry-runs the tests' own logic on the CPU."""

ON_DEVICE = DEVICE.type != "cpu"

pytestmark = [
    pytest.mark.mpi(min_size=1),
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
]


@pytest.fixture(scope="module")
def comm() -> MpiCommunicator:
    """MPI over every rank; device tensors are staged through pinned host memory."""
    mpi = init("mpi")
    assert isinstance(mpi, MpiCommunicator)
    if ON_DEVICE:
        torch.cuda.set_device(0)  # every rank of this host shares the one GPU
    return mpi


# -- every fused op against its golden ----------------------------------------------------------

CASES = {
    "mm_all_reduce": ("llama70b_tp8_prefill", []),
    "mm_all_reduce weight_int8": (
        "seed_weight_quant_mm_allreduce",
        ["shape.m=64", "dtype=float16"],
    ),
    "mm_all_reduce weight_int4": (
        "seed_weight_quant_mm_allreduce",
        ["shape.m=64", "shape.k=256", "shape.n=128", "quant=weight_int4"],
    ),
    "mm_all_reduce w8a8": ("llama70b_tp8_w8a8", []),
    "gmm_alltoallv": ("seed_gmm_alltoallv_ep4", ["routing.kind=zipf", "routing.skew=1.2"]),
    "alltoallv_gmm": ("deepseek_v3_dispatch_ep64", ["shape.top_k=2"]),
    "all_gather_matmul": ("llama70b_tp8_allgather", []),
    "matmul_reduce_scatter": ("llama70b_tp8_reducescatter", []),
    "ifa": ("llama70b_tp8_ifa_decode", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_fused_op_on_the_device_matches_its_golden(comm: MpiCommunicator, case: str) -> None:
    name, overrides = CASES[case]
    scenario = builtin(name, ["scale=small", "tilings=serial,hardware,2,4", *overrides])
    real = real_case(scenario, comm, DEVICE)
    for tiling in scenario.tilings:
        with record() as rec:
            out = real.run(tiling)
        assert out.device.type == DEVICE.type, f"{case} {tiling}: output on {out.device}"
        verdicts = check_all(comm, out, real.expected, scenario.standard, k=real.k)
        assert all(v.passed for v in verdicts), [v.summary() for v in verdicts if not v.passed]
        mine = rec.timeline.records
        assert mine, f"{case} {tiling}: nothing recorded"
        for r in mine:  # every task timed by the device (comm by MPI staging), never the host
            expected = {
                Stream.COMPUTE: Clock.DEVICE if ON_DEVICE else Clock.HOST,
                Stream.COMM: Clock.STAGED if ON_DEVICE else Clock.HOST,
            }[r.stream]
            assert r.clock is expected, (case, tiling, r.name, r.clock)


# -- a plan of independent compute and comm ---------------------------------------------------


class _Independent:
    """Matmul tiles and allreduces of other data: nothing ties one stream to the other."""

    def __init__(self, comm: Communicator, size: int, rows: int, tiles: int) -> None:
        gen = torch.Generator().manual_seed(comm.rank)
        self.a = torch.randn(size, size, generator=gen).to(DEVICE)
        self.b = torch.randn(size, size, generator=gen).to(DEVICE)
        self.comm = comm
        # chunk i of rank r holds r + 1 + i: the sum over ranks is known in closed form
        self.chunks = [
            torch.full((rows, size), float(comm.rank + 1 + i), device=DEVICE) for i in range(tiles)
        ]
        self.products: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}

    def compute(self, task: Task) -> None:
        self.products[task.id] = self.a @ self.b

    def start(self, task: Task) -> Work:
        return self.comm.iallreduce(self.chunks[task.part])

    def land(self, task: Task, result: torch.Tensor) -> None:
        self.sums[task.part] = result


def _independent_plan(rank: int, world: int, tiles: int, *, dependent: bool) -> Plan:
    """``tiles`` matmuls, then ``tiles`` allreduces; ``dependent``: allreduce i after matmul i."""
    tasks = [Task(id=i, name=f"matmul[{i}]", kind=TaskKind.MATMUL) for i in range(tiles)]
    tasks += [
        Task(
            id=tiles + i,
            name=f"allreduce[{i}]",
            kind=TaskKind.ALLREDUCE,
            part=i,
            deps=(i,) if dependent else (),
        )
        for i in range(tiles)
    ]
    return Plan(
        op="independent", tiling=f"tiles={tiles}", rank=rank, world_size=world, tasks=tuple(tasks)
    )


def _timed(comm: MpiCommunicator, fn: Callable[[], object]) -> tuple[float, Timeline]:
    """This rank's wall time of the call (from a barrier, the device idle); every timeline."""
    if ON_DEVICE:
        torch.cuda.synchronize()
    comm.barrier()
    with record() as rec:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall, gather(comm, rec.timeline)


def test_independent_compute_and_comm_overlap_on_the_device(comm: MpiCommunicator) -> None:
    tiles, size, rows = 6, 2048 if ON_DEVICE else 256, 256
    runner = _Independent(comm, size, rows, tiles)
    plan = _independent_plan(comm.rank, comm.size, tiles, dependent=False)
    execute(plan, comm, runner, device=DEVICE)  # warm-up: cuBLAS, pinned pools
    _, everyone = _timed(comm, lambda: execute(plan, comm, runner, device=DEVICE))
    world = comm.size
    for i in range(tiles):  # sum over ranks r of (r + 1 + i)
        want = world * (world + 1) / 2 + world * i
        assert runner.sums[i].device.type == DEVICE.type
        assert torch.equal(runner.sums[i].cpu(), torch.full((rows, size), want))
    expected = (a := runner.a.double().cpu()) @ runner.b.double().cpu()
    got = runner.products[tiles - 1].double().cpu()
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * a.abs().max().item() * size**0.5)
    for rank in range(world):
        mine = everyone.for_rank(rank).records
        compute = [(r.start_s, r.end_s) for r in mine if r.stream is Stream.COMPUTE]
        comms = [(r.start_s, r.end_s) for r in mine if r.stream is Stream.COMM]
        assert len(compute) == len(comms) == tiles
        shared = sum(
            max(0.0, min(c_end, m_end) - max(c_start, m_start))
            for c_start, c_end in compute
            for m_start, m_end in comms
        )
        if ON_DEVICE:  # the two streams run at once: their intervals intersect
            assert shared > 0.0, f"rank {rank}: compute {compute} never meets comm {comms}"
        for r in mine:  # the host issued each task before (or as) the device ran it
            host_start, host_end = r.host_span_s
            assert host_start <= r.start_s + 1e-3 and host_start <= host_end


def test_timeline_span_agrees_with_wall_time(comm: MpiCommunicator) -> None:
    tiles, size, rows = 16, 4096 if ON_DEVICE else 512, 128
    runner = _Independent(comm, size, rows, tiles)
    plan = _independent_plan(comm.rank, comm.size, tiles, dependent=True)
    execute(plan, comm, runner, device=DEVICE)  # warm-up
    wall, everyone = _timed(comm, lambda: execute(plan, comm, runner, device=DEVICE))
    span = everyone.for_rank(comm.rank).metrics().total_s
    assert wall > 0.02, f"the call took {wall * 1e3:.1f} ms: too short to judge 5%"
    assert abs(span - wall) <= 0.05 * wall, f"span {span * 1e3:.2f} ms, wall {wall * 1e3:.2f} ms"
