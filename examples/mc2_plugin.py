"""An example implementation of MC2 operators for ``mc2sim check`` (bring your own kernel).

Each function has the signature of the matching op in :mod:`mc2sim.ops` (torch_npu-style
names): ``mc2sim check`` calls it on every rank with the scenario's inputs and checks its
output against the float64 golden, then times it beside mc2sim's own tilings::

    mpiexec -n 4 mc2sim check cal_mm_64x256x256 --set scale=small \
        --impl examples/mc2_plugin.py:mm_all_reduce --out results/plugin

It uses nothing of mc2sim but the communicator it is handed (``comm.allreduce``,
``comm.alltoallv``); a real plugin would call its own Triton/CUDA kernel and its own
collectives (NCCL, HCCL) instead. The arithmetic runs where the inputs are: with
``--device cuda`` on the GPU (mc2sim's MPI communicator stages device tensors through the
host). The arithmetic follows the ops' rounding points, which the
goldens model: each rank's product is rounded to the output dtype before the ranks' results
are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def mm_all_reduce(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Any,
    reduce_op: str = "sum",
    *,
    bias: torch.Tensor | None = None,
    **unused: Any,
) -> torch.Tensor:
    """MatmulAllReduce: ``allreduce(x1 @ x2 + bias)``, each rank's product in the out dtype."""
    if reduce_op != "sum":
        raise ValueError(f"reduce_op={reduce_op!r}: only 'sum'")
    local = x1.float() @ x2.float()
    if bias is not None:
        local += bias.float()
    return comm.allreduce(local.to(x1.dtype))  # rounded per rank, then summed


def gmm_alltoallv(
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Any,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    *,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GroupedMatMulAlltoAllv (the MoE combine): expert matmuls, then rows back to owners.

    ``gmm_x`` is expert-major (expert j's rows for rank 0, rank 1, ...);
    ``send_counts[q*e + j]`` rows of expert j go to rank q. The rows are sent rank-major,
    each rank's in expert order, and arrive ordered by (source rank, expert).
    """
    e = gmm_weight.shape[0]
    out = torch.empty(gmm_x.shape[0], gmm_weight.shape[2], dtype=gmm_x.dtype, device=gmm_x.device)
    start = 0
    for j in range(e):  # expert j's rows for every rank, one after another
        rows = sum(send_counts[q * e + j] for q in range(ep_world_size))
        block = gmm_x[start : start + rows].float() @ gmm_weight[j].float()
        out[start : start + rows] = block.to(gmm_x.dtype)
        start += rows
    # unpermute: expert-major -> rank-major (rank q's rows of expert 0, 1, ...)
    offsets = [0] * (e * ep_world_size)
    at = 0
    for j in range(e):
        for q in range(ep_world_size):
            offsets[q * e + j] = at
            at += send_counts[q * e + j]
    order = [out[offsets[i] : offsets[i] + send_counts[i]] for i in range(e * ep_world_size)]
    send = torch.cat(order)
    per_rank = [sum(send_counts[q * e : (q + 1) * e]) for q in range(ep_world_size)]
    from_rank = [sum(recv_counts[r * e : (r + 1) * e]) for r in range(ep_world_size)]
    y = comm.alltoallv(send, per_rank, from_rank)
    mm_y = None
    if mm_x is not None and mm_weight is not None:
        mm_y = (mm_x.float() @ mm_weight.float()).to(mm_x.dtype)
    return y, mm_y


def alltoallv_gmm(
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Any,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    *,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    permute_out_flag: bool = False,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """AlltoAllvGroupedMatMul (the MoE dispatch): rows to the experts' ranks, then matmuls.

    ``gmm_x`` is rank-major (rows for rank 0's experts 0..e-1, then rank 1's, ...); the rows
    arrive ordered by (source rank, expert) and are permuted to expert-major (expert j's
    rows from rank 0, rank 1, ...) before each expert's matmul.
    """
    e = gmm_weight.shape[0]
    per_rank = [sum(send_counts[q * e : (q + 1) * e]) for q in range(ep_world_size)]
    from_rank = [sum(recv_counts[r * e : (r + 1) * e]) for r in range(ep_world_size)]
    got = comm.alltoallv(gmm_x, per_rank, from_rank)  # by (source rank, expert)
    starts, at = {}, 0
    for r in range(ep_world_size):
        for j in range(e):
            starts[(r, j)] = at
            at += recv_counts[r * e + j]
    permuted = torch.cat(
        [
            got[starts[(r, j)] : starts[(r, j)] + recv_counts[r * e + j]]
            for j in range(e)
            for r in range(ep_world_size)
        ]
    )
    y = torch.empty(permuted.shape[0], gmm_weight.shape[2], dtype=gmm_x.dtype, device=gmm_x.device)
    at = 0
    for j in range(e):
        rows = sum(recv_counts[r * e + j] for r in range(ep_world_size))
        y[at : at + rows] = (permuted[at : at + rows].float() @ gmm_weight[j].float()).to(y.dtype)
        at += rows
    mm_y = None
    if mm_x is not None and mm_weight is not None:
        mm_y = (mm_x.float() @ mm_weight.float()).to(mm_x.dtype)
    return y, mm_y, permuted if permute_out_flag else None
