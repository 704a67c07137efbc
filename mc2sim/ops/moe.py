"""Expert-parallel MoE ops: GroupedMatMulAlltoAllv (combine) and AlltoAllvGroupedMatMul (dispatch).

Layouts (OPS.md section 3), for ``e`` local experts on each of ``W`` ranks:

* ``send_counts[q*e + j]``: rows of local expert ``j`` this rank sends to rank ``q``;
  ``recv_counts[r*e + j]``: rows of expert ``j`` this rank receives from rank ``r``.
* combine (``gmm_alltoallv``): ``gmm_x`` is expert-major (expert j's rows for rank 0, rank 1,
  ...); after the grouped matmul the rows are unpermuted to rank-major and sent; ``y`` comes
  back ordered by (source rank, expert).
* dispatch (``alltoallv_gmm``): ``gmm_x`` is rank-major (rows for rank 0's experts 0..e-1, then
  rank 1's, ...); the received rows, ordered by (source rank, expert), are permuted to
  expert-major and multiplied.

Where mc2sim differs from the hardware on purpose: the cross-rank counts invariant is checked
(``validate_counts=True``, one allgather of the counts) and every parameter error is raised on
every rank alike. What must match across ranks is agreed in the same collective as the
parameter checks: the dtype, the tiling, e, H1, N1, the shared expert's (H2, N2) or its
absence, and ``validate_counts``. See docs/OPS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc2sim import limits
from mc2sim.comm import Communicator, MustMatch, agreed
from mc2sim.comm.watchdog import in_op
from mc2sim.invariants import check_counts_local, counts_invariant
from mc2sim.kernels._validate import require, require_dtype, require_not_none, require_rank
from mc2sim.ops._moe_runners import CombineRunner, DispatchRunner, SharedExpert
from mc2sim.ops.profile import HardwareProfile, hardware_profile
from mc2sim.schedule.builders import MoeShape, plan_alltoallv_gmm, plan_gmm_alltoallv
from mc2sim.schedule.executor import execute, progress_mode
from mc2sim.schedule.tiling import Tiling, TilingMode, tiling_of

__all__ = ["alltoallv_gmm", "gmm_alltoallv"]

_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoeCall:
    """The validated shape of one MoE call, as every later step needs it."""

    e: int
    """Local experts per rank."""
    world: int
    """Ranks in the expert-parallel group."""
    send: list[int]
    """send_counts as Python ints."""
    recv: list[int]
    """recv_counts as Python ints."""

    def per_rank(self, counts: list[int]) -> list[int]:
        """Rows per peer rank: ``counts`` summed over each rank's ``e`` experts."""
        return [sum(counts[r * self.e : (r + 1) * self.e]) for r in range(self.world)]

    def matrix(self, counts: list[int]) -> np.ndarray:
        """``counts`` as a (world, e) matrix: [rank, expert]."""
        return np.asarray(counts, dtype=np.int64).reshape(self.world, self.e)


def _check_moe(
    *,
    direction: str,
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Communicator,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    send_counts_tensor: torch.Tensor | None,
    recv_counts_tensor: torch.Tensor | None,
    mm_x: torch.Tensor | None,
    mm_weight: torch.Tensor | None,
    trans_gmm_weight: bool,
    trans_mm_weight: bool,
    strict: str | HardwareProfile | None,
) -> MoeCall:
    """Check one rank's parameters against OPS.md section 3; raise the first broken rule."""
    profile = hardware_profile(strict)
    require_not_none("gmm_x", gmm_x)
    require_not_none("gmm_weight", gmm_weight)
    require_not_none("send_counts", send_counts)
    require_not_none("recv_counts", recv_counts)
    for name, value in (
        ("send_counts_tensor", send_counts_tensor),
        ("recv_counts_tensor", recv_counts_tensor),
    ):
        require(name, value, value is None, "is not supported: must be None (pass the list)")
    for name, flag in (
        ("trans_gmm_weight", trans_gmm_weight),
        ("trans_mm_weight", trans_mm_weight),
    ):
        require(name, flag, isinstance(flag, bool), "must be a bool")
    require_dtype("gmm_x", gmm_x, _DTYPES)
    require_dtype("gmm_weight", gmm_weight, (gmm_x.dtype,))
    require_rank("gmm_x", gmm_x, (2,))
    require_rank("gmm_weight", gmm_weight, (3,))
    require(
        "ep_world_size",
        ep_world_size,
        isinstance(ep_world_size, int) and ep_world_size == comm.size,
        f"must equal the size of the communicator ({comm.size})",
    )
    e = limits.E.check("e", gmm_weight.shape[0])
    limits.EXPERTS.check("e * ep_world_size", e * ep_world_size)
    send, recv = check_counts_local(send_counts, recv_counts, e, ep_world_size)
    h1 = gmm_x.shape[1]
    limits.H1.check("H1", h1)
    w_h, n1 = (
        (gmm_weight.shape[2], gmm_weight.shape[1]) if trans_gmm_weight else gmm_weight.shape[1:]
    )
    require(
        "gmm_weight.shape",
        tuple(gmm_weight.shape),
        w_h == h1,
        f"must be (e, H1={h1}, N1)" + (" stored as (e, N1, H1)" if trans_gmm_weight else ""),
    )
    limits.N1.check("N1", n1)
    require(
        "gmm_x.shape[0]",
        gmm_x.shape[0],
        gmm_x.shape[0] == sum(send),
        f"must equal sum(send_counts) = {sum(send)}",
    )
    bsk = sum(recv) if direction == "combine" else sum(send)
    bsk_name = "sum(recv_counts)" if direction == "combine" else "sum(send_counts)"
    limits.BSK.check(f"BSK = {bsk_name}", bsk)

    require(
        "mm_x, mm_weight",
        (mm_x is None, mm_weight is None),
        (mm_x is None) == (mm_weight is None),
        "must be given together or both be None",
    )
    if mm_x is not None and mm_weight is not None:
        require_dtype("mm_x", mm_x, (gmm_x.dtype,))
        require_dtype("mm_weight", mm_weight, (gmm_x.dtype,))
        require_rank("mm_x", mm_x, (2,))
        require_rank("mm_weight", mm_weight, (2,))
        bs, h2 = mm_x.shape
        limits.H2.check("H2", h2)
        m_h, n2 = (mm_weight.shape[1], mm_weight.shape[0]) if trans_mm_weight else mm_weight.shape
        require(
            "mm_weight.shape",
            tuple(mm_weight.shape),
            m_h == h2,
            f"must be (H2={h2}, N2)" + (" stored as (N2, H2)" if trans_mm_weight else ""),
        )
        limits.N2.check("N2", n2)
        require(
            "K = BSK / BS",
            f"{bsk} / {bs}",
            bs > 0 and bsk % bs == 0,
            f"top-K must be a whole number in [{limits.TOP_K.low}, {limits.TOP_K.high}] "
            f"({bsk_name} = BS * K, BS = mm_x rows)",
        )
        limits.TOP_K.check("K = BSK / BS", bsk // bs)
    if profile is HardwareProfile.A3:
        require(
            "ep_world_size",
            ep_world_size,
            ep_world_size in limits.A3_EP_WORLD_SIZES,
            f"strict='A3' allows {list(limits.A3_EP_WORLD_SIZES)}",
        )
        for q in range(ep_world_size):
            peer = sum(send[q * e : (q + 1) * e]) * h1 * 2  # the implementation's H1 x 2 bytes
            limits.A3_PEER_BYTES.check(f"traffic to rank {q}", peer)
    return MoeCall(e=e, world=ep_world_size, send=send, recv=recv)


@in_op("gmm_alltoallv")
def gmm_alltoallv(
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
    strict: str | HardwareProfile | None = None,
    validate_counts: bool = True,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GroupedMatMulAlltoAllv: expert matmuls, then the combine AlltoAllv back to token owners.

    ``gmmY = GroupedMatMul(gmm_x, gmm_weight)``; ``y = AlltoAllv(Unpermute(gmmY))``; and
    alongside ``mm_y = mm_x @ mm_weight`` (the shared expert). Every rank of ``comm`` calls it.

    Args:
        gmm_x: ``(A, H1)`` float16/bfloat16, A = sum(send_counts), expert-major: local expert
            j's rows for rank 0, then for rank 1, ...
        gmm_weight: ``(e, H1, N1)``, or ``(e, N1, H1)`` when ``trans_gmm_weight``.
        comm: the expert-parallel group (torch_npu's ``hcom``).
        ep_world_size: ranks in the group; must equal ``comm.size``.
        send_counts: ``e * ep_world_size`` ints, ``[q*e + j]`` = rows of expert j to rank q.
        recv_counts: ``e * ep_world_size`` ints, ``[r*e + j]`` = rows of expert j from rank r.
        send_counts_tensor: not supported, must be None (as on the hardware).
        recv_counts_tensor: not supported, must be None.
        mm_x: optional shared-expert input ``(BS, H2)``; needs ``mm_weight``.
        mm_weight: ``(H2, N2)``, or ``(N2, H2)`` when ``trans_mm_weight``.
        trans_gmm_weight: whether ``gmm_weight`` is stored transposed.
        trans_mm_weight: whether ``mm_weight`` is stored transposed.
        strict: ``None``, ``"A2"`` or ``"A3"``: also enforce that hardware's limits.
        validate_counts: check the cross-rank counts invariant first (mc2sim only).
        tiling: ``None`` (the hardware's: one chunk per local expert), ``"serial"`` (one
            grouped matmul and one AlltoAllv, not tiled; with ``mm_x`` the shared-expert
            matmul still overlaps the AlltoAllv) or N (each expert's rows cut into N
            sub-tiles). Results do not depend on it beyond float rounding.
        progress: how in-flight AlltoAllv chunks progress: ``"poll"`` or ``"thread"``
            (:mod:`mc2sim.schedule.executor`).

    Returns:
        ``(y, mm_y)``: y is ``(sum(recv_counts), N1)`` ordered by (source rank, expert);
        mm_y is ``(BS, N2)`` or None without ``mm_x``.

    Raises:
        ParamNullptrError: a required input is None (on every rank alike).
        ParamInvalidError: any rule of OPS.md section 3 or the counts invariant (every rank).
    """
    runner = _run_moe(
        "combine",
        gmm_x=gmm_x,
        gmm_weight=gmm_weight,
        comm=comm,
        ep_world_size=ep_world_size,
        send_counts=send_counts,
        recv_counts=recv_counts,
        send_counts_tensor=send_counts_tensor,
        recv_counts_tensor=recv_counts_tensor,
        mm_x=mm_x,
        mm_weight=mm_weight,
        trans_gmm_weight=trans_gmm_weight,
        trans_mm_weight=trans_mm_weight,
        strict=strict,
        validate_counts=validate_counts,
        tiling=tiling,
        progress=progress,
    )
    if not isinstance(runner, CombineRunner):  # _run_moe builds the direction's runner
        raise TypeError(type(runner).__name__)
    return runner.y(), runner.shared.result


@in_op("alltoallv_gmm")
def alltoallv_gmm(
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
    strict: str | HardwareProfile | None = None,
    validate_counts: bool = True,
    tiling: None | str | int | Tiling = None,
    progress: str = "poll",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """AlltoAllvGroupedMatMul: the dispatch AlltoAllv, permute to expert-major, expert matmuls.

    Args:
        gmm_x: ``(BSK, H1)`` float16/bfloat16, BSK = sum(send_counts), rank-major: the rows
            for rank 0's experts 0..e-1, then rank 1's, ...
        gmm_weight: ``(e, H1, N1)``, or ``(e, N1, H1)`` when ``trans_gmm_weight``.
        comm: the expert-parallel group (torch_npu's ``hcom``).
        ep_world_size: ranks in the group; must equal ``comm.size``.
        send_counts: ``[q*e + j]`` = rows this rank sends to rank q's expert j.
        recv_counts: ``[r*e + j]`` = rows for local expert j received from rank r.
        send_counts_tensor: not supported, must be None.
        recv_counts_tensor: not supported, must be None.
        mm_x: optional shared-expert input ``(BS, H2)``; needs ``mm_weight``.
        mm_weight: ``(H2, N2)``, or ``(N2, H2)`` when ``trans_mm_weight``.
        trans_gmm_weight: whether ``gmm_weight`` is stored transposed.
        trans_mm_weight: whether ``mm_weight`` is stored transposed.
        permute_out_flag: also return the permuted rows (the grouped matmul's input).
        strict: ``None``, ``"A2"`` or ``"A3"``: also enforce that hardware's limits.
        validate_counts: check the cross-rank counts invariant first (mc2sim only).
        tiling: ``None`` (the hardware's: one chunk per local expert), ``"serial"`` (one
            grouped matmul and one AlltoAllv, not tiled; with ``mm_x`` the shared-expert
            matmul still overlaps the AlltoAllv) or N (each expert's rows cut into N
            sub-tiles). Results do not depend on it beyond float rounding.
        progress: how in-flight AlltoAllv chunks progress: ``"poll"`` or ``"thread"``
            (:mod:`mc2sim.schedule.executor`).

    Returns:
        ``(gmm_y, mm_y, permute_out)``: gmm_y is ``(sum(recv_counts), N1)``, expert-major;
        mm_y is ``(BS, N2)`` or None; permute_out is ``(sum(recv_counts), H1)`` or None.

    Raises:
        ParamNullptrError: a required input is None (on every rank alike).
        ParamInvalidError: any rule of OPS.md section 3 or the counts invariant (every rank).
    """

    def check_flag() -> None:
        require(
            "permute_out_flag",
            permute_out_flag,
            isinstance(permute_out_flag, bool),
            "must be a bool",
        )

    runner = _run_moe(
        "dispatch",
        also_check=check_flag,
        gmm_x=gmm_x,
        gmm_weight=gmm_weight,
        comm=comm,
        ep_world_size=ep_world_size,
        send_counts=send_counts,
        recv_counts=recv_counts,
        send_counts_tensor=send_counts_tensor,
        recv_counts_tensor=recv_counts_tensor,
        mm_x=mm_x,
        mm_weight=mm_weight,
        trans_gmm_weight=trans_gmm_weight,
        trans_mm_weight=trans_mm_weight,
        strict=strict,
        validate_counts=validate_counts,
        tiling=tiling,
        progress=progress,
    )
    if not isinstance(runner, DispatchRunner):
        raise TypeError(type(runner).__name__)
    gmm_y, permuted = runner.results()
    return gmm_y, runner.shared.result, permuted if permute_out_flag else None


def _run_moe(
    direction: str,
    *,
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    comm: Communicator,
    ep_world_size: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    send_counts_tensor: torch.Tensor | None,
    recv_counts_tensor: torch.Tensor | None,
    mm_x: torch.Tensor | None,
    mm_weight: torch.Tensor | None,
    trans_gmm_weight: bool,
    trans_mm_weight: bool,
    strict: str | HardwareProfile | None,
    validate_counts: bool,
    tiling: None | str | int | Tiling,
    progress: str,
    also_check: Callable[[], None] | None = None,
) -> CombineRunner | DispatchRunner:
    """Check on every rank, agree, check the counts invariant, then plan and run the op."""
    with agreed(comm) as same:
        progress_mode(progress)  # here, not in execute: one rank's bad mode fails every rank
        if also_check is not None:
            also_check()
        plan_tiling = tiling_of(tiling)  # a bad tiling is a parameter error like any other
        call = _check_moe(
            direction=direction,
            gmm_x=gmm_x,
            gmm_weight=gmm_weight,
            comm=comm,
            ep_world_size=ep_world_size,
            send_counts=send_counts,
            recv_counts=recv_counts,
            send_counts_tensor=send_counts_tensor,
            recv_counts_tensor=recv_counts_tensor,
            mm_x=mm_x,
            mm_weight=mm_weight,
            trans_gmm_weight=trans_gmm_weight,
            trans_mm_weight=trans_mm_weight,
            strict=strict,
        )
        shape = _moe_shape(
            call, gmm_x, gmm_weight, trans_gmm_weight, mm_x, mm_weight, trans_mm_weight
        )
        _must_match(same, shape, plan_tiling, validate_counts)
    if validate_counts:
        counts_invariant(comm, call.send, call.recv, call.e)
    combine = direction == "combine"
    builder = plan_gmm_alltoallv if combine else plan_alltoallv_gmm
    plan = builder(shape=shape, tiling=plan_tiling, rank=comm.rank)
    runner = (CombineRunner if combine else DispatchRunner)(
        comm=comm,
        gmm_x=gmm_x,
        gmm_weight=gmm_weight,
        trans_gmm_weight=trans_gmm_weight,
        send=call.send,
        recv=call.recv,
        e=call.e,
        parts=_parts(plan_tiling),
        shared=SharedExpert(mm_x, mm_weight, trans_mm_weight),
    )
    execute(plan, comm, runner, progress=progress, device=gmm_x.device)
    return runner


def _must_match(same: MustMatch, shape: MoeShape, tiling: Tiling, validate_counts: bool) -> None:
    """Name what every rank of the expert-parallel group must pass alike."""
    same("gmm_x.dtype", shape.dtype, "the ranks exchange rows of one dtype")
    same("e", shape.e, "every rank holds the same number of local experts (counts of e * W)")
    same("H1", shape.h1, "the experts of one layer take rows of H1 on every rank")
    same("N1", shape.n1, "the experts of one layer give rows of N1 on every rank")
    same(
        "shared expert (H2, N2)",
        None if shape.shared is None else shape.shared[1:],
        "one layer has the shared expert on every rank or on none, of one shape",
    )
    same("tiling", tiling.describe(), "the ranks issue one schedule of AlltoAllv chunks together")
    same("validate_counts", validate_counts, "the counts check is a collective of every rank")


def _parts(tiling: Tiling) -> int:
    return tiling.count if tiling.mode is TilingMode.TILES else 1


def _moe_shape(
    call: MoeCall,
    gmm_x: torch.Tensor,
    gmm_weight: torch.Tensor,
    trans_gmm_weight: bool,
    mm_x: torch.Tensor | None,
    mm_weight: torch.Tensor | None,
    trans_mm_weight: bool,
) -> MoeShape:
    """The plan's view of a validated call: counts and sizes, no data."""
    n1 = gmm_weight.shape[1] if trans_gmm_weight else gmm_weight.shape[2]
    shared = None
    if mm_x is not None and mm_weight is not None:
        n2 = mm_weight.shape[0] if trans_mm_weight else mm_weight.shape[1]
        shared = (mm_x.shape[0], mm_x.shape[1], n2)
    return MoeShape(
        e=call.e,
        send=tuple(call.send),
        recv=tuple(call.recv),
        h1=gmm_x.shape[1],
        n1=n1,
        elem_bytes=gmm_x.element_size(),
        shared=shared,
        dtype=str(gmm_x.dtype).removeprefix("torch."),
    )
