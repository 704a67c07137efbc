"""A bad parameter on one rank raises the same error on every rank, before any data moves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mc2sim import ops
from mc2sim.comm import Communicator
from mc2sim.errors import ParamInvalidError, ParamNullptrError

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

BF16 = torch.bfloat16


def moe(comm: Communicator, e: int = 2) -> dict[str, Any]:
    counts = [1] * (comm.size * e)
    return {
        "gmm_x": torch.ones(sum(counts), 8, dtype=BF16),
        "gmm_weight": torch.ones(e, 8, 4, dtype=BF16),
        "comm": comm,
        "ep_world_size": comm.size,
        "send_counts": counts,
        "recv_counts": list(counts),
    }


@pytest.mark.parametrize("op", [ops.gmm_alltoallv, ops.alltoallv_gmm], ids=["combine", "dispatch"])
def test_moe_error_on_the_last_rank_only(comm: Communicator, op: Callable[..., object]) -> None:
    args = moe(comm)
    last = comm.size - 1
    if comm.rank == last:
        args["gmm_weight"] = torch.ones(33, 8, 4, dtype=BF16)
    with pytest.raises(ParamInvalidError) as info:
        op(**args)
    assert info.value.code == 161002
    assert info.value.rank == last
    assert str(info.value) == "e=33: e must be in [1, 32]"
    # the group is still usable: every rank left the op at the same point
    y, _ = ops.gmm_alltoallv(**moe(comm))
    assert y.shape == (2 * comm.size, 4)


def test_moe_inconsistent_counts_across_ranks(comm: Communicator) -> None:
    args = moe(comm)
    if comm.rank == 0:  # rank 0 expects 2 rows of expert 1 from rank 1; rank 1 sends 1
        args["recv_counts"] = [1, 0, 1, 2, *([1] * (2 * comm.size - 4))]
    with pytest.raises(ParamInvalidError) as info:
        ops.gmm_alltoallv(**args)
    assert info.value.param == "recv_counts[1] on rank 0"
    assert "(receiver q=0, sender r=0, expert j=1)" in str(info.value)


def test_mm_all_reduce_null_on_rank_zero(comm: Communicator) -> None:
    x1 = torch.ones(2, 16, dtype=BF16)
    x2 = torch.ones(16, 4, dtype=torch.int8)
    scale = None if comm.rank == 0 else torch.ones(4, dtype=BF16)
    with pytest.raises(ParamNullptrError) as info:
        ops.mm_all_reduce(x1, x2, comm, antiquant_scale=scale)
    assert info.value.code == 161001
    assert info.value.rank == 0


def test_kernel_errors_are_agreed_too(comm: Communicator) -> None:
    # the group size is checked by the weight-quant kernel itself; only rank 1 breaks it
    x1 = torch.ones(2, 96, dtype=BF16)
    x2 = torch.ones(96, 4, dtype=torch.int8)
    group = 48 if comm.rank == 1 else 32
    scale = torch.ones(-(-96 // group), 4, dtype=BF16)
    with pytest.raises(ParamInvalidError, match="antiquant_group_size=48") as info:
        ops.mm_all_reduce(x1, x2, comm, antiquant_scale=scale, antiquant_group_size=group)
    assert info.value.rank == 1


@pytest.mark.parametrize(
    "op", [ops.all_gather_matmul, ops.matmul_reduce_scatter], ids=["ag_mm", "mm_rs"]
)
def test_tp_error_on_one_rank(comm: Communicator, op: Callable[..., object]) -> None:
    k = 255 if comm.rank == comm.size - 1 else 256
    x1 = torch.ones(2 * comm.size, k, dtype=BF16)
    x2 = torch.ones(k, 4, dtype=BF16)
    with pytest.raises(ParamInvalidError, match=r"k=255: k must be in \[256, 65534\]"):
        op(x1, x2, comm, comm.size)


def test_ifa_error_on_one_rank(comm: Communicator) -> None:
    block = 24 if comm.rank == comm.size - 1 else 16  # not a multiple of 16 on the last rank
    args: dict[str, Any] = {
        "query": torch.ones(2, 1, 64, dtype=BF16),
        "key_cache": torch.ones(4, block, 64, dtype=BF16),
        "value_cache": torch.ones(4, block, 64, dtype=BF16),
        "block_table": torch.arange(4, dtype=torch.int32).reshape(2, 2),
        "actual_seq_lengths": [3, 5],
        "num_heads": 2,
        "num_key_value_heads": 2,
        "block_size": block,
    }
    with pytest.raises(ParamInvalidError, match="block_size=24: must be a multiple of 16") as info:
        ops.ifa_decode(comm=comm, **args)
    assert info.value.rank == comm.size - 1
