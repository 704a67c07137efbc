"""Every fused op's data path, on 2, 3 and 4 thread ranks, under every tiling and routing.

The ranks are threads sharing one ThreadCommunicator group, so these run without mpiexec:
the same plans, runners and executor as a real job, checked against the independent float64
goldens of mc2sim.golden (gathered the same way as in tests/mpi). Shapes are tiny so the
whole file takes seconds; tests/mpi repeats the core cases over the real libraries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

import mc2sim.schedule.executor as executor
from mc2sim import golden, ops
from mc2sim.comm import ThreadCommunicator, run_threads
from mc2sim.compare import check
from mc2sim.errors import ParamInvalidError
from mc2sim.kernels import convert_weight_to_int4pack, trans_quant_param
from mc2sim.routing import RoutingConfig, RoutingKind, RoutingTable, route
from mc2sim.schedule import Resource
from mc2sim.timeline import Timeline, gather, record

WORLDS = [2, 3, 4]
MOE_TILINGS: list[Any] = [None, "serial", 1, 2, 3]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(dtype)


def gen_for(comm: ThreadCommunicator, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + comm.rank)


def close(
    actual: torch.Tensor, expected: np.ndarray, comm: ThreadCommunicator, label: str = ""
) -> str | None:
    """None when ``actual`` passes against the golden, else what is wrong (checked outside)."""
    where = f"rank {comm.rank} {label}"
    if tuple(actual.shape) != expected.shape:
        return f"{where}: shape {tuple(actual.shape)} != {expected.shape}"
    verdict = check(actual, expected, "allclose", rank=comm.rank)
    return None if verdict.passed else f"{where}: {verdict.summary()}"


def on_threads(world: int, body: Callable[[ThreadCommunicator], list[str | None]]) -> None:
    """Run ``body`` on every rank and fail with every problem any rank reported."""
    problems = [p for mine in run_threads(world, body) for p in mine if p is not None]
    assert not problems, "\n".join(problems)


# -- MoE --------------------------------------------------------------------------------------


def sparse_table(world: int, e: int) -> RoutingTable:
    """An empty last expert everywhere and a rank r -> r + 1 pair that sends nothing."""
    m = np.zeros((world, world * e), dtype=np.int64)
    for r in range(world):
        for g in range(world * e):
            if g % e != e - 1:
                m[r, g] = (3 * r + 2 * g) % 5 + 1
        q = (r + 1) % world
        m[r, q * e : (q + 1) * e] = 0
    return RoutingTable.from_matrix(m, e)


def routing_table(kind: str, world: int, e: int, bs: int, k: int, tmp: Path) -> RoutingTable:
    if kind == "sparse":
        return sparse_table(world, e)
    if kind == "matrix":  # an uneven file: rank r sends (r + g) % 4 rows to global expert g
        path = tmp / "routing.json"
        rows = [[(r + g) % 4 for g in range(world * e)] for r in range(world)]
        path.write_text(f'{{"matrix": {rows}}}')
        config = RoutingConfig(kind=RoutingKind.MATRIX, matrix_path=str(path))
        return route(config, world_size=world, experts_per_rank=e, tokens_per_rank=bs, top_k=k)
    config = {
        "balanced": RoutingConfig(kind=RoutingKind.BALANCED),
        "uniform": RoutingConfig(kind=RoutingKind.UNIFORM, seed=4),
        "zipf": RoutingConfig(kind=RoutingKind.ZIPF, seed=4, skew=1.5),
        "hot": RoutingConfig(kind=RoutingKind.HOT, seed=4, hot_fraction=0.5, hot_experts=1),
    }[kind]
    return route(config, world_size=world, experts_per_rank=e, tokens_per_rank=bs, top_k=k)


ROUTINGS = ["balanced", "uniform", "zipf", "hot", "matrix", "sparse"]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("world", WORLDS)
def test_gmm_alltoallv_every_tiling_against_the_golden(
    world: int, routing: str, tmp_path: Path
) -> None:
    e, bs, k, h1, n1, h2, n2 = 2, 5, 2, 8, 6, 4, 3
    table = routing_table(routing, world, e, bs, k, tmp_path)
    trans = routing in ("zipf", "sparse")  # the transposed weight layouts too
    shared = routing in ("uniform", "hot")

    def body(comm: ThreadCommunicator) -> list[str | None]:
        send = table.send_counts(comm.rank, "combine")
        recv = table.recv_counts(comm.rank, "combine")
        gen = gen_for(comm, 1)
        x = rand(gen, sum(send), h1, dtype=torch.float16)
        w = rand(gen, e, *((n1, h1) if trans else (h1, n1)), dtype=torch.float16, scale=0.5)
        mm_x = rand(gen, bs, h2, dtype=torch.float16) if shared else None
        mm_w = rand(gen, h2, n2, dtype=torch.float16) if shared else None
        everyone = golden.gather_inputs(comm, x=x, w=w, send=send)
        gy, gmm = golden.gmm_alltoallv(
            comm.rank, everyone["x"], everyone["w"], everyone["send"],
            trans_gmm_weight=trans, mm_x=mm_x, mm_weight=mm_w,
        )  # fmt: skip
        problems = []
        for tiling in MOE_TILINGS:
            y, mm_y = ops.gmm_alltoallv(
                x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w,
                trans_gmm_weight=trans, tiling=tiling,
            )  # fmt: skip
            problems.append(close(y, gy, comm, f"tiling={tiling}"))
            if shared:
                assert mm_y is not None and gmm is not None
                problems.append(close(mm_y, gmm, comm))
            else:
                problems.append(None if mm_y is None else "mm_y without mm_x")
        return problems

    on_threads(world, body)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("world", WORLDS)
def test_alltoallv_gmm_every_tiling_against_the_golden(
    world: int, routing: str, tmp_path: Path
) -> None:
    e, bs, k, h1, n1, h2, n2 = 2, 5, 2, 8, 6, 4, 3
    table = routing_table(routing, world, e, bs, k, tmp_path)
    trans = routing in ("uniform", "sparse")
    shared = routing in ("zipf", "hot")

    def body(comm: ThreadCommunicator) -> list[str | None]:
        send = table.send_counts(comm.rank, "dispatch")
        recv = table.recv_counts(comm.rank, "dispatch")
        gen = gen_for(comm, 2)
        x = rand(gen, sum(send), h1, dtype=torch.float16)
        w = rand(gen, e, *((n1, h1) if trans else (h1, n1)), dtype=torch.float16, scale=0.5)
        mm_x = rand(gen, bs, h2, dtype=torch.float16) if shared else None
        mm_w = rand(gen, h2, n2, dtype=torch.float16) if shared else None
        everyone = golden.gather_inputs(comm, x=x, send=send)
        gy, gmm, gperm = golden.alltoallv_gmm(
            comm.rank, everyone["x"], w, everyone["send"],
            trans_gmm_weight=trans, mm_x=mm_x, mm_weight=mm_w,
        )  # fmt: skip
        problems = []
        for tiling in MOE_TILINGS:
            y, mm_y, perm = ops.alltoallv_gmm(
                x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w,
                trans_gmm_weight=trans, permute_out_flag=True, tiling=tiling,
            )  # fmt: skip
            problems.append(close(y, gy, comm, f"tiling={tiling}"))
            assert perm is not None
            exact = perm.shape == gperm.shape and np.array_equal(perm.double().numpy(), gperm)
            problems.append(None if exact else f"tiling={tiling}: permute_out moved rows wrong")
            if shared:
                assert mm_y is not None and gmm is not None
                problems.append(close(mm_y, gmm, comm))
        return problems

    on_threads(world, body)


@pytest.mark.parametrize("world", [3])
def test_moe_progress_thread_gives_the_polled_result(world: int) -> None:
    table = routing_table("zipf", world, 2, 5, 2, Path("."))

    def body(comm: ThreadCommunicator) -> list[str | None]:
        send = table.send_counts(comm.rank, "combine")
        recv = table.recv_counts(comm.rank, "combine")
        gen = gen_for(comm, 3)
        x = rand(gen, sum(send), 8, dtype=torch.float16)
        w = rand(gen, 2, 8, 6, dtype=torch.float16)
        polled, _ = ops.gmm_alltoallv(x, w, comm, world, send, recv, tiling=2)
        threaded, _ = ops.gmm_alltoallv(x, w, comm, world, send, recv, tiling=2, progress="thread")
        return [None if torch.equal(polled, threaded) else f"rank {comm.rank} differs"]

    on_threads(world, body)


def test_counts_that_break_the_invariant_are_named_on_every_rank() -> None:
    # 3 ranks, 2 experts: rank 1 says it receives 5 rows of expert 1 from rank 2; rank 2 sends 4
    table = sparse_table(3, 2)

    def body(comm: ThreadCommunicator) -> str:
        send = table.send_counts(comm.rank, "combine")
        recv = list(table.recv_counts(comm.rank, "combine"))
        sent = table.send_counts(2, "combine")[1 * 2 + 1]
        if comm.rank == 1:
            recv[2 * 2 + 1] = sent + 1
        gen = gen_for(comm, 4)
        x = rand(gen, sum(send), 8, dtype=torch.float16)
        w = rand(gen, 2, 8, 6, dtype=torch.float16)
        with pytest.raises(ParamInvalidError) as info:
            ops.gmm_alltoallv(x, w, comm, 3, send, recv)
        return f"{info.value}|{sent}"

    got = run_threads(3, body)
    assert len(set(got)) == 1, "the same error on every rank"
    message, sent = got[0].split("|")
    assert (
        f"recv_counts[5] on rank 1={int(sent) + 1}: must equal send_counts[3] on rank 2 ({sent})"
        in message
    )
    assert "receiver q=1, sender r=2, expert j=1" in message


# -- MatmulAllReduce ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
def test_mm_all_reduce_float_every_tiling_with_bias_and_x3(world: int) -> None:
    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 5)
        x1 = rand(gen, 3, 7, 16, dtype=torch.float16, scale=0.5)  # m = 21 rows
        x2 = rand(gen, 16, 8, dtype=torch.float16, scale=0.5)
        bias = rand(gen, 8, dtype=torch.float16)
        x3 = rand(gen, 3, 7, 8, dtype=torch.float16)  # different rows: a tile must take its own
        g = golden.gather_inputs(comm, x1=x1, x2=x2, b=bias, x3=x3)
        expected = golden.mm_all_reduce(
            g["x1"], g["x2"], bias=g["b"], x3=g["x3"], local_dtype=torch.float16
        )
        problems = []
        for tiling in (None, "serial", 1, 3, 16):
            out = ops.mm_all_reduce(x1, x2, comm, bias=bias, x3=x3, tiling=tiling)
            problems.append(close(out, expected, comm, f"tiling={tiling}"))
        return problems

    on_threads(world, body)


@pytest.mark.parametrize("world", WORLDS)
def test_mm_all_reduce_weight_quant_per_group_and_int4(world: int) -> None:
    m, k, n = 5, 64, 16

    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 6)
        x1 = rand(gen, m, k, dtype=torch.float16)
        x2 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        scale = (torch.rand(2, n, generator=gen) * 0.05 + 0.01).half()  # groups of 32 rows
        offset = rand(gen, 2, n, dtype=torch.float16, scale=2.0)
        values = torch.randint(-8, 8, (k, n), generator=gen, dtype=torch.int32)
        packed = convert_weight_to_int4pack(values)
        g = golden.gather_inputs(comm, x1=x1, x2=x2, s=scale, o=offset, p=packed)
        int8 = golden.mm_all_reduce(
            g["x1"], g["x2"], antiquant_scale=g["s"], antiquant_offset=g["o"],
            antiquant_group_size=32, local_dtype=torch.float16,
        )  # fmt: skip
        int4 = golden.mm_all_reduce(
            g["x1"], g["p"], antiquant_scale=g["s"], antiquant_offset=g["o"],
            antiquant_group_size=32, local_dtype=torch.float16,
        )  # fmt: skip
        problems = []
        for tiling in ("serial", 2):
            for weight, expected in ((x2, int8), (packed, int4)):
                out = ops.mm_all_reduce(
                    x1, weight, comm, antiquant_scale=scale, antiquant_offset=offset,
                    antiquant_group_size=32, tiling=tiling,
                )  # fmt: skip
                problems.append(close(out, expected, comm, f"{weight.dtype} tiling={tiling}"))
        return problems

    on_threads(world, body)


@pytest.mark.parametrize("world", WORLDS)
def test_mm_all_reduce_quant_is_bit_identical_under_every_tiling(world: int) -> None:
    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 7)
        x1 = torch.randint(-128, 128, (9, 32), generator=gen, dtype=torch.int8)
        x2 = torch.randint(-128, 128, (32, 8), generator=gen, dtype=torch.int8)
        bias = torch.randint(-1000, 1000, (8,), generator=gen, dtype=torch.int32)
        problems = []
        for pertoken in (None, torch.rand(9, generator=gen) + 0.5):
            raw = torch.rand(8, generator=gen) * 1e-3 + 1e-4
            scale = trans_quant_param(raw) if pertoken is None else raw
            g = golden.gather_inputs(comm, x1=x1, x2=x2, s=scale, pt=pertoken, b=bias)
            expected = golden.mm_all_reduce(
                g["x1"], g["x2"], bias=g["b"], dequant_scale=g["s"],
                pertoken_scale=None if pertoken is None else g["pt"], local_dtype=torch.float16,
            )  # fmt: skip
            kwargs: dict[str, Any] = {
                "bias": bias,
                "dequant_scale": scale,
                "pertoken_scale": pertoken,
            }
            serial = ops.mm_all_reduce(x1, x2, comm, tiling="serial", **kwargs)
            problems.append(close(serial, expected, comm, f"pertoken={pertoken is not None}"))
            for tiling in (None, 1, 4):
                out = ops.mm_all_reduce(x1, x2, comm, tiling=tiling, **kwargs)
                problems.append(None if torch.equal(out, serial) else f"tiling={tiling} differs")
        return problems

    on_threads(world, body)


# -- AllGatherMatmul / MatmulReduceScatter ------------------------------------------------------

PAIR_TILINGS: list[Any] = [None, "serial", 1, 2, 3]


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_matmul_every_tiling(world: int) -> None:
    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 8)
        x1 = rand(gen, 5, 256, dtype=torch.float16, scale=0.25)
        x2 = rand(gen, 6, 256, dtype=torch.float16, scale=0.25).t()  # a transposed view
        bias = rand(gen, 6, dtype=torch.float16)
        g = golden.gather_inputs(comm, x1=x1)
        expected, expected_gather = golden.all_gather_matmul(g["x1"], x2, bias)
        problems = []
        for tiling in PAIR_TILINGS:
            out, gathered = ops.all_gather_matmul(x1, x2, comm, world, bias, tiling=tiling)
            problems.append(close(out, expected, comm, f"tiling={tiling}"))
            assert gathered is not None
            exact = np.array_equal(gathered.double().numpy(), expected_gather)
            problems.append(None if exact else f"tiling={tiling}: gathered x1 differs")
        return problems

    on_threads(world, body)


@pytest.mark.parametrize("world", WORLDS)
def test_matmul_reduce_scatter_every_tiling(world: int) -> None:
    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 9)
        x1 = rand(gen, 3 * world, 256, dtype=torch.float16, scale=0.25)
        x2 = rand(gen, 256, 6, dtype=torch.float16, scale=0.25)
        bias = rand(gen, 6, dtype=torch.float16)
        g = golden.gather_inputs(comm, x1=x1, x2=x2, b=bias)
        expected = golden.matmul_reduce_scatter(
            comm.rank, g["x1"], g["x2"], g["b"], local_dtype=torch.float16
        )
        problems = []
        for tiling in PAIR_TILINGS:
            out = ops.matmul_reduce_scatter(x1, x2, comm, world, bias=bias, tiling=tiling)
            problems.append(close(out, expected, comm, f"tiling={tiling}"))
        return problems

    on_threads(world, body)


def test_reduce_scatter_sums_the_partials_in_float32_and_rounds_once() -> None:
    # rank r's partial is the constant v[r]; 2048 + 1 + 1 rounded once is 2050, while adding
    # in float16 one rank at a time loses both ones (2049 rounds back to 2048)
    v = [2048.0, 1.0, 1.0]

    def body(comm: ThreadCommunicator) -> list[str | None]:
        x1 = torch.zeros(6, 256, dtype=torch.float16)
        x1[:, 0] = v[comm.rank]
        x2 = torch.zeros(256, 4, dtype=torch.float16)
        x2[0] = 1.0
        problems = []
        for tiling in PAIR_TILINGS:
            out = ops.matmul_reduce_scatter(x1, x2, comm, 3, tiling=tiling)
            exact = bool((out == 2050.0).all())
            problems.append(None if exact else f"tiling={tiling}: {torch.unique(out).tolist()}")
        return problems

    on_threads(3, body)


# -- decode attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_ifa_decode_every_tiling_on_each_ranks_heads(world: int) -> None:
    def body(comm: ThreadCommunicator) -> list[str | None]:
        gen = gen_for(comm, 10)
        batch, heads, kv_heads, dim, block, per_seq = 4, 4, 2, 16, 16, 2
        blocks = batch * per_seq + 2
        table = torch.randperm(blocks, generator=gen)[: batch * per_seq].reshape(batch, per_seq)
        args = {
            "query": rand(gen, batch, 1, heads * dim, dtype=torch.float16),
            "key_cache": rand(gen, blocks, block, kv_heads * dim, dtype=torch.float16),
            "value_cache": rand(gen, blocks, block, kv_heads * dim, dtype=torch.float16),
            "block_table": table.to(torch.int32),
            "actual_seq_lengths": [32, 1, 0, 17 + comm.rank],
            "num_heads": heads,
            "num_key_value_heads": kv_heads,
            "block_size": block,
            "scale_value": dim**-0.5,
        }
        expected = golden.ifa_paged(
            args["query"], args["key_cache"], args["value_cache"], args["block_table"],
            args["actual_seq_lengths"], num_heads=heads, num_kv_heads=kv_heads,
            scale=args["scale_value"], probs_dtype=args["query"].dtype,
        )  # fmt: skip
        serial = ops.ifa_decode(comm=comm, tiling="serial", **args)
        verdict = check(serial, expected, "double_thousandths", rank=comm.rank)
        problems = [None if verdict.passed else verdict.summary()]
        for tiling in (None, 2, 3):
            tiled = ops.ifa_decode(comm=comm, tiling=tiling, **args)
            problems.append(None if torch.equal(tiled, serial) else f"tiling={tiling} differs")
        return problems

    on_threads(world, body)


# -- timelines of real runs ---------------------------------------------------------------------


def test_a_tiled_run_records_every_ranks_tasks_in_dependency_order() -> None:
    def body(comm: ThreadCommunicator) -> Any:
        gen = gen_for(comm, 11)
        x1 = rand(gen, 16, 8, dtype=torch.float16)
        x2 = rand(gen, 8, 4, dtype=torch.float16)
        with record() as rec:
            ops.mm_all_reduce(x1, x2, comm, tiling=4)
        return gather(comm, rec.timeline)

    everyone = run_threads(3, body)[0]
    assert everyone.ranks() == [0, 1, 2] and len(everyone.records) == 3 * 8
    # a compute task on the CPU carries the process's CPU time over it; a collective none
    for r in everyone.records:
        assert (r.cpu_s is None) == (r.stream == Resource.COMM)
        assert r.cpu_s is None or r.cpu_s >= 0
    for rank in range(3):
        mine = {r.task: r for r in everyone.records if r.rank == rank}
        assert sorted(mine) == list(range(8))
        for task, r in mine.items():
            if r.stream == Resource.COMM:  # each allreduce follows the matmul before it
                assert r.start_s >= mine[task - 1].end_s


LATE_S = 0.05
"""How long after the call's barrier rank 1 starts, as a rank waiting for a shared core does."""


def late_second_rank(monkeypatch: pytest.MonkeyPatch, machine: Callable[[int], str]) -> Timeline:
    """Both ranks' records of one recorded tiled call, rank 1 leaving its barrier late."""
    where = threading.local()
    monkeypatch.setattr(executor, "machine_id", lambda: machine(where.rank))

    def body(comm: ThreadCommunicator) -> Timeline:
        where.rank = comm.rank
        if comm.rank == 1:
            barrier = comm.barrier

            def late() -> None:
                barrier()
                time.sleep(LATE_S)

            monkeypatch.setattr(comm, "barrier", late)
        gen = gen_for(comm, 12)
        x1 = rand(gen, 16, 8, dtype=torch.float16)
        x2 = rand(gen, 8, 4, dtype=torch.float16)
        with record() as rec:
            ops.mm_all_reduce(x1, x2, comm, tiling=2)
        monkeypatch.setattr(comm, "barrier", type(comm).barrier.__get__(comm))
        return gather(comm, rec.timeline)

    timeline = run_threads(2, body)[0]
    assert isinstance(timeline, Timeline)
    # thread ranks share the process's count of calls: one run key for both
    run = timeline.records[0].run
    return Timeline(records=tuple(replace(x, run=run) for x in timeline.records))


def first_starts(timeline: Timeline) -> list[float]:
    return [min(x.start_s for x in timeline.records if x.rank == r) for r in (0, 1)]


def test_the_ranks_of_one_machine_are_timed_on_its_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 1 left the barrier LATE_S after rank 0: on the machine's clock its tasks start
    # then, and its total counts from rank 0's first start
    timeline = late_second_rank(monkeypatch, lambda rank: "one machine")
    first = first_starts(timeline)
    assert first[0] < LATE_S / 5
    assert first[1] >= LATE_S
    late = timeline.metrics().per_rank[1]
    assert late.total_s >= LATE_S + late.compute_s


def test_ranks_of_different_machines_are_each_timed_from_their_barrier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no clock in common: each rank's epoch is its own exit from the barrier
    timeline = late_second_rank(monkeypatch, lambda rank: f"machine {rank}")
    assert max(first_starts(timeline)) < LATE_S / 5


# -- one rank's bad argument fails every rank alike, before any data moves ---------------------


def _bf16(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bfloat16)


def _ifa(comm: ThreadCommunicator, lengths: Any, progress: str = "poll") -> torch.Tensor:
    """A 2-sequence decode on 2 heads of dim 16, 16-token blocks, ``lengths`` of KV each."""
    return ops.ifa_decode(
        _bf16(2, 1, 32), _bf16(4, 16, 32), _bf16(4, 16, 32), comm,
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        actual_seq_lengths=lengths, num_heads=2, num_key_value_heads=2, block_size=16,
        progress=progress,
    )  # fmt: skip


ONE_RANK_BAD: dict[str, tuple[Callable[[ThreadCommunicator, bool], object], str]] = {
    "progress": (
        lambda comm, bad: ops.mm_all_reduce(
            _bf16(4, 16), _bf16(16, 8), comm, progress="bogus" if bad else "poll"
        ),
        "progress='bogus': must be 'poll' or 'thread'",
    ),
    "x1 a list": (
        lambda comm, bad: ops.mm_all_reduce(
            cast(Any, [[1.0] * 16] * 4) if bad else _bf16(4, 16), _bf16(16, 8), comm
        ),
        "x1='list': must be a torch.Tensor",
    ),
    "k = 0": (
        lambda comm, bad: ops.mm_all_reduce(_bf16(4, 0 if bad else 16), _bf16(16, 8), comm),
        "k=0: k must be in [1, 65535]",
    ),
    "m = 0 gathered": (
        lambda comm, bad: ops.all_gather_matmul(
            _bf16(0 if bad else 2, 256), _bf16(256, 8), comm, 2
        ),
        "m=0: m must be in [1, 2147483647]",
    ),
    "n = 0 scattered": (
        lambda comm, bad: ops.matmul_reduce_scatter(
            _bf16(4, 256), _bf16(256, 0 if bad else 8), comm, 2
        ),
        "n=0: n must be in [1, 65535]",
    ),
    "float lengths": (
        lambda comm, bad: _ifa(comm, [3.9, 5.9] if bad else [3, 5]),
        "actual_seq_lengths=[3.9, 5.9]: must be a sequence of integers, one per batch",
    ),
    "no lengths": (
        lambda comm, bad: _ifa(comm, None if bad else [3, 5]),
        "actual_seq_lengths='NoneType': must be a sequence of integers, one per batch",
    ),
    "ifa progress": (
        lambda comm, bad: _ifa(comm, [3, 5], progress="x" if bad else "poll"),
        "progress='x': must be 'poll' or 'thread'",
    ),
}


@pytest.mark.parametrize("case", list(ONE_RANK_BAD))
def test_one_ranks_bad_argument_raises_the_same_error_on_every_rank(case: str) -> None:
    call, said = ONE_RANK_BAD[case]

    def body(comm: ThreadCommunicator) -> tuple[str, int | None, str]:
        with pytest.raises(ParamInvalidError) as info:
            call(comm, comm.rank == 1)
        # the group is still usable: every rank left the call at its checks
        total = ops.mm_all_reduce(_bf16(2, 16), _bf16(16, 4), comm)
        return str(info.value), info.value.rank, f"{total[0, 0].item():g}"

    assert run_threads(2, body) == [(said, 1, "32")] * 2
