"""torch_npu's MC2 and quantised ops on Ascend NPUs, as mc2sim's ops.

Each function has the signature of an op of :mod:`mc2sim.ops` and calls torch_npu's with
mc2sim's arguments under torch_npu's names (the communicator becomes ``hcom``, the HCCL
group's name):

=============================  ====================================================
mc2sim op                      adapter (torch_npu call)
=============================  ====================================================
``mm_all_reduce``              :func:`npu_mm_all_reduce_base`
``mm_all_reduce`` (w8a8)       :func:`npu_quant_matmul` (``npu_quant_matmul``, then an
                               HCCL AllReduce of each rank's output)
``mm_all_reduce`` (weight      :func:`npu_weight_quant_batchmatmul`
int8/int4)                     (``npu_weight_quant_batchmatmul``, then an AllReduce)
``gmm_alltoallv``              :func:`npu_gmm_alltoallv`
``alltoallv_gmm``              :func:`npu_alltoallv_gmm`
``ifa`` (``ifa_decode``)       :func:`npu_incre_flash_attention` (BSH, page attention)
=============================  ====================================================

They need torch_npu and an NPU per rank on its host (the probe says which is missing).
Inputs on the CPU are moved to this rank's NPU. The ranks join an HCCL group once
(:func:`mc2sim.adapters._dist.process_group`); its name is ``hcom``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from mc2sim.adapters._dist import local_rank, move, process_group
from mc2sim.comm import Communicator

__all__ = [
    "hcom_of",
    "library",
    "npu_alltoallv_gmm",
    "npu_gmm_alltoallv",
    "npu_incre_flash_attention",
    "npu_mm_all_reduce_base",
    "npu_quant_matmul",
    "npu_weight_quant_batchmatmul",
]


def library() -> Any:
    """The ``torch_npu`` module (imported here; tests put a fake in ``sys.modules``)."""
    return importlib.import_module("torch_npu")


def unavailable(comm: Communicator) -> str | None:
    """Why torch_npu's ops cannot run on these ranks, or None."""
    try:
        npu = library()
    except ImportError as exc:
        return f"torch_npu is not installed ({exc})"
    try:
        count = int(npu.npu.device_count())
    except Exception as exc:  # noqa: BLE001 - any failure to see the devices is the reason
        return f"torch_npu sees no NPU ({type(exc).__name__}: {exc})"
    if local_rank() >= count:
        return f"local rank {local_rank()} has no NPU of its own ({count} on this host)"
    return None


def _device() -> torch.device:
    """This rank's NPU (torch knows the ``npu`` device once torch_npu is imported)."""
    library()
    return torch.device(f"npu:{local_rank()}")


def hcom_of(comm: Communicator) -> str:
    """The HCCL communicator name of the group over ``comm``'s ranks (torch_npu's ``hcom``)."""
    group = process_group(comm, "hccl")
    backend = group._get_backend(_device())
    name: str = backend.get_hccl_comm_name(comm.rank)
    return name


def _on(device: torch.device, **tensors: Any) -> dict[str, Any]:
    return {k: move(v, device) for k, v in tensors.items()}


def npu_mm_all_reduce_base(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    reduce_op: str = "sum",
    *,
    bias: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
    dequant_scale: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    comm_turn: int = 0,
    x2_shape: Sequence[int] | None = None,
    x2_transposed: bool = False,
    **unused: Any,
) -> torch.Tensor:
    """MatmulAllReduce by ``torch_npu.npu_mm_all_reduce_base`` (every mode it offers).

    Args: those of :func:`mc2sim.ops.mm_all_reduce` (an ND ``x2``: ``x2_shape`` and
        ``x2_transposed`` describe mc2sim's FRACTAL_NZ storage, which this adapter does not
        convert).

    Returns:
        ``allreduce(x1 @ x2' + bias + x3)``, the same on every rank.
    """
    if x2_shape is not None or x2_transposed:
        raise ValueError("x2_shape/x2_transposed (a FRACTAL_NZ x2) is not mapped: pass an ND x2")
    device = _device()
    optional = _on(
        device, bias=bias, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        x3=x3, dequant_scale=dequant_scale,
    )  # fmt: skip
    if pertoken_scale is not None:  # older torch_npu has no such keyword
        optional["pertoken_scale"] = move(pertoken_scale, device)
    out: torch.Tensor = library().npu_mm_all_reduce_base(
        move(x1, device), move(x2, device), hcom_of(comm), reduce_op=reduce_op,
        comm_turn=comm_turn, antiquant_group_size=antiquant_group_size, **optional,
    )  # fmt: skip
    return out


def _all_reduce(comm: Communicator, y: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(y, group=process_group(comm, "hccl"))
    return y


def npu_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    reduce_op: str = "sum",
    *,
    bias: torch.Tensor | None = None,
    x3: torch.Tensor | None = None,
    dequant_scale: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    **unused: Any,
) -> torch.Tensor:
    """QuantMatmulAllReduce (w8a8) as ``torch_npu.npu_quant_matmul`` then an HCCL AllReduce.

    ``dequant_scale`` is torch_npu's ``scale``; the output dtype is mc2sim's: bfloat16 with
    a bfloat16 scale, else x3's dtype if given, else float16. ``x3`` is added on each rank
    before the AllReduce, as the fused op's formula says.

    Args: those of :func:`mc2sim.ops.mm_all_reduce` in quant mode.

    Returns:
        The reduced output, the same on every rank.
    """
    if dequant_scale is None:
        raise ValueError("dequant_scale is required (quant mode)")
    if reduce_op != "sum":
        raise ValueError(f"reduce_op={reduce_op!r}: only 'sum'")
    device = _device()
    if dequant_scale.dtype == torch.bfloat16:
        dtype = torch.bfloat16
    elif x3 is not None and x3.dtype in (torch.float16, torch.bfloat16):
        dtype = x3.dtype
    else:
        dtype = torch.float16
    y: torch.Tensor = library().npu_quant_matmul(
        move(x1, device), move(x2, device), move(dequant_scale, device),
        pertoken_scale=move(pertoken_scale, device), bias=move(bias, device), output_dtype=dtype,
    )  # fmt: skip
    if x3 is not None:
        y = y + move(x3, device)
    return _all_reduce(comm, y)


def npu_weight_quant_batchmatmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    reduce_op: str = "sum",
    *,
    bias: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    x3: torch.Tensor | None = None,
    **unused: Any,
) -> torch.Tensor:
    """WeightQuantMatmulAllReduce as ``torch_npu.npu_weight_quant_batchmatmul`` + AllReduce.

    mc2sim's ``x1`` is torch_npu's ``x`` and ``x2`` its ``weight`` (int8, or int4 packed in
    int32); the antiquant scale, offset and group size keep their names.

    Args: those of :func:`mc2sim.ops.mm_all_reduce` in weight-quant mode.

    Returns:
        The reduced output, the same on every rank.
    """
    if antiquant_scale is None:
        raise ValueError("antiquant_scale is required (weight-quant mode)")
    if reduce_op != "sum":
        raise ValueError(f"reduce_op={reduce_op!r}: only 'sum'")
    device = _device()
    y: torch.Tensor = library().npu_weight_quant_batchmatmul(
        move(x1, device), move(x2, device), move(antiquant_scale, device),
        antiquant_offset=move(antiquant_offset, device), bias=move(bias, device),
        antiquant_group_size=antiquant_group_size,
    )  # fmt: skip
    if x3 is not None:
        y = y + move(x3, device)
    return _all_reduce(comm, y)


def _moe_args(
    device: torch.device,
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    send_counts_tensor: torch.Tensor | None,
    recv_counts_tensor: torch.Tensor | None,
    mm_x: torch.Tensor | None,
    mm_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    return (
        move(gmm_x, device),
        move(gmm_weight, device),
        _on(
            device,
            send_counts_tensor=send_counts_tensor,
            recv_counts_tensor=recv_counts_tensor,
            mm_x=mm_x,
            mm_weight=mm_weight,
        ),  # fmt: skip
    )


def npu_gmm_alltoallv(
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Communicator,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    *,
    send_counts_tensor: torch.Tensor | None = None,
    recv_counts_tensor: torch.Tensor | None = None,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    trans_gmm_weight: bool = False,
    trans_mm_weight: bool = False,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GroupedMatMulAlltoAllv by ``torch_npu.npu_gmm_alltoallv`` (the same names).

    Args: those of :func:`mc2sim.ops.gmm_alltoallv`.

    Returns:
        ``(y, mm_y)``.
    """
    x, w, optional = _moe_args(
        _device(), gmm_x, gmm_weight, send_counts_tensor, recv_counts_tensor, mm_x, mm_weight
    )
    y, mm_y = library().npu_gmm_alltoallv(
        x, w, hcom_of(comm), ep_world_size, list(send_counts), list(recv_counts),
        trans_gmm_weight=trans_gmm_weight, trans_mm_weight=trans_mm_weight, **optional,
    )  # fmt: skip
    return y, mm_y


def npu_alltoallv_gmm(
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Communicator,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    *,
    send_counts_tensor: torch.Tensor | None = None,
    recv_counts_tensor: torch.Tensor | None = None,
    mm_x: torch.Tensor | None = None,
    mm_weight: torch.Tensor | None = None,
    trans_gmm_weight: bool = False,
    trans_mm_weight: bool = False,
    permute_out_flag: bool = False,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """AlltoAllvGroupedMatMul by ``torch_npu.npu_alltoallv_gmm`` (the same names).

    Args: those of :func:`mc2sim.ops.alltoallv_gmm`.

    Returns:
        ``(gmm_y, mm_y, permute_out)``.
    """
    x, w, optional = _moe_args(
        _device(), gmm_x, gmm_weight, send_counts_tensor, recv_counts_tensor, mm_x, mm_weight
    )
    gmm_y, mm_y, permute_out = library().npu_alltoallv_gmm(
        x, w, hcom_of(comm), ep_world_size, list(send_counts), list(recv_counts),
        trans_gmm_weight=trans_gmm_weight, trans_mm_weight=trans_mm_weight,
        permute_out_flag=permute_out_flag, **optional,
    )  # fmt: skip
    return gmm_y, mm_y, permute_out


def npu_incre_flash_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    comm: Communicator,
    *,
    block_table: torch.Tensor,
    actual_seq_lengths: Sequence[int],
    num_heads: int,
    num_key_value_heads: int,
    block_size: int,
    scale_value: float = 1.0,
    **unused: Any,
) -> torch.Tensor:
    """IncreFlashAttention decode by ``torch_npu.npu_incre_flash_attention`` (BSH, paged).

    mc2sim's ``key_cache`` and ``value_cache`` are torch_npu's ``key`` and ``value``; the
    rest keep their names, with ``input_layout="BSH"``. Nothing crosses ranks.

    Args: those of :func:`mc2sim.ops.ifa_decode`.

    Returns:
        ``(batch, 1, num_heads * head_dim)``.
    """
    device = _device()
    out: torch.Tensor = library().npu_incre_flash_attention(
        move(query, device), move(key_cache, device), move(value_cache, device),
        actual_seq_lengths=list(actual_seq_lengths), block_table=move(block_table, device),
        num_heads=num_heads, scale_value=scale_value, input_layout="BSH",
        num_key_value_heads=num_key_value_heads, block_size=block_size,
    )  # fmt: skip
    return out


npu_mm_all_reduce_base.unavailable = unavailable  # type: ignore[attr-defined]
npu_quant_matmul.unavailable = unavailable  # type: ignore[attr-defined]
npu_weight_quant_batchmatmul.unavailable = unavailable  # type: ignore[attr-defined]
npu_gmm_alltoallv.unavailable = unavailable  # type: ignore[attr-defined]
npu_alltoallv_gmm.unavailable = unavailable  # type: ignore[attr-defined]
npu_incre_flash_attention.unavailable = unavailable  # type: ignore[attr-defined]
