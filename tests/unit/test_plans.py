"""Plan invariants: acyclic, data dependencies present, tiles cover the problem exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mc2sim.cli import main
from mc2sim.errors import ParamInvalidError
from mc2sim.routing import RoutingConfig, RoutingKind, route
from mc2sim.schedule import (
    Plan,
    Resource,
    Task,
    TaskKind,
    Tiling,
    TilingMode,
    hardware_mm_all_reduce_tiles,
    plan_all_gather_matmul,
    plan_alltoallv_gmm,
    plan_gmm_alltoallv,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
    tiling_of,
)
from mc2sim.schedule.builders import IfaShape, MatmulShape, MoeShape, plan_ifa
from mc2sim.schedule.tiling import A2_TIME_MODEL, MAX_TILES, even_split

SHAPE = MatmulShape(k=64, n=32, in_bytes=2, w_bytes=2, out_bytes=2)
TILINGS = [tiling_of(t) for t in (None, "serial", 1, 3, 16)]


def assert_rows_cover(tasks: list[Task], total: int) -> None:
    covered = sorted(t.rows for t in tasks if t.rows is not None)
    position = 0
    for start, stop in covered:
        assert start == position and stop > start
        position = stop
    assert position == total


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: t.describe())
def test_mm_all_reduce_plan(tiling: Tiling) -> None:
    plan = plan_mm_all_reduce(
        m=40, shape=SHAPE, kind=TaskKind.MATMUL, tiling=tiling, rank=0, world_size=4
    )
    compute, comm = plan.of(Resource.COMPUTE), plan.of(Resource.COMM)
    assert len(compute) == len(comm) <= MAX_TILES
    assert_rows_cover(compute, 40)
    assert_rows_cover(comm, 40)
    for c in comm:  # every AllReduce depends on the matmul of its own rows
        (dep,) = c.deps
        assert plan.tasks[dep].rows == c.rows and plan.tasks[dep].resource is Resource.COMPUTE
    assert plan.flops == 2 * 40 * 64 * 32
    assert plan.comm_bytes == 40 * 32 * 2
    if tiling.mode is TilingMode.SERIAL:
        assert len(compute) == 1


def test_more_tiles_never_change_flops_or_bytes() -> None:
    plans = [
        plan_mm_all_reduce(
            m=40,
            shape=SHAPE,
            kind=TaskKind.MATMUL,
            tiling=Tiling(mode=TilingMode.TILES, count=c),
            rank=0,
            world_size=2,
        )
        for c in range(1, 17)
    ]
    assert len({p.flops for p in plans}) == 1
    assert len({p.comm_bytes for p in plans}) == 1


def moe_shape(rank: int, direction: str, world: int = 4, e: int = 3) -> MoeShape:
    table = route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=3, skew=1.5),
        world_size=world,
        experts_per_rank=e,
        tokens_per_rank=10,
        top_k=2,
    )
    return MoeShape(
        e=e,
        send=tuple(table.send_counts(rank, direction)),
        recv=tuple(table.recv_counts(rank, direction)),
        h1=16,
        n1=8,
        elem_bytes=2,
        shared=(10, 8, 4),
    )


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: t.describe())
@pytest.mark.parametrize("rank", [0, 3])
def test_gmm_alltoallv_plan(tiling: Tiling, rank: int) -> None:
    shape = moe_shape(rank, "combine")
    assert isinstance(shape.send, tuple) and isinstance(shape.recv, tuple)  # dense counts
    plan = plan_gmm_alltoallv(shape=shape, tiling=tiling, rank=rank)
    comm = plan.of(Resource.COMM)
    for c in comm:  # compute first: each AlltoAllv sends the GMM output it depends on
        (dep,) = c.deps
        producer = plan.tasks[dep]
        if tiling.mode is TilingMode.SERIAL:  # through the unpermute: read + write of each row
            assert producer.kind is TaskKind.PACK and producer.flops == 0
            assert producer.bytes == 2 * sum(c.send_splits) * 8 * 2
            (dep,) = producer.deps
            producer = plan.tasks[dep]
        assert producer.kind is TaskKind.GROUPED_MATMUL and producer.expert == c.expert
        assert producer.flops == 2 * sum(c.send_splits) * 16 * 8
    sent: Counter[tuple[int, int | None]] = Counter()
    received: Counter[tuple[int, int | None]] = Counter()
    for c in comm:  # chunks cover every (peer, expert) count exactly once
        for q, rows in enumerate(c.send_splits):
            sent[(q, c.expert)] += rows
        for r, rows in enumerate(c.recv_splits):
            received[(r, c.expert)] += rows
    if tiling.mode is TilingMode.SERIAL:
        assert len(comm) == 1
        assert list(comm[0].send_splits) == [sum(shape.send[q * 3 : q * 3 + 3]) for q in range(4)]
    else:
        assert all(sent[(q, j)] == shape.send[q * 3 + j] for q in range(4) for j in range(3))
        assert all(received[(r, j)] == shape.recv[r * 3 + j] for r in range(4) for j in range(3))
    assert plan.tasks[-1].name == "matmul[shared]"
    assert plan.flops == 2 * sum(shape.send) * 16 * 8 + 2 * 10 * 8 * 4


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: t.describe())
def test_alltoallv_gmm_plan(tiling: Tiling) -> None:
    shape = moe_shape(1, "dispatch")
    assert isinstance(shape.send, tuple) and isinstance(shape.recv, tuple)  # dense counts
    plan = plan_alltoallv_gmm(shape=shape, tiling=tiling, rank=1)
    comm = plan.of(Resource.COMM)
    gmms = [t for t in plan.tasks if t.kind is TaskKind.GROUPED_MATMUL]
    assert max(c.id for c in comm) < min(g.id for g in gmms), "every AlltoAllv is issued first"
    packs = [t for t in plan.tasks if t.kind is TaskKind.PACK]
    for g in gmms:  # comm first: each GMM depends on the AlltoAllv that delivered its rows
        (dep,) = g.deps
        if tiling.mode is TilingMode.SERIAL:  # through the permute to expert-major
            assert packs == [plan.tasks[dep]] and plan.tasks[dep].deps == (comm[0].id,)
            assert packs[0].bytes == 2 * sum(comm[0].recv_splits) * 16 * 2
            (dep,) = plan.tasks[dep].deps
        assert plan.tasks[dep].kind is TaskKind.ALLTOALLV and plan.tasks[dep].expert == g.expert
        assert g.flops == 2 * sum(plan.tasks[dep].recv_splits) * 16 * 8
    assert sum(sum(c.recv_splits) for c in comm) == sum(shape.recv)
    assert sum(sum(c.send_splits) for c in comm) == sum(shape.send)
    if tiling.mode is TilingMode.SERIAL:  # the input goes as it is, rank-major
        assert comm[0].deps == ()
        return
    for c in comm:  # each chunk's rows are first copied into one buffer: read + write
        (dep,) = c.deps
        pack = plan.tasks[dep]
        assert pack.kind is TaskKind.PACK and (pack.expert, pack.part) == (c.expert, c.part)
        assert pack.bytes == 2 * sum(c.send_splits) * 16 * 2 and pack.flops == 0
    assert len(packs) == len(comm)


@pytest.mark.parametrize("tiling", TILINGS[:4], ids=lambda t: t.describe())
@pytest.mark.parametrize("world", [1, 2, 4])
def test_all_gather_matmul_plan(tiling: Tiling, world: int) -> None:
    plan = plan_all_gather_matmul(m=6, shape=SHAPE, tiling=tiling, rank=1 % world, world_size=world)
    matmuls = plan.of(Resource.COMPUTE)
    assert plan.flops == 2 * 6 * world * 64 * 32
    if tiling.mode is TilingMode.SERIAL:
        return
    peers = Counter(t.peer for t in matmuls for _ in range(t.rows[1] - t.rows[0]))  # type: ignore[index]
    assert peers == Counter({p: 6 for p in range(world)}), "each rank's rows multiplied once"
    for t in matmuls:
        if t.peer != 1 % world:
            (dep,) = t.deps
            assert plan.tasks[dep].peer == t.peer and plan.tasks[dep].rows == t.rows
        else:
            assert t.deps == ()


@pytest.mark.parametrize("tiling", TILINGS[:4], ids=lambda t: t.describe())
def test_matmul_reduce_scatter_plan(tiling: Tiling) -> None:
    plan = plan_matmul_reduce_scatter(m=12, shape=SHAPE, tiling=tiling, rank=2, world_size=4)
    assert plan.flops >= 2 * 12 * 64 * 32
    if tiling.mode is TilingMode.SERIAL:
        assert [t.kind for t in plan.tasks] == [TaskKind.MATMUL, TaskKind.REDUCE_SCATTER]
        return
    matmuls = [t for t in plan.tasks if t.kind is TaskKind.MATMUL]
    assert_rows_cover(matmuls, 12)
    for c in plan.of(Resource.COMM):
        (dep,) = c.deps
        assert plan.tasks[dep].kind is TaskKind.MATMUL and plan.tasks[dep].peer == c.peer
        assert c.peer != 2
    reduce = plan.tasks[-1]
    assert reduce.kind is TaskKind.REDUCE and set(reduce.deps) >= {
        c.id for c in plan.of(Resource.COMM)
    }
    with pytest.raises(ParamInvalidError, match="m=13"):
        plan_matmul_reduce_scatter(m=13, shape=SHAPE, tiling=tiling, rank=0, world_size=4)


def test_plans_reject_cycles_and_forward_dependencies() -> None:
    a = Task(id=0, name="a", kind=TaskKind.MATMUL)
    b = Task(id=1, name="b", kind=TaskKind.ALLREDUCE, deps=(1,))
    with pytest.raises(ParamInvalidError, match="acyclic"):
        Plan(op="x", tiling="t", rank=0, world_size=1, tasks=(a, b))
    with pytest.raises(ParamInvalidError, match="ids must be 0..n-1"):
        Plan(op="x", tiling="t", rank=0, world_size=1, tasks=(b,))


def test_tiling_specs() -> None:
    assert tiling_of(None).mode is TilingMode.HARDWARE
    assert tiling_of("hardware").mode is TilingMode.HARDWARE
    assert tiling_of("serial").mode is TilingMode.SERIAL
    assert tiling_of(5) == Tiling(mode=TilingMode.TILES, count=5)
    for bad in (0, 17, "fast", True, 2.5):
        with pytest.raises(ParamInvalidError) as info:
            tiling_of(bad)  # type: ignore[arg-type]
        assert info.value.code == 161002
    assert even_split(10, 4) == [3, 3, 2, 2]
    assert even_split(2, 4) == [1, 1, 0, 0]


def test_hardware_policy_small_m_is_one_tile() -> None:
    # 8 MiB of float16 output at n = 4096 is 1024 rows: the short tile; m < 2048 is not split
    assert hardware_mm_all_reduce_tiles(2047, 4096, 4096, 2) == [2047]


@pytest.mark.parametrize(
    ("m", "k", "n", "short_last"),
    [
        (65536, 4096, 4096, True),  # the matmul outweighs the AllReduce: short tile last
        (65536, 64, 4096, False),  # tiny k: communication-bound, short tile first
    ],
)
def test_hardware_policy_places_the_short_tile(m: int, k: int, n: int, short_last: bool) -> None:
    tiles = hardware_mm_all_reduce_tiles(m, k, n, 2)
    assert sum(tiles) == m and 2 <= len(tiles) <= MAX_TILES
    short = min(tiles)
    assert short == 1024  # 8 MiB / (4096 x 2 bytes), aligned to 16
    assert (tiles[-1] == short) is short_last and (tiles[0] == short) is not short_last
    longs = [t for t in tiles if t != short]
    assert max(longs) - min(longs) <= 1, "the long tiles are equal (up to one row)"
    compute_bound = A2_TIME_MODEL.matmul_s(m, k, n) >= A2_TIME_MODEL.allreduce_s(m * n * 2)
    assert compute_bound is short_last


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: t.describe())
def test_ifa_plan(tiling: Tiling) -> None:
    shape = IfaShape(heads=8, kv_heads=2, head_dim=64, kv_len=300, elem_bytes=2, dtype="float16")
    plan = plan_ifa(batch=10, shape=shape, tiling=tiling, rank=1, world_size=4)
    assert plan.of(Resource.COMM) == []
    compute = plan.of(Resource.COMPUTE)
    assert {t.kind for t in compute} == {TaskKind.ATTENTION}
    assert_rows_cover(compute, 10)
    expected = 1 if tiling.mode is not TilingMode.TILES else min(tiling.count, 10)
    assert len(compute) == expected
    # q.k and p.v: 2 * 2 flops per (batch, head, position, d); bytes: K and V of every
    # position of the KV heads, plus the query and output rows
    assert plan.flops == 2 * 2 * 10 * 8 * 300 * 64
    assert sum(t.bytes for t in compute) == 2 * (2 * 10 * 300 * 2 * 64 + 2 * 10 * 8 * 64)


@pytest.mark.parametrize(
    ("flops", "nbytes", "shown"),
    [(2**62, 0, "4.61169e+18 FLOPs"), (0, 2**64, "1.84467e+19 bytes"), (-1, 0, "-1 FLOPs")],
)
def test_a_plan_refuses_figures_the_simulator_cannot_count(
    flops: int, nbytes: int, shown: str
) -> None:
    task = Task(id=0, name="matmul[0]", kind=TaskKind.MATMUL, flops=flops, bytes=nbytes)
    with pytest.raises(ParamInvalidError, match=r"must be in \[0, 2\*\*62\)") as info:
        Plan(op="mm_all_reduce", tiling="serial", rank=0, world_size=1, tasks=(task,))
    assert info.value.param == "tasks[0] (matmul[0])"
    assert info.value.value == shown
    edge = Task(id=0, name="matmul[0]", kind=TaskKind.MATMUL, flops=2**62 - 1, bytes=2**62 - 1)
    assert Plan(op="mm_all_reduce", tiling="serial", rank=0, world_size=1, tasks=(edge,))


def test_a_shape_whose_flops_overflow_is_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # m, k and n each within the aclnn limits; 2 m k n is past 2**64
    big = ["--set", "shape.m=2147483647", "--set", "shape.k=65535", "--set", "shape.n=65535"]
    argv = ["simulate", "llama70b_tp8_decode", *big, "--no-plots", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "mc2sim simulate: tasks[0] (matmul[0])='1.84462e+19 FLOPs': a task's FLOPs and bytes "
        "must be in [0, 2**62): the shape is too large (mc2sim counts them in 64-bit integers)"
    )
    assert not (tmp_path / "o").exists()


def test_plan_arrays_refuse_figures_the_simulator_cannot_count() -> None:
    import numpy as np

    from mc2sim.schedule.plan import PlanArrays

    task = Task(id=0, name="grouped_matmul[0]", kind=TaskKind.GROUPED_MATMUL)
    template = Plan(op="alltoallv_gmm", tiling="serial", rank=0, world_size=2, tasks=(task,))
    zeros = np.zeros((1, 2))
    for flops, shown in (
        (np.array([[1.0, 2.0**63]]), "9.22337e+18 FLOPs"),
        (np.array([[np.nan, 0]]), "nan FLOPs"),
    ):
        with pytest.raises(ParamInvalidError, match=r"must be in \[0, 2\*\*62\)") as info:
            PlanArrays(
                template=template, world_size=2, flops=flops, bytes=zeros, loads={},
                intra=zeros, inter=zeros,
            )  # fmt: skip
        assert (info.value.param, info.value.value) == ("alltoallv_gmm plan arrays", shown)
