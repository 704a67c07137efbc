"""Arguments valid on every rank but different on the last one: the same error everywhere, at once.

Each case calls an op on every rank with valid arguments, except that the last rank passes a
different value of something that must match across ranks (a tiling, a dtype, a dimension,
an expert count, a flag). Before any data moves every rank raises the same
``ParamInvalidError`` naming that parameter, the last rank's value and the rule; nobody hangs,
and the group is still usable afterwards. Runs at any world size >= 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mc2sim import ops
from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError
from mc2sim.invariants import check_counts

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(60)]

BF16, FP16 = torch.bfloat16, torch.float16


def mm_all_reduce(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
    a = {"m": 2, "k": 16, "n": 4, "dtype": BF16, "tiling": None, **(change if odd else {})}
    x1 = torch.ones(a["m"], a["k"], dtype=a["dtype"])
    if a.get("weight_quant"):
        x2 = torch.ones(a["k"], a["n"], dtype=torch.int8)
        scale = torch.ones(a["n"], dtype=a["dtype"])
        ops.mm_all_reduce(x1, x2, comm, antiquant_scale=scale, tiling=a["tiling"])
    else:
        x2 = torch.ones(a["k"], a["n"], dtype=a["dtype"])
        ops.mm_all_reduce(x1, x2, comm, tiling=a["tiling"])


def tp_pair(op: Callable[..., Any]) -> Callable[[Communicator, bool, dict[str, Any]], None]:
    def call(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
        a: dict[str, Any] = {"m": 2 * comm.size, "k": 256, "n": 4, "dtype": BF16, "tiling": None}
        a.update(change if odd else {})
        m = a["m"](comm.size) if callable(a["m"]) else a["m"]
        x1 = torch.ones(m, a["k"], dtype=a["dtype"])
        x2 = torch.ones(a["k"], a["n"], dtype=a["dtype"])
        op(x1, x2, comm, comm.size, tiling=a["tiling"])

    return call


def moe(op: Callable[..., Any]) -> Callable[[Communicator, bool, dict[str, Any]], None]:
    def call(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
        a: dict[str, Any] = {
            "e": 2,
            "h1": 8,
            "n1": 4,
            "dtype": BF16,
            "tiling": None,
            "shared": False,
        }
        a.update(change if odd else {})
        counts = [1] * (comm.size * a["e"])
        kwargs: dict[str, Any] = {}
        if a["shared"]:  # a shared expert of BS = W rows: top-K = 2W / W = 2
            kwargs["mm_x"] = torch.ones(comm.size, 8, dtype=a["dtype"])
            kwargs["mm_weight"] = torch.ones(8, 4, dtype=a["dtype"])
        if "validate_counts" in a:
            kwargs["validate_counts"] = a["validate_counts"]
        op(
            gmm_x=torch.ones(sum(counts), a["h1"], dtype=a["dtype"]),
            gmm_weight=torch.ones(a["e"], a["h1"], a["n1"], dtype=a["dtype"]),
            comm=comm,
            ep_world_size=comm.size,
            send_counts=counts,
            recv_counts=list(counts),
            tiling=a["tiling"],
            **kwargs,
        )

    return call


def ifa(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
    a = {"b": 2, "dtype": BF16, "tiling": None, "heads": 2, **(change if odd else {})}
    b, heads = a["b"], a["heads"]
    ops.ifa_decode(
        torch.ones(b, 1, heads * 32, dtype=a["dtype"]),
        torch.ones(4, 16, heads * 32, dtype=a["dtype"]),
        torch.ones(4, 16, heads * 32, dtype=a["dtype"]),
        comm,
        block_table=torch.tensor([[0, 1], [2, 3], [0, 1]], dtype=torch.int32)[:b],
        actual_seq_lengths=[3, 5, 2][:b],
        num_heads=heads,
        num_key_value_heads=heads,
        block_size=16,
        tiling=a["tiling"],
    )


def counts(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
    e = change["e"] if odd else 2
    ones = [1] * (comm.size * e)
    check_counts(comm, ones, list(ones), e)


def other_op(comm: Communicator, odd: bool, change: dict[str, Any]) -> None:
    x1 = torch.ones(2, 256, dtype=BF16)
    x2 = torch.ones(256, 4, dtype=BF16)
    if odd:
        ops.all_gather_matmul(x1, x2, comm, comm.size)
    else:
        ops.mm_all_reduce(x1, x2, comm)


def four_per_rank(world: int) -> int:
    """4 rows per rank (the others have 2): a multiple of any world size, as the op requires."""
    return 4 * world


CASES = [
    # (id, call, the last rank's change, param named, its value there: a function of the
    # world size where it depends on it)
    ("mm_all_reduce-tiling", mm_all_reduce, {"tiling": 2}, "tiling", "tiles=2"),
    ("mm_all_reduce-serial", mm_all_reduce, {"tiling": "serial"}, "tiling", "serial"),
    ("mm_all_reduce-dtype", mm_all_reduce, {"dtype": FP16}, "x1.dtype", "float16"),
    ("mm_all_reduce-m", mm_all_reduce, {"m": 3}, "m", 3),
    ("mm_all_reduce-k", mm_all_reduce, {"k": 32}, "k", 32),
    ("mm_all_reduce-n", mm_all_reduce, {"n": 8}, "n", 8),
    ("mm_all_reduce-weight-quant", mm_all_reduce, {"weight_quant": True}, "x2.dtype", "int8"),
    ("ag_mm-m", tp_pair(ops.all_gather_matmul), {"m": 3}, "m", 3),
    ("ag_mm-k", tp_pair(ops.all_gather_matmul), {"k": 512}, "k", 512),
    ("ag_mm-n", tp_pair(ops.all_gather_matmul), {"n": 8}, "n", 8),
    ("ag_mm-tiling", tp_pair(ops.all_gather_matmul), {"tiling": "serial"}, "tiling", "serial"),
    ("ag_mm-dtype", tp_pair(ops.all_gather_matmul), {"dtype": FP16}, "x1.dtype", "float16"),
    ("mm_rs-m", tp_pair(ops.matmul_reduce_scatter), {"m": four_per_rank}, "m", four_per_rank),
    ("mm_rs-n", tp_pair(ops.matmul_reduce_scatter), {"n": 8}, "n", 8),
    ("mm_rs-tiling", tp_pair(ops.matmul_reduce_scatter), {"tiling": 2}, "tiling", "tiles=2"),
    ("mm_rs-dtype", tp_pair(ops.matmul_reduce_scatter), {"dtype": FP16}, "x1.dtype", "float16"),
    ("gmm_a2av-tiling", moe(ops.gmm_alltoallv), {"tiling": "serial"}, "tiling", "serial"),
    ("gmm_a2av-dtype", moe(ops.gmm_alltoallv), {"dtype": FP16}, "gmm_x.dtype", "float16"),
    ("gmm_a2av-e", moe(ops.gmm_alltoallv), {"e": 3}, "e", 3),
    ("gmm_a2av-H1", moe(ops.gmm_alltoallv), {"h1": 16}, "H1", 16),
    ("gmm_a2av-N1", moe(ops.gmm_alltoallv), {"n1": 6}, "N1", 6),
    (
        "gmm_a2av-shared",
        moe(ops.gmm_alltoallv),
        {"shared": True},
        "shared expert (H2, N2)",
        (8, 4),
    ),
    (
        "gmm_a2av-validate",
        moe(ops.gmm_alltoallv),
        {"validate_counts": False},
        "validate_counts",
        False,
    ),
    ("a2av_gmm-tiling", moe(ops.alltoallv_gmm), {"tiling": 2}, "tiling", "tiles=2"),
    ("a2av_gmm-e", moe(ops.alltoallv_gmm), {"e": 1}, "e", 1),
    ("a2av_gmm-N1", moe(ops.alltoallv_gmm), {"n1": 6}, "N1", 6),
    ("ifa-batch", ifa, {"b": 3}, "B", 3),
    ("ifa-heads", ifa, {"heads": 1}, "num_heads", 1),
    ("ifa-tiling", ifa, {"tiling": 2}, "tiling", "tiles=2"),
    ("check_counts-e", counts, {"e": 3}, "e", 3),
    ("different-op", other_op, {}, "op", "all_gather_matmul"),
]


@pytest.mark.parametrize(
    ("call", "change", "param", "value"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_a_mismatch_on_the_last_rank_raises_one_error_on_every_rank(
    comm: Communicator,
    call: Callable[[Communicator, bool, dict[str, Any]], None],
    change: dict[str, Any],
    param: str,
    value: object,
) -> None:
    last = comm.size - 1
    if callable(value):
        value = value(comm.size)
    start = time.monotonic()
    with pytest.raises(ParamInvalidError) as info:
        call(comm, comm.rank == last, change)
    seconds = time.monotonic() - start
    error = info.value
    assert error.code == 161002
    assert error.param == param
    assert error.value == {last: value}, "the disagreeing rank and its value"
    assert error.rank == last
    assert str(error).startswith(f"{param}={ {last: value}!r}: must be the same on every rank (")
    assert seconds < 10
    messages = comm.allgather_object(str(error))
    assert messages == [messages[0]] * comm.size, "the same error on every rank"
    comm.barrier()  # every rank left the op at the same point: the group is still usable


def test_the_same_call_on_every_rank_still_runs(comm: Communicator) -> None:
    # the fast path: nothing differs, the ops run and agree with a float64 golden
    x1 = torch.full((2, 16), 0.5, dtype=BF16)
    x2 = torch.ones(16, 4, dtype=BF16)
    out = ops.mm_all_reduce(x1, x2, comm, tiling=2)
    assert torch.equal(out.double(), torch.full((2, 4), 8.0 * comm.size, dtype=torch.float64))
    ones = [1] * (comm.size * 2)
    check_counts(comm, ones, list(ones), 2)
