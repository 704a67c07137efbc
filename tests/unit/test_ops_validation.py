"""One test per validation rule of the fused ops, for any world size, without MPI.

``SameOnEveryRank`` stands for a group whose ranks all pass the same arguments, so each
op's local checks and their agreement run as on a real group; the collectives that move
data refuse to run, proving every error is raised before any data moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch

from mc2sim import ops
from mc2sim.errors import AclnnError, ParamInvalidError, ParamNullptrError

from .fakes import SameOnEveryRank

BF16 = torch.bfloat16
NULL, INVALID = ParamNullptrError, ParamInvalidError


def moe_args(
    world: int = 2, e: int = 2, h1: int = 8, n1: int = 4, rows_per_block: int = 2
) -> dict[str, Any]:
    """Valid combine-direction arguments: every (rank, expert) block has the same rows."""
    counts = [rows_per_block] * (world * e)
    return {
        "gmm_x": torch.zeros(sum(counts), h1, dtype=BF16),
        "gmm_weight": torch.zeros(e, h1, n1, dtype=BF16),
        "comm": SameOnEveryRank(world),
        "ep_world_size": world,
        "send_counts": counts,
        "recv_counts": list(counts),
    }


def with_shared(args: dict[str, Any], bs: int, h2: int = 6, n2: int = 3) -> dict[str, Any]:
    return {
        **args,
        "mm_x": torch.zeros(bs, h2, dtype=BF16),
        "mm_weight": torch.zeros(h2, n2, dtype=BF16),
    }


MOE_CASES: list[tuple[str, Any, type[AclnnError], str]] = [
    ("gmm_x None", lambda a: {**a, "gmm_x": None}, NULL, "gmm_x"),
    ("gmm_weight None", lambda a: {**a, "gmm_weight": None}, NULL, "gmm_weight"),
    ("send_counts None", lambda a: {**a, "send_counts": None}, NULL, "send_counts"),
    ("recv_counts None", lambda a: {**a, "recv_counts": None}, NULL, "recv_counts"),
    (
        "send_counts_tensor given",
        lambda a: {**a, "send_counts_tensor": torch.tensor(a["send_counts"])},
        INVALID,
        "send_counts_tensor",
    ),
    (
        "recv_counts_tensor given",
        lambda a: {**a, "recv_counts_tensor": torch.tensor(a["recv_counts"])},
        INVALID,
        "recv_counts_tensor",
    ),
    ("trans flag not bool", lambda a: {**a, "trans_gmm_weight": 1}, INVALID, "trans_gmm_weight"),
    ("gmm_x float32", lambda a: {**a, "gmm_x": a["gmm_x"].float()}, INVALID, "gmm_x.dtype"),
    (
        "weight dtype differs",
        lambda a: {**a, "gmm_weight": a["gmm_weight"].half()},
        INVALID,
        "gmm_weight.dtype",
    ),
    ("gmm_x 3-D", lambda a: {**a, "gmm_x": a["gmm_x"][None]}, INVALID, "gmm_x.shape"),
    ("weight 2-D", lambda a: {**a, "gmm_weight": a["gmm_weight"][0]}, INVALID, "gmm_weight.shape"),
    ("ep_world_size", lambda a: {**a, "ep_world_size": 4}, INVALID, "ep_world_size"),
    ("e > 32", lambda a: {**a, "gmm_weight": torch.zeros(33, 8, 4, dtype=BF16)}, INVALID, "e=33"),
    (
        "len(send_counts)",
        lambda a: {**a, "send_counts": a["send_counts"][:-1]},
        INVALID,
        "len(send_counts)",
    ),
    (
        "negative count",
        lambda a: {**a, "recv_counts": [-1, *a["recv_counts"][1:]]},
        INVALID,
        "recv_counts[0]",
    ),
    ("H1 > 65535", lambda a: {**moe_args(h1=65536)}, INVALID, "H1"),
    (
        "weight H mismatch",
        lambda a: {**a, "gmm_weight": torch.zeros(2, 9, 4, dtype=BF16)},
        INVALID,
        "gmm_weight.shape",
    ),
    ("N1 > 65535", lambda a: {**moe_args(h1=1, n1=65536)}, INVALID, "N1"),
    ("rows != A", lambda a: {**a, "gmm_x": a["gmm_x"][1:]}, INVALID, "gmm_x.shape[0]"),
    (
        "BSK = 0",
        lambda a: {**a, "recv_counts": [0] * len(a["recv_counts"])},
        INVALID,
        "BSK = sum(recv_counts)",
    ),
    (
        "mm_x without mm_weight",
        lambda a: {**a, "mm_x": torch.zeros(4, 6, dtype=BF16)},
        INVALID,
        "mm_x, mm_weight",
    ),
    (
        "mm_x dtype",
        lambda a: {**with_shared(a, 4), "mm_x": torch.zeros(4, 6, dtype=torch.float16)},
        INVALID,
        "mm_x.dtype",
    ),
    ("H2 > 12288", lambda a: with_shared(a, 4, h2=12289), INVALID, "H2"),
    (
        "mm_weight H mismatch",
        lambda a: {**with_shared(a, 4), "mm_weight": torch.zeros(7, 3, dtype=BF16)},
        INVALID,
        "mm_weight.shape",
    ),
    ("N2 > 65535", lambda a: with_shared(a, 4, h2=1, n2=65536), INVALID, "N2"),
    ("K = 1", lambda a: with_shared(a, 8), INVALID, "K = BSK / BS"),
    ("K = 8/3", lambda a: with_shared(a, 3), INVALID, "K = BSK / BS"),
    ("strict unknown", lambda a: {**a, "strict": "A9"}, INVALID, "strict"),
    ("strict A3 world size", lambda a: {**a, "strict": "A3"}, INVALID, "ep_world_size"),
]


@pytest.mark.parametrize("op", [ops.gmm_alltoallv, ops.alltoallv_gmm], ids=["combine", "dispatch"])
@pytest.mark.parametrize(
    ("why", "change", "error", "param"), MOE_CASES, ids=[c[0] for c in MOE_CASES]
)
def test_moe_rules(
    op: Callable[..., object],
    why: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    error: type[AclnnError],
    param: str,
) -> None:
    args = change(moe_args())
    if op is ops.alltoallv_gmm and why == "BSK = 0":
        args = {**args, "send_counts": [0] * 4, "gmm_x": args["gmm_x"][:0]}
        param = "BSK = sum(send_counts)"
    with pytest.raises(error) as info:
        op(**args)
    assert info.value.code == error.code
    assert str(info.value).startswith(param), str(info.value)


def _validate_only(op: Callable[..., object], args: dict[str, Any]) -> None:
    """Run ``op`` until it tries to move data: its validation passed."""
    with pytest.raises(AssertionError, match="before any data moves"):
        op(**args)


def test_moe_top_k_bounds_are_inclusive() -> None:
    args = moe_args()  # BSK = 8 rows
    for bs in (1, 4):  # K = 8 and K = 2 are allowed
        _validate_only(ops.gmm_alltoallv, with_shared(args, bs))
    with pytest.raises(INVALID, match=r"whole number in \[2, 8\]"):
        ops.gmm_alltoallv(**with_shared(args, 16))


def test_moe_e_times_world_at_most_256() -> None:
    # 16 ranks x 17 experts = 272 > 256 (e itself is within 32)
    args = moe_args(world=16, e=17, rows_per_block=1)
    with pytest.raises(
        INVALID, match=r"e \* ep_world_size=272: e \* ep_world_size must be in \[1, 256\]"
    ):
        ops.gmm_alltoallv(**args)
    _validate_only(ops.gmm_alltoallv, moe_args(world=8, e=32, rows_per_block=1))


def test_moe_strict_a3_traffic_window() -> None:
    # 8 ranks: allowed by A3, but 2 rows x H1=8 x 2 bytes per peer is far below 2 MB
    args = moe_args(world=8, e=1)
    with pytest.raises(
        INVALID, match=r"traffic to rank 0=32: .* must be in \[2097152, 104857600\]"
    ):
        ops.gmm_alltoallv(**args, strict="A3")
    big = moe_args(world=8, e=1, h1=1024, rows_per_block=1024)  # 2 MiB per peer
    _validate_only(ops.gmm_alltoallv, {**big, "strict": "A3"})


def test_moe_counts_invariant_is_checked() -> None:
    # on a group whose ranks all send the same, rank 0's recv must equal its send pattern
    args = moe_args()
    args["recv_counts"] = [3, 1, 2, 2]  # same total, different split
    with pytest.raises(INVALID, match="receiver q=0, sender r=0, expert j=0"):
        ops.gmm_alltoallv(**args)


# -- tensor parallel ------------------------------------------------------------------------


def mm_args(**over: Any) -> dict[str, Any]:
    return {
        "x1": torch.zeros(4, 16, dtype=BF16),
        "x2": torch.zeros(16, 8, dtype=BF16),
        "comm": SameOnEveryRank(2),
        **over,
    }


I8 = torch.int8
MM_CASES: list[tuple[str, dict[str, Any], type[AclnnError], str]] = [
    ("x1 None", {"x1": None}, NULL, "x1"),
    ("x2 None", {"x2": None}, NULL, "x2"),
    ("reduce_op", {"reduce_op": "max"}, INVALID, "reduce_op"),
    ("comm_turn", {"comm_turn": 1}, INVALID, "comm_turn"),
    ("x1 float32", {"x1": torch.zeros(4, 16)}, INVALID, "x1.dtype"),
    ("x2 float32", {"x2": torch.zeros(16, 8)}, INVALID, "x2.dtype"),
    ("x1 1-D", {"x1": torch.zeros(16, dtype=BF16)}, INVALID, "x1.shape"),
    ("float with antiquant", {"antiquant_scale": torch.ones(1, dtype=BF16)}, INVALID, "antiquant_scale"),
    ("float with dequant", {"dequant_scale": torch.ones(1)}, INVALID, "dequant_scale"),
    ("k > 65535", {"x1": torch.zeros(1, 65536, dtype=BF16), "x2": torch.zeros(65536, 1, dtype=BF16)}, INVALID, "k"),
    ("n > 65535", {"x1": torch.zeros(1, 1, dtype=BF16), "x2": torch.zeros(1, 65536, dtype=BF16)}, INVALID, "n"),
    ("k mismatch", {"x2": torch.zeros(15, 8, dtype=BF16)}, INVALID, "x2.shape"),
    ("weight quant without scale", {"x2": torch.zeros(16, 8, dtype=I8)}, NULL, "antiquant_scale"),
    (
        "weight quant with dequant",
        {"x2": torch.zeros(16, 8, dtype=I8), "antiquant_scale": torch.ones(1, dtype=BF16), "dequant_scale": torch.ones(1)},
        INVALID,
        "dequant_scale",
    ),
    (
        "weight quant group size",
        {"x1": torch.zeros(2, 96, dtype=BF16), "x2": torch.zeros(96, 8, dtype=I8),
         "antiquant_scale": torch.ones(2, 8, dtype=BF16), "antiquant_group_size": 48},
        INVALID,
        "antiquant_group_size",
    ),
    ("quant without dequant", {"x1": torch.zeros(4, 16, dtype=I8), "x2": torch.zeros(16, 8, dtype=I8)}, NULL, "dequant_scale"),
    (
        "quant with antiquant",
        {"x1": torch.zeros(4, 16, dtype=I8), "x2": torch.zeros(16, 8, dtype=I8),
         "dequant_scale": torch.ones(1), "antiquant_scale": torch.ones(1, dtype=BF16)},
        INVALID,
        "antiquant_scale",
    ),
    ("quant x2 not int8", {"x1": torch.zeros(4, 16, dtype=I8)}, INVALID, "x2.dtype"),
    ("x3 dtype", {"x3": torch.zeros(4, 8, dtype=torch.float16)}, INVALID, "x3.dtype"),
    ("x3 shape", {"x3": torch.zeros(4, 9, dtype=BF16)}, INVALID, "x3.shape"),
    ("bias shape", {"bias": torch.zeros(9, dtype=BF16)}, INVALID, "bias.shape"),
    ("strict world size", {"comm": SameOnEveryRank(3), "strict": "A2"}, INVALID, "world_size=3"),
]  # fmt: skip


@pytest.mark.parametrize(("why", "over", "error", "param"), MM_CASES, ids=[c[0] for c in MM_CASES])
def test_mm_all_reduce_rules(
    why: str, over: dict[str, Any], error: type[AclnnError], param: str
) -> None:
    with pytest.raises(error) as info:
        ops.mm_all_reduce(**mm_args(**over))
    assert info.value.code == error.code
    assert str(info.value).startswith(param), str(info.value)


def tp_args(**over: Any) -> dict[str, Any]:
    return {
        "x1": torch.zeros(4, 256, dtype=BF16),
        "x2": torch.zeros(256, 8, dtype=BF16),
        "comm": SameOnEveryRank(2),
        "world_size": 2,
        **over,
    }


TP_CASES: list[tuple[str, dict[str, Any], type[AclnnError], str]] = [
    ("x1 None", {"x1": None}, NULL, "x1"),
    ("x2 None", {"x2": None}, NULL, "x2"),
    ("x1 int8", {"x1": torch.zeros(4, 256, dtype=I8)}, INVALID, "x1.dtype"),
    ("x2 dtype", {"x2": torch.zeros(256, 8, dtype=torch.float16)}, INVALID, "x2.dtype"),
    ("x1 3-D", {"x1": torch.zeros(1, 4, 256, dtype=BF16)}, INVALID, "x1.shape"),
    ("k < 256", {"x1": torch.zeros(4, 255, dtype=BF16), "x2": torch.zeros(255, 8, dtype=BF16)}, INVALID, "k=255"),
    ("k mismatch", {"x2": torch.zeros(257, 8, dtype=BF16)}, INVALID, "x2.shape"),
    ("world_size", {"world_size": 4}, INVALID, "world_size=4"),
    ("comm_turn", {"comm_turn": 2}, INVALID, "comm_turn"),
    ("bias dtype", {"bias": torch.zeros(8)}, INVALID, "bias.dtype"),
    ("bias shape", {"bias": torch.zeros(1, 8, dtype=BF16)}, INVALID, "bias.shape"),
    ("strict A2", {"comm": SameOnEveryRank(16), "world_size": 16, "strict": "A2"}, INVALID, "world_size=16"),
    ("strict A3", {"comm": SameOnEveryRank(3), "world_size": 3, "strict": "A3"}, INVALID, "world_size=3"),
]  # fmt: skip


@pytest.mark.parametrize(("why", "over", "error", "param"), TP_CASES, ids=[c[0] for c in TP_CASES])
@pytest.mark.parametrize(
    "op", [ops.all_gather_matmul, ops.matmul_reduce_scatter], ids=["ag_mm", "mm_rs"]
)
def test_tp_rules(
    op: Callable[..., object], why: str, over: dict[str, Any], error: type[AclnnError], param: str
) -> None:
    with pytest.raises(error) as info:
        op(**tp_args(**over))
    assert info.value.code == error.code
    assert str(info.value).startswith(param), str(info.value)


def test_tp_op_specific_rules() -> None:
    with pytest.raises(INVALID, match="gather_index=1"):
        ops.all_gather_matmul(**tp_args(), gather_index=1)
    with pytest.raises(INVALID, match="gather_output=1"):
        ops.all_gather_matmul(**tp_args(), gather_output=cast(Any, 1))
    with pytest.raises(INVALID, match="reduce_op='max'"):
        ops.matmul_reduce_scatter(**tp_args(), reduce_op="max")
    with pytest.raises(INVALID, match=r"x1.shape\[0\]=5: must be a multiple of world_size"):
        ops.matmul_reduce_scatter(**tp_args(x1=torch.zeros(5, 256, dtype=BF16)))
    with pytest.raises(INVALID, match="permute_out_flag"):
        ops.alltoallv_gmm(**moe_args(), permute_out_flag=cast(Any, "yes"))
