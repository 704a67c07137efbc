"""PyTorch's symmetric-memory fused ops on CUDA GPUs: AllGatherMatmul and MatmulReduceScatter.

* :func:`fused_all_gather_matmul` is :func:`mc2sim.ops.all_gather_matmul`:
  ``torch.ops.symm_mem.fused_all_gather_matmul(A=x1, Bs=[x2], gather_dim=0, group_name)``
  returns the gathered ``A`` and ``[A @ x2]``: mc2sim's ``(out, gather_out)``.
* :func:`fused_matmul_reduce_scatter` is :func:`mc2sim.ops.matmul_reduce_scatter`:
  ``torch.ops.symm_mem.fused_matmul_reduce_scatter(A=x1, B=x2, reduce_op="sum",
  scatter_dim=0, group_name)``.

Both need CUDA, a GPU per rank on its host, and the ops (PyTorch 2.5 and later); their probe
says which is missing. On one rank they run too (the gather and the reduction are then
copies): a check of the kernel and the mapping, not of the overlap. Inputs on the CPU are
moved to this rank's GPU (``cuda:<local rank>``). The ranks join an NCCL group once
(:func:`mc2sim.adapters._dist.process_group`), with symmetric memory enabled for it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from mc2sim.adapters._dist import local_rank, move, process_group
from mc2sim.comm import Communicator

__all__ = ["fused_all_gather_matmul", "fused_matmul_reduce_scatter", "symm_mem_ops"]


def symm_mem_ops() -> Any:
    """``torch.ops.symm_mem`` (the fused ops' namespace); tests put a fake in its place.

    The fused ops are registered by ``torch.distributed._symmetric_memory`` when it is
    imported (``torch.library``), so it is imported first; without it the namespace is
    empty (seen with torch 2.11).
    """
    try:
        import torch.distributed._symmetric_memory  # noqa: F401 - registers the ops
    except ImportError:  # a build without torch.distributed: the probe says what is missing
        pass
    return torch.ops.symm_mem


def unavailable(comm: Communicator) -> str | None:
    """Why the symmetric-memory ops cannot run on these ranks, or None."""
    if not torch.cuda.is_available():
        return "the symmetric-memory fused ops need CUDA GPUs; torch.cuda.is_available() is False"
    if local_rank() >= torch.cuda.device_count():
        return (
            f"local rank {local_rank()} has no GPU of its own ({torch.cuda.device_count()} "
            "on this host)"
        )
    ops = symm_mem_ops()
    for name in ("fused_all_gather_matmul", "fused_matmul_reduce_scatter"):
        if not hasattr(ops, name):
            return f"torch.ops.symm_mem.{name} is missing (PyTorch {torch.__version__})"
    return None


def _group_name(comm: Communicator) -> str:
    """The NCCL group's name, symmetric memory enabled for it."""
    group = process_group(comm, "nccl")
    name: str = group.group_name
    from torch.distributed import _symmetric_memory as symm

    enable = getattr(symm, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed before PyTorch 2.9; deprecated (a no-op) since
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(name)
    return name


def _device() -> torch.device:
    return torch.device("cuda", local_rank())


def fused_all_gather_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    world_size: int,
    bias: torch.Tensor | None = None,
    gather_index: int = 0,
    gather_output: bool = True,
    comm_turn: int = 0,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AllGatherMatmul by ``torch.ops.symm_mem.fused_all_gather_matmul``.

    Args: those of :func:`mc2sim.ops.all_gather_matmul` (``gather_index`` only 0).

    Returns:
        ``(out, gather_out)``: ``(world_size * m, n)`` and the gathered x1 (or None).
    """
    if gather_index != 0:
        raise ValueError(f"gather_index={gather_index}: the fused op gathers x1 (0) only")
    device = _device()
    gathered, outs = symm_mem_ops().fused_all_gather_matmul(
        move(x1, device), [move(x2, device)], 0, _group_name(comm), return_A=gather_output
    )
    out = outs[0]
    if bias is not None:
        out = out + move(bias, device)
    return out, gathered if gather_output else None


def fused_matmul_reduce_scatter(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    world_size: int,
    reduce_op: str = "sum",
    bias: torch.Tensor | None = None,
    comm_turn: int = 0,
    **unused: Any,
) -> torch.Tensor:
    """MatmulReduceScatter by ``torch.ops.symm_mem.fused_matmul_reduce_scatter``.

    ``bias`` is in every rank's product, so the reduced rows hold it ``world_size`` times.

    Args: those of :func:`mc2sim.ops.matmul_reduce_scatter`.

    Returns:
        ``(m / world_size, n)``: this rank's rows of the reduced product.
    """
    device = _device()
    out: torch.Tensor = symm_mem_ops().fused_matmul_reduce_scatter(
        move(x1, device), move(x2, device), reduce_op, 0, _group_name(comm)
    )
    if bias is not None:
        out = out + world_size * move(bias, device)
    return out


fused_all_gather_matmul.unavailable = unavailable  # type: ignore[attr-defined]
fused_matmul_reduce_scatter.unavailable = unavailable  # type: ignore[attr-defined]
