"""MatmulAllReduce rounds each rank's partial result to the output dtype before the reduction.

The kernel writes every tile's product (then ``+ x3``) to global memory in the output dtype
and the AllReduce reduces those fp16/bf16 tiles (hicann/ops-transformer
``mc2/matmul_all_reduce/op_kernel/arch32/matmul_all_reduce_910_general.h``: the matmul's C
type is ``DTYPE_Y``; ``matmul_all_reduce_base.h``: ``hccl_.AllReduce(cGM, ..., HCCL_DATA_TYPE)``
after ``Matmul_All_Reduce_Add_X3<yType>`` on ``cGM``). Float32 throughout, then one rounding
of the sum, gives other values; these tests fail if the op did that.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mc2sim.comm import Completed
from mc2sim.ops import mm_all_reduce

TINY = 2.0**-11
"""Half an ulp of 1.0 in float16: 1 + TINY is a tie that rounds (to even) to 1.0."""


class RankZeroOfTwo:
    """Rank 0 of two ranks whose rank 1 contributes ``other`` (already in the wire dtype).

    The reduction adds the two 16-bit tensors in float32 and rounds once, as MPI/gloo do;
    what reaches it from rank 0 is whatever the op hands over.
    """

    backend = "test"
    rank = 0
    size = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.seen: list[torch.Tensor] = []

    def allreduce(self, t: torch.Tensor, op: str = "sum", *, out: Any = None) -> torch.Tensor:
        return t.clone()  # the ranks' agreement on errors (no error anywhere)

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj, obj]

    def iallreduce(self, t: torch.Tensor, op: str = "sum", *, out: Any = None) -> Completed:
        self.seen.append(t.clone())
        total = (t.float() + self.other.float()).to(t.dtype)
        return Completed(total if out is None else out.copy_(total))

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_each_ranks_partial_is_rounded_before_the_allreduce(dtype: torch.dtype) -> None:
    # rank 0's product is 1 + u (a tie, rounds to 1.0); rank 1 contributes u, u = half an ulp
    u = torch.finfo(dtype).eps / 2
    x1 = torch.tensor([[1.0, u]], dtype=dtype)
    x2 = torch.tensor([[1.0], [1.0]], dtype=dtype)
    comm = RankZeroOfTwo(other=torch.tensor([[u]], dtype=dtype))
    out = mm_all_reduce(x1, x2, comm, tiling="serial")  # type: ignore[arg-type]
    assert comm.seen[0].dtype == dtype and comm.seen[0].item() == 1.0  # rounded partial
    assert out.item() == 1.0  # round(round(1 + u) + u) = round(1 + u) = 1
    assert out.item() != (1.0 + 2 * u)  # float32 throughout: 1 + 2u, one ulp up


def test_x3_is_added_to_the_rounded_product_and_rounded_again() -> None:
    dtype = torch.float16
    x1 = torch.tensor([[1.0, TINY]], dtype=dtype)
    x2 = torch.tensor([[1.0], [1.0]], dtype=dtype)
    x3 = torch.tensor([[TINY]], dtype=dtype)
    comm = RankZeroOfTwo(other=torch.zeros(1, 1, dtype=dtype))
    out = mm_all_reduce(x1, x2, comm, x3=x3, tiling="serial")  # type: ignore[arg-type]
    # device: round(round(1 + TINY) + TINY) = 1.0; float32 throughout: 1 + 2 TINY = 1 + 2**-10
    assert out.item() == 1.0
