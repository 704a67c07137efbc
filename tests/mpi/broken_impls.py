"""Deliberately broken implementations of MC2 ops, each with one bug ``mc2sim check`` must catch.

Each has the signature of its op in :mod:`mc2sim.ops`. Beside them, correct versions of the
same arithmetic (``*_correct``), so a test sees the check pass the fix and fail the bug.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mc2sim.study.check import Unavailable


def _dispatch(
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Any,
    world: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    mm_x: torch.Tensor | None,
    mm_weight: torch.Tensor | None,
    *,
    expert_order: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    e = gmm_weight.shape[0]
    per_rank = [sum(send_counts[q * e : (q + 1) * e]) for q in range(world)]
    from_rank = [sum(recv_counts[r * e : (r + 1) * e]) for r in range(world)]
    got = comm.alltoallv(gmm_x, per_rank, from_rank)  # by (source rank, expert)
    chunks: dict[tuple[int, int], torch.Tensor] = {}
    at = 0
    for r in range(world):
        for j in range(e):
            chunks[(r, j)] = got[at : at + recv_counts[r * e + j]]
            at += recv_counts[r * e + j]
    order = (
        [(r, j) for j in range(e) for r in range(world)]  # expert-major: the op's
        if expert_order
        else [(r, j) for r in range(world) for j in range(e)]  # BUG: left in rank order
    )
    y = torch.cat(
        [(chunks[key].float() @ gmm_weight[key[1]].float()).to(gmm_x.dtype) for key in order]
    )
    mm_y = None
    if mm_x is not None and mm_weight is not None:
        mm_y = (mm_x.float() @ mm_weight.float()).to(mm_x.dtype)
    return y, mm_y, None


def dispatch_correct(
    gmm_x: torch.Tensor, gmm_weight: torch.Tensor, comm: Any, ep_world_size: int,
    send_counts: Sequence[int], recv_counts: Sequence[int], *, mm_x: Any = None,
    mm_weight: Any = None, **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # fmt: skip
    """AlltoAllvGroupedMatMul, its output expert-major as the op's."""
    return _dispatch(
        gmm_x, gmm_weight, comm, ep_world_size, send_counts, recv_counts, mm_x, mm_weight,
        expert_order=True,
    )  # fmt: skip


def dispatch_rank_order(
    gmm_x: torch.Tensor, gmm_weight: torch.Tensor, comm: Any, ep_world_size: int,
    send_counts: Sequence[int], recv_counts: Sequence[int], *, mm_x: Any = None,
    mm_weight: Any = None, **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # fmt: skip
    """BUG: the received experts' rows are left in rank order instead of expert order."""
    return _dispatch(
        gmm_x, gmm_weight, comm, ep_world_size, send_counts, recv_counts, mm_x, mm_weight,
        expert_order=False,
    )  # fmt: skip


def mm_rounded_per_rank(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """MatmulAllReduce: each rank's product rounded to the output dtype, then summed."""
    out: torch.Tensor = comm.allreduce((x1.float() @ x2.float()).to(x1.dtype))
    return out


def mm_no_rounding(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: the ranks' float32 products are summed, rounded once at the end (no per-rank)."""
    out: torch.Tensor = comm.allreduce(x1.float() @ x2.float()).to(x1.dtype)
    return out


def _group_quant(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, scale: torch.Tensor, offset: torch.Tensor,
    g: int, *, right: bool,
) -> torch.Tensor:  # fmt: skip
    k = x2.shape[0]
    rows = torch.arange(k, device=x2.device)
    group = rows // g if right else rows % scale.shape[0]  # BUG: modulo for division
    dtype = x1.dtype  # each antiquant step is stored in x1's dtype, as the device does
    w = ((x2.to(dtype) + offset[group]).to(dtype) * scale[group]).to(dtype)
    out: torch.Tensor = comm.allreduce((x1.float() @ w.float()).to(dtype))
    return out


def group_quant_correct(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", *,
    antiquant_scale: torch.Tensor, antiquant_offset: torch.Tensor, antiquant_group_size: int,
    **unused: Any,
) -> torch.Tensor:  # fmt: skip
    """WeightQuantMatmulAllReduce, per-group: weight row kk uses scale row kk // g."""
    return _group_quant(
        x1, x2, comm, antiquant_scale, antiquant_offset, antiquant_group_size, right=True
    )


def group_quant_wrong_index(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", *,
    antiquant_scale: torch.Tensor, antiquant_offset: torch.Tensor, antiquant_group_size: int,
    **unused: Any,
) -> torch.Tensor:  # fmt: skip
    """BUG: weight row kk uses scale row kk % groups instead of kk // g."""
    return _group_quant(
        x1, x2, comm, antiquant_scale, antiquant_offset, antiquant_group_size, right=False
    )


def short_on_last_rank(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: the last rank returns one row fewer."""
    out = mm_rounded_per_rank(x1, x2, comm)
    return out[:-1] if comm.rank == comm.size - 1 else out


def float32_on_last_rank(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: the last rank returns float32 instead of the op's dtype."""
    out = mm_rounded_per_rank(x1, x2, comm)
    return out.float() if comm.rank == comm.size - 1 else out


def tensor_for_tuple(
    gmm_x: torch.Tensor, gmm_weight: torch.Tensor, comm: Any, ep_world_size: int,
    send_counts: Sequence[int], recv_counts: Sequence[int], **unused: Any,
) -> torch.Tensor:  # fmt: skip
    """BUG: returns the grouped matmul's output alone, not the op's tuple."""
    return dispatch_correct(gmm_x, gmm_weight, comm, ep_world_size, send_counts, recv_counts)[0]


def raises_everywhere(x1: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """BUG: raises on every rank."""
    raise ValueError("boom")


def raises_on_last_rank(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: the last rank raises before the AllReduce the others wait in."""
    if comm.rank == comm.size - 1:
        raise ValueError("boom on the last rank")
    return mm_rounded_per_rank(x1, x2, comm)


def hangs_on_last_rank(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: the last rank never returns (it sleeps); the others return."""
    if comm.rank == comm.size - 1:
        time.sleep(600)
    return (x1.float() @ x2.float()).to(x1.dtype)


def hangs_everywhere(x1: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """BUG: never returns on any rank."""
    time.sleep(600)
    raise AssertionError("unreachable")


def not_here(x1: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Unavailable on every rank (its library is missing, say)."""
    raise Unavailable("needs libfoo, which is not installed")


def probed_away(x1: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Never called: its probe says the last rank lacks a device."""
    raise AssertionError("the probe should have skipped it")


def _probe(comm: Any) -> str | None:
    return "no device here" if comm.rank == comm.size - 1 else None


probed_away.unavailable = _probe  # type: ignore[attr-defined]


def writes_into_x1(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """Correct output, but it scribbles over its input afterwards."""
    out = mm_rounded_per_rank(x1, x2, comm)
    x1.fill_(7)
    return out


def exits_everywhere(x1: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """BUG: calls sys.exit on every rank (a script's habit)."""
    raise SystemExit(3)


def meta_output(
    x1: torch.Tensor, x2: torch.Tensor, comm: Any, reduce_op: str = "sum", **unused: Any
) -> torch.Tensor:
    """BUG: returns a tensor of the right shape and dtype with no data (the meta device)."""
    return torch.empty(x1.shape[0], x2.shape[1], dtype=x1.dtype, device="meta")
