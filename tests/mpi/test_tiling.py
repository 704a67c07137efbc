"""Every op under every tiling equals its serial plan and the golden, on real ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mc2sim import golden, ops
from mc2sim.comm import Communicator
from mc2sim.compare import check
from mc2sim.kernels import trans_quant_param
from mc2sim.routing import RoutingConfig, RoutingKind, route
from mc2sim.timeline import Stream, gather, record

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

TILINGS = [None, "serial", 1, 3]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(dtype)


def gen_for(comm: Communicator, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + comm.rank)


def assert_close(
    actual: torch.Tensor, expected: np.ndarray | torch.Tensor, comm: Communicator
) -> None:
    verdict = check(actual, expected, "allclose", rank=comm.rank)
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("tiling", [*TILINGS, 16], ids=str)
def test_mm_all_reduce_float(comm: Communicator, tiling: int | str | None) -> None:
    gen = gen_for(comm, 1)
    x1 = rand(gen, 4, 10, 32, dtype=torch.bfloat16, scale=0.5)  # m = 40 rows
    x2 = rand(gen, 32, 24, dtype=torch.bfloat16, scale=0.5)
    x3 = rand(gen, 4, 10, 24, dtype=torch.bfloat16)
    out = ops.mm_all_reduce(x1, x2, comm, x3=x3, tiling=tiling)
    serial = ops.mm_all_reduce(x1, x2, comm, x3=x3, tiling="serial")
    g = golden.gather_inputs(comm, x1=x1, x2=x2, x3=x3)
    expected = golden.mm_all_reduce(g["x1"], g["x2"], x3=g["x3"], local_dtype=torch.bfloat16)
    assert out.shape == serial.shape == (4, 10, 24)
    assert_close(out, expected, comm)
    assert_close(out, serial.double(), comm)


@pytest.mark.parametrize("tiling", [*TILINGS, 5], ids=str)
def test_mm_all_reduce_quant_is_bit_identical(comm: Communicator, tiling: int | str | None) -> None:
    gen = gen_for(comm, 2)
    x1 = torch.randint(-128, 128, (13, 64), generator=gen, dtype=torch.int8)
    x2 = torch.randint(-128, 128, (64, 16), generator=gen, dtype=torch.int8)
    scale = trans_quant_param(torch.rand(16, generator=gen) * 1e-3 + 1e-4)
    bias = torch.randint(-100, 100, (16,), generator=gen, dtype=torch.int32)
    out = ops.mm_all_reduce(x1, x2, comm, bias=bias, dequant_scale=scale, tiling=tiling)
    serial = ops.mm_all_reduce(x1, x2, comm, bias=bias, dequant_scale=scale, tiling="serial")
    assert torch.equal(out, serial)


def test_mm_all_reduce_progress_thread(comm: Communicator) -> None:
    gen = gen_for(comm, 3)
    x1 = rand(gen, 48, 32, dtype=torch.float16)
    x2 = rand(gen, 32, 16, dtype=torch.float16)
    threaded = ops.mm_all_reduce(x1, x2, comm, tiling=4, progress="thread")
    polled = ops.mm_all_reduce(x1, x2, comm, tiling=4)
    assert torch.equal(threaded, polled)


def moe_inputs(
    comm: Communicator, direction: str, seed: int
) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    e, bs, k, h1, n1, h2, n2 = 2, 6, 2, 16, 12, 8, 6
    table = route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=seed, skew=1.2),
        world_size=comm.size,
        experts_per_rank=e,
        tokens_per_rank=bs,
        top_k=k,
    )
    send = table.send_counts(comm.rank, direction)
    recv = table.recv_counts(comm.rank, direction)
    gen = gen_for(comm, seed)
    x = rand(gen, sum(send), h1, dtype=torch.float16)
    w = rand(gen, e, h1, n1, dtype=torch.float16, scale=0.5)
    mm_x = rand(gen, bs, h2, dtype=torch.float16)
    mm_w = rand(gen, h2, n2, dtype=torch.float16)
    return send, recv, x, w, mm_x, mm_w


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
def test_gmm_alltoallv(comm: Communicator, tiling: int | str | None) -> None:
    send, recv, x, w, mm_x, mm_w = moe_inputs(comm, "combine", 4)
    y, mm_y = ops.gmm_alltoallv(
        x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w, tiling=tiling
    )
    ys, mm_ys = ops.gmm_alltoallv(
        x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w, tiling="serial"
    )
    g = golden.gather_inputs(comm, x=x, w=w, send=send)
    gy, _ = golden.gmm_alltoallv(comm.rank, g["x"], g["w"], g["send"])
    assert y.shape == ys.shape
    assert_close(y, gy, comm)
    assert_close(y, ys.double(), comm)
    assert mm_y is not None and mm_ys is not None and torch.equal(mm_y, mm_ys)


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
def test_alltoallv_gmm(comm: Communicator, tiling: int | str | None) -> None:
    send, recv, x, w, mm_x, mm_w = moe_inputs(comm, "dispatch", 5)
    gy, mm_y, perm = ops.alltoallv_gmm(
        x,
        w,
        comm,
        comm.size,
        send,
        recv,
        mm_x=mm_x,
        mm_weight=mm_w,
        permute_out_flag=True,
        tiling=tiling,
    )
    gys, _, perms = ops.alltoallv_gmm(
        x,
        w,
        comm,
        comm.size,
        send,
        recv,
        mm_x=mm_x,
        mm_weight=mm_w,
        permute_out_flag=True,
        tiling="serial",
    )
    g = golden.gather_inputs(comm, x=x, send=send)
    ey, _, eperm = golden.alltoallv_gmm(comm.rank, g["x"], w, g["send"])
    assert perm is not None and perms is not None
    assert torch.equal(perm, perms), "moving rows is exact under any tiling"
    assert np.array_equal(perm.double().numpy(), eperm)
    assert_close(gy, ey, comm)
    assert_close(gy, gys.double(), comm)
    assert mm_y is not None


@pytest.mark.parametrize("tiling", [None, "serial", 2], ids=str)
def test_all_gather_matmul(comm: Communicator, tiling: int | str | None) -> None:
    gen = gen_for(comm, 6)
    x1 = rand(gen, 5, 256, dtype=torch.bfloat16, scale=0.25)
    x2 = rand(gen, 256, 8, dtype=torch.bfloat16, scale=0.25)
    bias = rand(gen, 8, dtype=torch.bfloat16)
    out, gathered = ops.all_gather_matmul(x1, x2, comm, comm.size, bias, tiling=tiling)
    g = golden.gather_inputs(comm, x1=x1)
    expected, expected_gather = golden.all_gather_matmul(g["x1"], x2, bias)
    assert gathered is not None
    assert np.array_equal(gathered.double().numpy(), expected_gather)
    assert_close(out, expected, comm)


@pytest.mark.parametrize("tiling", [None, "serial", 2], ids=str)
def test_matmul_reduce_scatter(comm: Communicator, tiling: int | str | None) -> None:
    gen = gen_for(comm, 7)
    m = 3 * comm.size
    x1 = rand(gen, m, 256, dtype=torch.float16, scale=0.25)
    x2 = rand(gen, 256, 8, dtype=torch.float16, scale=0.25)
    out = ops.matmul_reduce_scatter(x1, x2, comm, comm.size, tiling=tiling)
    g = golden.gather_inputs(comm, x1=x1, x2=x2)
    expected = golden.matmul_reduce_scatter(comm.rank, g["x1"], g["x2"], local_dtype=torch.float16)
    assert out.shape == (3, 8) and out.dtype == torch.float16
    assert_close(out, expected, comm)


def test_timeline_of_a_tiled_run(comm: Communicator) -> None:
    gen = gen_for(comm, 8)
    x1 = rand(gen, 64, 32, dtype=torch.float16)
    x2 = rand(gen, 32, 16, dtype=torch.float16)
    with record() as rec:
        ops.mm_all_reduce(x1, x2, comm, tiling=4)
    mine = rec.timeline
    assert len(mine.records) == 8  # 4 matmuls, 4 allreduces
    assert {r.rank for r in mine.records} == {comm.rank}
    by_task = {r.task: r for r in mine.records}
    for r in mine.records:
        assert r.end_s >= r.start_s >= 0
        if r.stream == Stream.COMM:
            producer = by_task[r.task - 1]  # each allreduce depends on the matmul before it
            assert r.start_s >= producer.end_s
    compute = sorted(
        (r for r in mine.records if r.stream == Stream.COMPUTE), key=lambda r: r.start_s
    )
    for before, after in zip(compute, compute[1:], strict=False):
        assert after.start_s >= before.end_s, "one compute tile at a time"
    everyone = gather(comm, mine)
    assert sorted({r.rank for r in everyone.records}) == list(range(comm.size))
    metrics = everyone.metrics()
    assert len(metrics.per_rank) == comm.size
    assert metrics.total_s > 0
    # the fields follow from the records: exposed = total - compute; overlap against own comm
    critical = metrics.per_rank[metrics.critical_rank]
    assert metrics.exposed_comm_s == pytest.approx(max(0.0, critical.total_s - critical.compute_s))
    assert critical.pure_comm_s == critical.comm_s > 0
    overlap = 100 * (1 - metrics.exposed_comm_s / critical.comm_s)
    assert metrics.overlap_pct == pytest.approx(min(100.0, max(0.0, overlap)), abs=1e-9)
