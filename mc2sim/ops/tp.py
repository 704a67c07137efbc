"""Tensor-parallel MC2 ops: MatmulAllReduce, AllGatherMatmul and MatmulReduceScatter.

Each rank computes its local matmul with the kernels of :mod:`mc2sim.kernels` (whose own
parameter checks run inside the ranks' agreement, so a bad parameter on one rank raises the
same error on every rank before any data moves), then the collective combines the ranks.

What must match across ranks, agreed in the same collective: the dtypes, the tiling and all
of (m, k, n). The collectives need m (every rank's rows are summed, gathered or scattered
alike) and the exchanged width (n for the AllReduce and ReduceScatter, k for the AllGather);
the rest are the shards of one tensor-parallel layer, equal on every rank, and the hardware
MatmulAllReduce cuts its tiles from (m, k, n) on each rank, so they must agree for every rank
to issue the same AllReduces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from mc2sim import limits
from mc2sim._compat import StrEnum
from mc2sim.comm import Communicator, agreed
from mc2sim.comm.watchdog import in_op
from mc2sim.errors import AclnnRuntimeError, ParamNullptrError
from mc2sim.kernels import matmul, quant_matmul, weight_quant_batchmatmul
from mc2sim.kernels._device import same_device
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank
from mc2sim.limits import require_multiple
from mc2sim.ops._tp_runners import AllGatherMatmulRunner, AllReduceRunner, ReduceScatterRunner
from mc2sim.ops.profile import HardwareProfile, hardware_profile
from mc2sim.schedule.builders import (
    MatmulShape,
    plan_all_gather_matmul,
    plan_matmul_reduce_scatter,
    plan_mm_all_reduce,
)
from mc2sim.schedule.executor import execute, progress_mode
from mc2sim.schedule.plan import Plan, TaskKind
from mc2sim.schedule.tiling import Tiling, tiling_of

__all__ = ["MatmulMode", "all_gather_matmul", "matmul_reduce_scatter", "mm_all_reduce"]

_FLOAT = (torch.float16, torch.bfloat16)
_LOW_BIT = (torch.int8, torch.int32, torch.uint8)  # int8, or int4 packed in int32 / uint8


class MatmulMode(StrEnum):
    """Which MatmulAllReduce variant a call is, decided by the dtypes of x1 and x2.

    Glossary: ``float`` (x1, x2 float16/bfloat16: MatmulAllReduce), ``weight_quant``
    (float x1, int8/int4 x2 with antiquant_scale: WeightQuantMatmulAllReduce, seed 001),
    ``quant`` (int8 x1 and x2 with dequant_scale: QuantMatmulAllReduce).
    """

    FLOAT = "float"
    WEIGHT_QUANT = "weight_quant"
    QUANT = "quant"


def _mode(x1: torch.Tensor, x2: torch.Tensor) -> MatmulMode:
    require_dtype("x1", x1, (*_FLOAT, torch.int8))
    if x1.dtype == torch.int8:
        require_dtype("x2", x2, (torch.int8,))
        return MatmulMode.QUANT
    require_dtype("x2", x2, (x1.dtype, *_LOW_BIT))
    return MatmulMode.FLOAT if x2.dtype == x1.dtype else MatmulMode.WEIGHT_QUANT


def _require_sum(reduce_op: str) -> None:
    require("reduce_op", reduce_op, reduce_op == "sum", "only 'sum' is supported")


def _require_comm_turn(comm_turn: int) -> None:
    require("comm_turn", comm_turn, comm_turn == 0, "only 0 is supported (the op tiles itself)")


def _quant_output_dtype(dequant_scale: torch.Tensor, x3: torch.Tensor | None) -> torch.dtype:
    """bfloat16 with a bfloat16 dequant_scale; else x3's dtype if given; else float16."""
    if dequant_scale.dtype == torch.bfloat16:
        return torch.bfloat16
    if x3 is not None and x3.dtype in _FLOAT:
        return x3.dtype
    return torch.float16


def _local_mm(
    x1: torch.Tensor,
    *,
    x2: torch.Tensor,
    bias: torch.Tensor | None,
    antiquant_scale: torch.Tensor | None,
    antiquant_offset: torch.Tensor | None,
    x3: torch.Tensor | None,
    dequant_scale: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    antiquant_group_size: int,
    x2_shape: Sequence[int] | None,
    x2_transposed: bool,
) -> torch.Tensor:
    """This rank's ``x1 @ x2' + bias + x3`` in the output dtype (before the AllReduce)."""
    require_not_none("x1", x1)
    require_not_none("x2", x2)
    mode = _mode(x1, x2)
    require_rank("x1", x1, (2, 3))
    m = x1.numel() // x1.shape[-1] if x1.shape[-1] else 0
    limits.MM_M.check("m", m)
    if mode is not MatmulMode.QUANT:
        require(
            "pertoken_scale",
            pertoken_scale,
            pertoken_scale is None,
            "is only for int8 x1 (quant mode); must be None",
        )
    if mode is MatmulMode.FLOAT:
        for name, t in (("antiquant_scale", antiquant_scale), ("dequant_scale", dequant_scale)):
            require(name, t, t is None, "must be None when x1 and x2 are both float")
        require_rank("x2", x2, (2,))
        k, n = x2.shape
        limits.MM_K.check("k", k)
        limits.MM_N.check("n", n)
        y = matmul(x1, x2, bias=bias)
    elif mode is MatmulMode.WEIGHT_QUANT:
        if antiquant_scale is None:
            raise ParamNullptrError("antiquant_scale", None, "is required when x2 is int8/int4")
        require("dequant_scale", dequant_scale, dequant_scale is None, "must be None")
        y = weight_quant_batchmatmul(
            x1,
            x2,
            antiquant_scale,
            antiquant_offset,
            bias=bias,
            antiquant_group_size=antiquant_group_size,
            weight_shape=x2_shape,
            weight_transposed=x2_transposed,
        )
    else:
        if dequant_scale is None:
            raise ParamNullptrError("dequant_scale", None, "is required when x1 is int8")
        for name, t in (
            ("antiquant_scale", antiquant_scale),
            ("antiquant_offset", antiquant_offset),
        ):
            require(name, t, t is None, "must be None when x1 is int8 (quant mode)")
        y = quant_matmul(
            x1,
            x2,
            dequant_scale,
            pertoken_scale=pertoken_scale,
            bias=bias,
            output_dtype=_quant_output_dtype(dequant_scale, x3),
        )
    if x3 is not None:
        require_dtype("x3", x3, (y.dtype,))
        same_device(("x1", x1), ("x3", x3))
        require(
            "x3.shape",
            tuple(x3.shape),
            x3.shape == y.shape,
            f"must equal the output's shape {tuple(y.shape)}",
        )
        y = (y.float() + x3.float()).to(y.dtype)
    return y


_SAME_MN = "every rank's (m, n) product is summed in one AllReduce"
_SAME_K = (
    "every rank holds an equal shard of the one weight, and the hardware's tiles are cut "
    "from (m, k, n)"
)
_SAME_TILING = "the ranks issue one schedule of collectives together"
_SAME_DTYPE = "the ranks exchange and sum tensors of one dtype"


@in_op("mm_all_reduce")
def mm_all_reduce(
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
    strict: str | HardwareProfile | None = None,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> torch.Tensor:
    """MatmulAllReduce: ``allreduce(x1 @ x2' + bias + x3)`` over the ranks of ``comm``.

    ``x2'`` is ``x2`` (float mode), ``(x2 + antiquant_offset) * antiquant_scale`` (weight-quant
    mode, int8 or int4 x2, ND or FRACTAL_NZ), or the int8 matmul dequantized by
    ``dequant_scale`` and ``pertoken_scale`` (quant mode). ``bias`` and ``x3`` are inside the
    AllReduce, as the seed formula says: the sum over ranks counts them ``comm.size`` times.
    Rounding: each rank's product (with bias) is rounded to the output dtype by its kernel,
    ``x3`` is added in float32 and the local result rounded again, then the ranks' results
    are summed in float32 (CPU backends) and rounded once more.

    Args:
        x1: ``(m, k)`` or ``(b, s, k)``; float16/bfloat16, or int8 (quant mode).
        x2: ``(k, n)``: x1's dtype (float mode); int8, int4 packed in int32/uint8, or a
            FRACTAL_NZ storage tensor (weight-quant mode, see
            :func:`mc2sim.kernels.weight_quant_batchmatmul`); int8 (quant mode).
        comm: the tensor-parallel group (torch_npu's ``hcom``).
        reduce_op: only ``"sum"``.
        bias: optional ``(n,)``: x1's dtype; int32 in quant mode.
        antiquant_scale: weight-quant mode: per-tensor ``(1,)``, per-channel ``(n,)``/``(1, n)``
            or per-group ``(ceil(k/g), n)``, x1's dtype.
        antiquant_offset: optional, shape and dtype of ``antiquant_scale``.
        x3: optional addend of the output's shape and dtype.
        dequant_scale: quant mode: ``(1,)`` or ``(n,)``; int64 (trans_quant_param), float32 or
            bfloat16. The output is bfloat16 for a bfloat16 scale, else x3's dtype when x3 is
            given, else float16.
        pertoken_scale: quant mode, optional float32 ``(m,)``.
        antiquant_group_size: 0, or the per-group size (a multiple of 32 in [32, k-1]).
        comm_turn: only 0.
        x2_shape: the logical ``(k, n)`` of a FRACTAL_NZ ``x2`` (its view shape on Ascend).
        x2_transposed: a FRACTAL_NZ ``x2`` holds the ``(n, k)`` matrix.
        strict: ``None``, ``"A2"`` or ``"A3"``: also require world size 1, 2, 4 or 8.
        tiling: ``None`` (the hardware's policy: equal long M tiles plus a short one, see
            :func:`mc2sim.schedule.hardware_mm_all_reduce_tiles`), ``"serial"`` or N equal
            M tiles; each tile's AllReduce overlaps the next tile's matmul.
        progress: ``"poll"`` or ``"thread"`` (:mod:`mc2sim.schedule.executor`).

    Returns:
        ``(m, n)`` or ``(b, s, n)``, the same on every rank.

    Raises:
        ParamNullptrError: x1, x2, or the mode's scale is None (on every rank alike).
        ParamInvalidError: any rule of OPS.md sections 2 and 5 (on every rank alike).
    """
    with agreed(comm) as same:
        progress_mode(progress)  # here, not in execute: one rank's bad mode fails every rank
        _require_sum(reduce_op)
        _require_comm_turn(comm_turn)
        if hardware_profile(strict) is not HardwareProfile.NONE:
            require(
                "world_size",
                comm.size,
                comm.size in limits.ALLREDUCE_WORLD_SIZES,
                f"strict={strict!r} allows {list(limits.ALLREDUCE_WORLD_SIZES)} (HCCS full mesh)",
            )
        plan_tiling = tiling_of(tiling)
        require_not_none("x1", x1)
        require_rank("x1", x1, (2, 3))
        limits.MM_K.check("k", x1.shape[-1])  # before the reshape, which k = 0 cannot take
        rows_2d = x1.reshape(-1, x1.shape[-1])
        m = limits.MM_M.check("m", rows_2d.shape[0])
        if pertoken_scale is not None:
            require(
                "pertoken_scale.shape",
                tuple(pertoken_scale.shape),
                tuple(pertoken_scale.shape) == (m,),
                f"must be ({m},): one scale per row of x1",
            )
        local = functools.partial(
            _local_mm,
            x2=x2,
            bias=bias,
            antiquant_scale=antiquant_scale,
            antiquant_offset=antiquant_offset,
            dequant_scale=dequant_scale,
            antiquant_group_size=antiquant_group_size,
            x2_shape=x2_shape,
            x2_transposed=x2_transposed,
        )
        x3_2d = None
        if x3 is not None:
            require_dtype("x3", x3, _FLOAT)
            x3_2d = x3.reshape(-1, x3.shape[-1]) if x3.dim() >= 1 else x3

        def tile(start: int, stop: int) -> torch.Tensor:
            return local(
                rows_2d[start:stop],
                pertoken_scale=None if pertoken_scale is None else pertoken_scale[start:stop],
                x3=None if x3_2d is None else x3_2d[start:stop],
            )

        # one row through the kernels checks every parameter the kernels check
        probe = tile(0, 1)
        n = probe.shape[-1]
        if x3 is not None:
            expected = (*x1.shape[:-1], n)
            require("x3.shape", tuple(x3.shape), tuple(x3.shape) == expected, f"must be {expected}")
        same("x1.dtype", _name(x1.dtype), _SAME_DTYPE)
        same("x2.dtype", _name(x2.dtype), "every rank holds a shard of the one weight")
        same("output dtype", _name(probe.dtype), _SAME_DTYPE)
        same("m", m, _SAME_MN)
        same("k", rows_2d.shape[1], _SAME_K)
        same("n", n, _SAME_MN)
        same("tiling", plan_tiling.describe(), _SAME_TILING)
    mode = _mode(x1, x2)
    shape = MatmulShape(
        k=rows_2d.shape[1],
        n=n,
        in_bytes=x1.element_size(),
        w_bytes=0.5 if x2.dtype in (torch.int32, torch.uint8) else x2.element_size(),
        out_bytes=probe.element_size(),
        dtype=str(x1.dtype).removeprefix("torch."),
    )
    plan = plan_mm_all_reduce(
        m=m,
        shape=shape,
        kind=_KIND[mode],
        tiling=plan_tiling,
        rank=comm.rank,
        world_size=comm.size,
    )
    out = torch.empty((m, n), dtype=probe.dtype, device=probe.device)
    runner = AllReduceRunner(comm=comm, local=tile, out=out)
    execute(plan, comm, runner, progress=progress, device=out.device)
    return out.reshape(*x1.shape[:-1], n)


_KIND = {
    MatmulMode.FLOAT: TaskKind.MATMUL,
    MatmulMode.WEIGHT_QUANT: TaskKind.WEIGHT_QUANT_MATMUL,
    MatmulMode.QUANT: TaskKind.QUANT_MATMUL,
}


def _check_tp(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    world_size: int,
    bias: torch.Tensor | None,
    comm_turn: int,
    strict: str | HardwareProfile | None,
) -> None:
    """Rules shared by AllGatherMatmul and MatmulReduceScatter (torch_npu's docs)."""
    require_not_none("x1", x1)
    require_not_none("x2", x2)
    require_dtype("x1", x1, _FLOAT)
    require_dtype("x2", x2, (x1.dtype,))
    require_rank("x1", x1, (2,))
    require_rank("x2", x2, (2,))
    limits.MM_M.check("m", x1.shape[0])  # as a scenario's shape: every size is positive
    limits.MM_N.check("n", x2.shape[1])
    k = limits.TP_K.check("k", x1.shape[1])
    require("x2.shape", tuple(x2.shape), x2.shape[0] == k, f"dim 0 must equal x1's k ({k})")
    require(
        "world_size",
        world_size,
        world_size == comm.size,
        f"must equal the size of the communicator ({comm.size})",
    )
    _require_comm_turn(comm_turn)
    if bias is not None:
        require_dtype("bias", bias, (x1.dtype,))
        n = x2.shape[1]
        require("bias.shape", tuple(bias.shape), tuple(bias.shape) == (n,), f"must be ({n},)")
    profile = hardware_profile(strict)
    if profile is not HardwareProfile.NONE:
        allowed = limits.TP_WORLD_SIZES[profile.value]
        require(
            "world_size",
            world_size,
            world_size in allowed,
            f"strict={strict!r} allows {list(allowed)}",
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@in_op("all_gather_matmul")
def all_gather_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    world_size: int,
    bias: torch.Tensor | None = None,
    gather_index: int = 0,
    gather_output: bool = True,
    comm_turn: int = 0,
    *,
    strict: str | HardwareProfile | None = None,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AllGatherMatmul (torch_npu.npu_all_gather_base_mm): ``allgather(x1) @ x2 + bias``.

    Args:
        x1: ``(m, k)`` float16/bfloat16, k in [256, 65535); not a transposed view.
        x2: ``(k, n)``, x1's dtype; may be a transposed view.
        comm: the tensor-parallel group.
        world_size: ranks in the group; must equal ``comm.size``.
        bias: optional ``(n,)``, x1's dtype.
        gather_index: only 0 (gather x1).
        gather_output: also return the gathered x1.
        comm_turn: only 0.
        strict: ``None``, ``"A2"`` (world size 2, 4, 8) or ``"A3"`` (2 to 32).
        tiling: ``None`` (the hardware's: one chunk per rank, in ring order), ``"serial"``
            (one AllGather, then one matmul) or N (each rank chunk cut into N row tiles).
        progress: ``"poll"`` or ``"thread"`` (:mod:`mc2sim.schedule.executor`).

    Returns:
        ``(out, gather_out)``: out is ``(world_size * m, n)``; gather_out is
        ``(world_size * m, k)``, or None when ``gather_output`` is False.

    Raises:
        ParamNullptrError: x1 or x2 is None (on every rank alike).
        ParamInvalidError: any rule above (on every rank alike).
    """
    with agreed(comm) as same:
        progress_mode(progress)  # here, not in execute: one rank's bad mode fails every rank
        _check_tp(x1, x2, comm, world_size, bias, comm_turn, strict)
        chosen = tiling_of(tiling)
        require("gather_index", gather_index, gather_index == 0, "only 0 (gather x1) is supported")
        require("gather_output", gather_output, isinstance(gather_output, bool), "must be a bool")
        same("x1.dtype", _name(x1.dtype), "the AllGather moves x1 of one dtype")
        same("m", x1.shape[0], "the AllGather moves equal (m, k) chunks of x1 from every rank")
        same("k", x1.shape[1], "the AllGather moves equal (m, k) chunks of x1 from every rank")
        same("n", x2.shape[1], "every rank holds an equal column shard of the one weight")
        same("tiling", chosen.describe(), _SAME_TILING)
    runner = AllGatherMatmulRunner(
        comm=comm, x1=x1, multiply=lambda rows: matmul(rows, x2, bias=bias), n=x2.shape[1]
    )
    out = _run_pair(plan_all_gather_matmul, runner, x1, x2, comm, tiling, progress)
    return out, runner.gathered if gather_output else None


@in_op("matmul_reduce_scatter")
def matmul_reduce_scatter(
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    world_size: int,
    reduce_op: str = "sum",
    bias: torch.Tensor | None = None,
    comm_turn: int = 0,
    *,
    strict: str | HardwareProfile | None = None,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> torch.Tensor:
    """MatmulReduceScatter (torch_npu.npu_mm_reduce_scatter_base): reduce-scatter of x1 @ x2 + bias.

    ``bias`` is added on every rank before the reduction, so the sum counts it
    ``world_size`` times, as the formula ``reducescatter(x1 @ x2 + bias)`` says.

    Args:
        x1: ``(m, k)`` float16/bfloat16, m a multiple of ``world_size``, k in [256, 65535).
        x2: ``(k, n)``, x1's dtype; may be a transposed view.
        comm: the tensor-parallel group.
        world_size: ranks in the group; must equal ``comm.size``.
        reduce_op: only ``"sum"``.
        bias: optional ``(n,)``, x1's dtype.
        comm_turn: only 0.
        strict: ``None``, ``"A2"`` (world size 2, 4, 8) or ``"A3"`` (2 to 32).
        tiling: ``None`` (the hardware's: one chunk per destination rank, in ring order,
            summed in float32 at home), ``"serial"`` (one matmul, one ReduceScatter) or N
            (each chunk cut into N row tiles).
        progress: ``"poll"`` or ``"thread"`` (:mod:`mc2sim.schedule.executor`).

    Returns:
        ``(m / world_size, n)``: this rank's rows of the reduced product.

    Raises:
        ParamNullptrError: x1 or x2 is None (on every rank alike).
        ParamInvalidError: any rule above (on every rank alike).
    """
    with agreed(comm) as same:
        progress_mode(progress)  # here, not in execute: one rank's bad mode fails every rank
        _check_tp(x1, x2, comm, world_size, bias, comm_turn, strict)
        chosen = tiling_of(tiling)
        _require_sum(reduce_op)
        require_multiple("x1.shape[0]", x1.shape[0], world_size, f"world_size ({world_size})")
        why = "every rank's (m, n) product is summed and scattered in one ReduceScatter"
        same("x1.dtype", _name(x1.dtype), _SAME_DTYPE)
        same("m", x1.shape[0], why)
        same("k", x1.shape[1], "every rank holds an equal row shard of the one weight")
        same("n", x2.shape[1], why)
        same("tiling", chosen.describe(), _SAME_TILING)
    runner = ReduceScatterRunner(
        comm=comm, x1=x1, multiply=lambda rows: matmul(rows, x2, bias=bias), n=x2.shape[1]
    )
    return _run_pair(plan_matmul_reduce_scatter, runner, x1, x2, comm, tiling, progress)


def _run_pair(
    builder: Callable[..., Plan],
    runner: AllGatherMatmulRunner | ReduceScatterRunner,
    x1: torch.Tensor,
    x2: torch.Tensor,
    comm: Communicator,
    tiling: None | str | int | Tiling,
    progress: str,
) -> torch.Tensor:
    """Plan one of the tensor-parallel pair, run it, return its output."""
    plan = builder(
        m=x1.shape[0],
        shape=_dense_shape(x1, x2),
        tiling=tiling_of(tiling),
        rank=comm.rank,
        world_size=comm.size,
    )
    execute(plan, comm, runner, progress=progress, device=x1.device)
    if runner.out is None:  # every plan of the pair writes the output
        raise AclnnRuntimeError("plan", plan.tiling, "produced no output")
    return runner.out


def _dense_shape(x1: torch.Tensor, x2: torch.Tensor) -> MatmulShape:
    size = x1.element_size()
    return MatmulShape(
        k=x1.shape[1],
        n=x2.shape[1],
        in_bytes=size,
        w_bytes=size,
        out_bytes=size,
        dtype=str(x1.dtype).removeprefix("torch."),
    )
