"""The fused ops on real ranks against the independent float64 goldens of mc2sim.golden."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mc2sim import golden, ops
from mc2sim.comm import Communicator
from mc2sim.compare import check
from mc2sim.kernels import convert_weight_to_int4pack, trans_quant_param
from mc2sim.routing import RoutingConfig, RoutingKind, RoutingTable, route

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

HALF = [torch.float16, torch.bfloat16]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(dtype)


def gen_for(comm: Communicator, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + comm.rank)


def assert_golden(actual: torch.Tensor, expected: np.ndarray, comm: Communicator) -> None:
    assert tuple(actual.shape) == expected.shape
    verdict = check(actual, expected, "allclose", rank=comm.rank)
    assert verdict.passed, verdict.summary()


# -- MoE ------------------------------------------------------------------------------------


def skewed_table(world: int, e: int, tokens: int, k: int, seed: int) -> RoutingTable:
    return route(
        RoutingConfig(kind=RoutingKind.ZIPF, seed=seed, skew=1.5),
        world_size=world,
        experts_per_rank=e,
        tokens_per_rank=tokens,
        top_k=k,
    )


def sparse_table(world: int, e: int) -> RoutingTable:
    """Dispatch matrix with an empty expert everywhere and a rank r -> q pair that is empty."""
    m = np.zeros((world, world * e), dtype=np.int64)
    for r in range(world):
        for g in range(world * e):
            if g % e == e - 1:  # every rank's last local expert gets nothing
                continue
            m[r, g] = (3 * r + 2 * g) % 5 + 1
        m[r, ((r + 1) % world) * e : ((r + 1) % world + 1) * e] = 0  # r sends nothing to r+1
    return RoutingTable.from_matrix(m, e)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("trans", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
def test_gmm_alltoallv_against_golden(
    comm: Communicator, dtype: torch.dtype, trans: bool, shared: bool
) -> None:
    e, bs, k, h1, n1, h2, n2 = 3, 8, 2, 24, 16, 12, 10
    table = skewed_table(comm.size, e, bs, k, seed=7)
    send = table.send_counts(comm.rank, "combine")
    recv = table.recv_counts(comm.rank, "combine")
    gen = gen_for(comm, 1)
    gmm_x = rand(gen, sum(send), h1, dtype=dtype)
    weight = rand(gen, e, *((n1, h1) if trans else (h1, n1)), dtype=dtype, scale=0.5)
    mm_x = rand(gen, bs, h2, dtype=dtype) if shared else None
    mm_w = rand(gen, *((n2, h2) if trans else (h2, n2)), dtype=dtype) if shared else None

    y, mm_y = ops.gmm_alltoallv(
        gmm_x, weight, comm, comm.size, send, recv,
        mm_x=mm_x, mm_weight=mm_w, trans_gmm_weight=trans, trans_mm_weight=trans,
    )  # fmt: skip

    everyone = golden.gather_inputs(comm, x=gmm_x, w=weight, send=send)
    gy, gmm = golden.gmm_alltoallv(
        comm.rank, everyone["x"], everyone["w"], everyone["send"],
        trans_gmm_weight=trans, mm_x=mm_x, mm_weight=mm_w, trans_mm_weight=trans,
    )  # fmt: skip
    assert y.dtype == dtype and y.shape == (bs * k, n1)
    assert_golden(y, gy, comm)
    if shared:
        assert mm_y is not None and gmm is not None
        assert mm_y.dtype == dtype and mm_y.shape == (bs, n2)
        assert_golden(mm_y, gmm, comm)
    else:
        assert mm_y is None


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gmm_alltoallv_with_empty_experts_and_silent_peers(
    comm: Communicator, dtype: torch.dtype
) -> None:
    e, h1, n1 = 3, 16, 8
    table = sparse_table(comm.size, e)
    send = table.send_counts(comm.rank, "combine")
    recv = table.recv_counts(comm.rank, "combine")
    assert 0 in send and 0 in recv
    gen = gen_for(comm, 2)
    gmm_x = rand(gen, sum(send), h1, dtype=dtype)
    weight = rand(gen, e, h1, n1, dtype=dtype)
    y, _ = ops.gmm_alltoallv(gmm_x, weight, comm, comm.size, send, recv)
    everyone = golden.gather_inputs(comm, x=gmm_x, w=weight, send=send)
    gy, _ = golden.gmm_alltoallv(comm.rank, everyone["x"], everyone["w"], everyone["send"])
    assert_golden(y, gy, comm)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("trans", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("table_kind", ["skewed", "sparse"])
def test_alltoallv_gmm_against_golden(
    comm: Communicator, dtype: torch.dtype, trans: bool, table_kind: str
) -> None:
    e, bs, k, h1, n1, h2, n2 = 2, 6, 3, 20, 12, 8, 6
    if table_kind == "skewed":
        table = skewed_table(comm.size, e, bs, k, seed=11)
    else:
        table = sparse_table(comm.size, e)
    send = table.send_counts(comm.rank, "dispatch")
    recv = table.recv_counts(comm.rank, "dispatch")
    gen = gen_for(comm, 3)
    gmm_x = rand(gen, sum(send), h1, dtype=dtype)
    weight = rand(gen, e, *((n1, h1) if trans else (h1, n1)), dtype=dtype, scale=0.5)
    shared = table_kind == "skewed"
    mm_x = rand(gen, bs, h2, dtype=dtype) if shared else None
    mm_w = rand(gen, h2, n2, dtype=dtype) if shared else None

    gmm_y, mm_y, permuted = ops.alltoallv_gmm(
        gmm_x, weight, comm, comm.size, send, recv,
        mm_x=mm_x, mm_weight=mm_w, trans_gmm_weight=trans, permute_out_flag=True,
    )  # fmt: skip

    everyone = golden.gather_inputs(comm, x=gmm_x, send=send)
    gy, gmm, gperm = golden.alltoallv_gmm(
        comm.rank, everyone["x"], weight, everyone["send"],
        trans_gmm_weight=trans, mm_x=mm_x, mm_weight=mm_w,
    )  # fmt: skip
    assert gmm_y.shape == (sum(recv), n1) and gmm_y.dtype == dtype
    assert_golden(gmm_y, gy, comm)
    assert permuted is not None
    assert np.array_equal(permuted.double().numpy(), gperm), "permute moves data exactly"
    if shared:
        assert mm_y is not None and gmm is not None
        assert_golden(mm_y, gmm, comm)
    _, _, none = ops.alltoallv_gmm(
        gmm_x, weight, comm, comm.size, send, recv, trans_gmm_weight=trans
    )
    assert none is None


# -- MatmulAllReduce ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
def test_mm_all_reduce_float(comm: Communicator, dtype: torch.dtype, lead: tuple[int, ...]) -> None:
    k, n = 32, 24
    gen = gen_for(comm, 4)
    x1 = rand(gen, *lead, k, dtype=dtype, scale=0.5)
    x2 = rand(gen, k, n, dtype=dtype, scale=0.5)
    bias = rand(gen, n, dtype=dtype)
    x3 = rand(gen, *lead, n, dtype=dtype)
    out = ops.mm_all_reduce(x1, x2, comm, bias=bias, x3=x3)
    assert out.shape == (*lead, n) and out.dtype == dtype
    g = golden.gather_inputs(comm, x1=x1, x2=x2, bias=bias, x3=x3)
    expected = golden.mm_all_reduce(g["x1"], g["x2"], bias=g["bias"], x3=g["x3"], local_dtype=dtype)
    assert_golden(out, expected, comm)
    # bias and x3 are inside the AllReduce: dropping them moves the result by size * them
    plain = ops.mm_all_reduce(x1, x2, comm)
    assert not torch.allclose(plain.float(), out.float())


ANTIQUANT_MODES = ["per_tensor", "per_channel", "per_channel_1n", "per_group"]


def antiquant_params(
    gen: torch.Generator, mode: str, k: int, n: int, dtype: torch.dtype, with_offset: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    shape, group = {
        "per_tensor": ((1,), 0),
        "per_channel": ((n,), 0),
        "per_channel_1n": ((1, n), 0),
        "per_group": ((-(-k // 32), n), 32),
    }[mode]
    scale = (torch.rand(*shape, generator=gen) * 0.05 + 0.01).to(dtype)
    offset = rand(gen, *shape, dtype=dtype, scale=2.0) if with_offset else None
    return scale, offset, group


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", ANTIQUANT_MODES)
@pytest.mark.parametrize("with_offset", [False, True], ids=["", "offset"])
def test_mm_all_reduce_weight_quant_int8(
    comm: Communicator, dtype: torch.dtype, mode: str, with_offset: bool
) -> None:
    m, k, n = 5, 96, 16
    gen = gen_for(comm, 5)
    x1 = rand(gen, m, k, dtype=dtype)
    x2 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    scale, offset, group = antiquant_params(gen, mode, k, n, dtype, with_offset)
    bias = rand(gen, n, dtype=dtype)
    out = ops.mm_all_reduce(
        x1, x2, comm, bias=bias, antiquant_scale=scale, antiquant_offset=offset,
        antiquant_group_size=group,
    )  # fmt: skip
    g = golden.gather_inputs(comm, x1=x1, x2=x2, s=scale, o=offset, b=bias)
    expected = golden.mm_all_reduce(
        g["x1"], g["x2"], bias=g["b"], antiquant_scale=g["s"],
        antiquant_offset=g["o"] if with_offset else None, antiquant_group_size=group,
        local_dtype=dtype,
    )  # fmt: skip
    assert out.dtype == dtype
    assert_golden(out, expected, comm)


@pytest.mark.parametrize("layout", ["nd_int32", "nd_int32_transposed", "nd_uint8", "nz_int32"])
def test_mm_all_reduce_weight_quant_int4(comm: Communicator, layout: str) -> None:
    m, k, n, dtype = 4, 64, 64, torch.float16
    gen = gen_for(comm, 6)
    x1 = rand(gen, m, k, dtype=dtype)
    values = torch.randint(-8, 8, (k, n), generator=gen, dtype=torch.int32)
    kwargs: dict[str, object] = {}
    if layout == "nd_int32":
        x2 = convert_weight_to_int4pack(values)
    elif layout == "nd_int32_transposed":  # (k/8, n) view of a contiguous (n, k/8)
        x2 = convert_weight_to_int4pack(values.t().contiguous()).t()
    elif layout == "nd_uint8":
        x2 = convert_weight_to_int4pack(values, out_dtype="int4")
    else:  # seed 000's example: pack the transposed (n, k) weight to NZ
        x2 = convert_weight_to_int4pack(values.t().contiguous(), out_format="FRACTAL_NZ")
        kwargs = {"x2_shape": (k, n), "x2_transposed": True}
    scale, offset, _ = antiquant_params(gen, "per_channel", k, n, dtype, True)
    out = ops.mm_all_reduce(x1, x2, comm, antiquant_scale=scale, antiquant_offset=offset, **kwargs)  # type: ignore[arg-type]
    g = golden.gather_inputs(comm, x1=x1, x2=x2, s=scale, o=offset)
    expected = golden.mm_all_reduce(
        g["x1"], g["x2"], antiquant_scale=g["s"], antiquant_offset=g["o"],
        x2_shape=kwargs.get("x2_shape"), x2_transposed=bool(kwargs.get("x2_transposed")),  # type: ignore[arg-type]
        local_dtype=dtype,
    )  # fmt: skip
    assert_golden(out, expected, comm)


@pytest.mark.parametrize(
    ("scale_kind", "pertoken"),
    [("int64", False), ("bf16", False), ("fp32", True), ("bf16", True)],
)
def test_mm_all_reduce_quant(comm: Communicator, scale_kind: str, pertoken: bool) -> None:
    m, k, n = 6, 64, 16
    gen = gen_for(comm, 7)
    x1 = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    x2 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    raw = torch.rand(n, generator=gen) * 1e-3 + 1e-4
    scale = {
        "int64": trans_quant_param(raw),
        "bf16": raw.to(torch.bfloat16),
        "fp32": raw,
    }[scale_kind]
    pt = (torch.rand(m, generator=gen) + 0.5) if pertoken else None
    bias = torch.randint(-1000, 1000, (n,), generator=gen, dtype=torch.int32)
    out_dtype = torch.bfloat16 if scale_kind == "bf16" else torch.float16
    x3 = rand(gen, m, n, dtype=out_dtype)
    out = ops.mm_all_reduce(x1, x2, comm, bias=bias, dequant_scale=scale, pertoken_scale=pt, x3=x3)
    assert out.dtype == out_dtype
    g = golden.gather_inputs(comm, x1=x1, x2=x2, s=scale, pt=pt, b=bias, x3=x3)
    expected = golden.mm_all_reduce(
        g["x1"], g["x2"], bias=g["b"], x3=g["x3"], dequant_scale=g["s"],
        pertoken_scale=g["pt"] if pertoken else None, local_dtype=out_dtype,
    )  # fmt: skip
    assert_golden(out, expected, comm)


# -- AllGatherMatmul / MatmulReduceScatter ---------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("gather_output", [True, False])
def test_all_gather_matmul(comm: Communicator, dtype: torch.dtype, gather_output: bool) -> None:
    m, k, n = 3, 256, 8
    gen = gen_for(comm, 8)
    x1 = rand(gen, m, k, dtype=dtype, scale=0.25)
    x2 = rand(gen, n, k, dtype=dtype, scale=0.25).t()  # transposed view
    bias = rand(gen, n, dtype=dtype)
    out, gathered = ops.all_gather_matmul(
        x1, x2, comm, comm.size, bias, gather_output=gather_output
    )
    g = golden.gather_inputs(comm, x1=x1)
    expected, expected_gather = golden.all_gather_matmul(g["x1"], x2, bias)
    assert out.shape == (comm.size * m, n)
    assert_golden(out, expected, comm)
    if gather_output:
        assert gathered is not None
        assert np.array_equal(gathered.double().numpy(), expected_gather)
    else:
        assert gathered is None


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_matmul_reduce_scatter(comm: Communicator, dtype: torch.dtype) -> None:
    k, n = 256, 8
    m = 2 * comm.size
    gen = gen_for(comm, 9)
    x1 = rand(gen, m, k, dtype=dtype, scale=0.25)
    x2 = rand(gen, k, n, dtype=dtype, scale=0.25)
    bias = rand(gen, n, dtype=dtype)
    out = ops.matmul_reduce_scatter(x1, x2, comm, comm.size, bias=bias)
    g = golden.gather_inputs(comm, x1=x1, x2=x2, b=bias)
    expected = golden.matmul_reduce_scatter(comm.rank, g["x1"], g["x2"], g["b"], local_dtype=dtype)
    assert out.shape == (2, n) and out.dtype == dtype
    assert_golden(out, expected, comm)


# -- decode attention -----------------------------------------------------------------------


def paged_case(comm: Communicator, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """This rank's heads of a decode step: a scattered paged cache, lengths down to 0."""
    gen = gen_for(comm, seed)
    batch, heads, kv_heads, dim, block, per_seq = 5, 4, 2, 32, 16, 4
    blocks = batch * per_seq + 3
    table = torch.randperm(blocks, generator=gen)[: batch * per_seq].reshape(batch, per_seq)
    return {
        "query": rand(gen, batch, 1, heads * dim, dtype=dtype),
        "key_cache": rand(gen, blocks, block, kv_heads * dim, dtype=dtype),
        "value_cache": rand(gen, blocks, block, kv_heads * dim, dtype=dtype),
        "block_table": table.to(torch.int32),
        "actual_seq_lengths": [64, 1, 0, 33, 17 + comm.rank],
        "num_heads": heads,
        "num_key_value_heads": kv_heads,
        "block_size": block,
        "scale_value": dim**-0.5,
    }


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ifa_decode_against_golden(comm: Communicator, dtype: torch.dtype) -> None:
    args = paged_case(comm, dtype, seed=11)
    expected = golden.ifa_paged(
        args["query"], args["key_cache"], args["value_cache"], args["block_table"],
        args["actual_seq_lengths"], num_heads=args["num_heads"],
        num_kv_heads=args["num_key_value_heads"], scale=args["scale_value"], probs_dtype=dtype,
    )  # fmt: skip
    serial = ops.ifa_decode(comm=comm, tiling="serial", **args)
    assert serial.dtype == dtype and tuple(serial.shape) == expected.shape
    verdict = check(serial, expected, "double_thousandths", rank=comm.rank)
    assert verdict.passed, verdict.summary()
    assert not serial[2].any(), "an empty window gives zeros"
    for tiling in (None, 2, 5, 16):  # batch tiles attend each batch exactly as one launch
        tiled = ops.ifa_decode(comm=comm, tiling=tiling, **args)
        assert torch.equal(tiled, serial), tiling
