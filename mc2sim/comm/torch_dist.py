"""``TorchCommunicator``: the Communicator protocol over torch.distributed process groups.

The same code runs with gloo on CPUs, NCCL on NVIDIA GPUs and HCCL on Ascend NPUs. The
backend-specific parts are two named tables below:

* ``_DEVICE_TYPE``: where a backend's collectives take their tensors. A tensor elsewhere is
  copied there and the result copied back to the caller's device.
* ``_FLOAT32_REDUCTION``: backends whose float16/bfloat16 reductions are computed in
  float32 and cast back, exactly like ``MpiCommunicator``, so CPU runs give the same bits on
  either backend. NCCL and HCCL reduce 16-bit floats natively, as the hardware operators
  being studied do.

Every collective has a deadline (:mod:`mc2sim.comm.watchdog`). Under mpiexec the roll call
that names the ranks that never arrived travels over MPI; under torchrun there is none.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mc2sim.comm.base import (
    ReduceOp,
    Work,
    check_dtype,
    check_out,
    check_reduce_rows,
    check_splits,
    reduce_op,
    reduced_in_float32,
)
from mc2sim.comm.watchdog import Collective, SideChannel, Watch, timeout_from_env, watch_of
from mc2sim.errors import ParamInvalidError

__all__ = ["TorchCommunicator"]

_DEVICE_TYPE = {"gloo": "cpu", "nccl": "cuda", "hccl": "npu"}
_FLOAT32_REDUCTION = frozenset({"gloo"})

# torch 2.13 renamed the tensor forms of all-gather and reduce-scatter; older releases (>= 2.3)
# have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


class _TorchWork:
    """A torch.distributed work handle and what turns its output into the result.

    ``stream_ordered`` (see :class:`~mc2sim.comm.base.Work`): on a device backend (NCCL,
    HCCL) ``wait()`` does not block the host; it makes the caller's current stream wait for
    the collective, so work queued on that stream afterwards sees the result.
    """

    def __init__(
        self,
        work: Any,
        finish: Callable[[], torch.Tensor],
        watch: Watch,
        collective: Collective,
        *,
        stream_ordered: bool = False,
    ) -> None:
        self.stream_ordered = stream_ordered
        self._work = work
        self._finish = finish
        self._result: torch.Tensor | None = None
        self._watch, self._collective = watch, collective

    def test(self) -> bool:
        if self._result is None and self._work.is_completed():
            self._work.wait()  # completes bookkeeping (and stream ordering on devices)
            self._result = self._finish()
        return self._result is not None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._watch.wait(self._collective)
            try:
                self._work.wait()
            finally:
                self._watch.done()
            self._result = self._finish()
        return self._result


def _side_channel(group: dist.ProcessGroup | None) -> SideChannel | None:
    """The roll-call channel of ``group`` over MPI when MPI runs the job, else ``None``."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    world = mpi.COMM_WORLD
    if world.Get_size() != dist.get_world_size() or world.Get_rank() != dist.get_rank():
        return None  # torch's ranks are not MPI's: no way to name them
    from mc2sim.comm.mpi_objects import MpiSideChannel

    if group is None:
        return MpiSideChannel(world)
    members = world.Get_group().Incl(dist.get_process_group_ranks(group))
    return MpiSideChannel(world.Create_group(members))  # collective over the members only


def torch_watch(group: dist.ProcessGroup | None) -> Watch:
    """Return the Watch of a process group (made collectively on first use).

    Args:
        group: the group; ``None`` is the default group.

    Returns:
        Its Watch: deadline ``MC2SIM_TIMEOUT`` and, under mpiexec, a roll-call channel over
        MPI; no deadline for a group of one rank.

    Raises:
        ParamInvalidError: ``MC2SIM_TIMEOUT`` is not a number of seconds > 0.

    """

    def make() -> Watch:
        if dist.get_world_size(group) == 1:
            return Watch(timeout=float("inf"))
        timeout = timeout_from_env()
        return Watch(timeout=timeout, channel=_side_channel(group))

    return watch_of(("torch", group), make)


class TorchCommunicator:
    """Communicator over a torch.distributed process group.

    Args:
        group: the process group; ``None`` means the default (world) group, which must
            already be initialised (``mc2sim.comm.init(backend="torch")`` does that).

    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise ParamInvalidError(
                "group",
                group,
                "torch.distributed is not initialised: call mc2sim.comm.init('torch') "
                "or torch.distributed.init_process_group first",
            )
        self._group = group
        self._backend = str(dist.get_backend(group))
        self._device = self._backend_device()
        self._watch = torch_watch(group)

    def _backend_device(self) -> torch.device:
        device_type = _DEVICE_TYPE.get(self._backend, "cpu")
        if device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        if device_type == "npu":  # pragma: no cover - needs torch_npu on Ascend
            return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
        return torch.device("cpu")

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The underlying process group (``None`` for the default group)."""
        return self._group

    @property
    def rank(self) -> int:
        """Rank of this process in the group."""
        return int(dist.get_rank(self._group))

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return int(dist.get_world_size(self._group))

    @property
    def backend(self) -> str:
        """The torch.distributed backend: "gloo", "nccl", "hccl", ..."""
        return self._backend

    def __repr__(self) -> str:
        return f"TorchCommunicator(backend={self._backend!r}, rank={self.rank}, size={self.size})"

    # -- helpers -------------------------------------------------------------------------

    def _wire_dtype(self, dtype: torch.dtype, *, reduce: bool) -> torch.dtype:
        """Return the dtype a tensor of ``dtype`` travels in (see ``_FLOAT32_REDUCTION``)."""
        if reduce and self._backend in _FLOAT32_REDUCTION and reduced_in_float32(dtype):
            return torch.float32
        return dtype

    def _staged(self, t: torch.Tensor, *, reduce: bool) -> torch.Tensor:
        """Return ``t`` contiguous on the backend's device, in the wire dtype.

        Reductions run in place in torch.distributed, so for them the result is always a
        fresh copy that the caller's tensor does not share.
        """
        check_dtype(t)
        dtype = self._wire_dtype(t.dtype, reduce=reduce)
        return t.to(device=self._device, dtype=dtype, copy=reduce).contiguous()

    @staticmethod
    def _back(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Return ``result`` in ``like``'s dtype and on its device."""
        return result.to(device=like.device, dtype=like.dtype)

    # -- collectives ---------------------------------------------------------------------

    def _into(
        self, out: torch.Tensor | None, like: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return what turns a collective's buffer into the caller's result."""

        def finish(buf: torch.Tensor) -> torch.Tensor:
            if out is None:
                return self._back(buf, like)
            if buf is not out:
                out.copy_(buf)
            return out

        return finish

    def _usable(self, out: torch.Tensor | None, dtype: torch.dtype) -> bool:
        """Whether the collective can run in ``out`` itself (right device, layout, dtype)."""
        return (
            out is not None
            and out.device == self._device
            and out.is_contiguous()
            and out.dtype == dtype
        )

    def allreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the element-wise reduction of ``t`` over all ranks (in ``out`` if given)."""
        return self.iallreduce(t, op, out=out).wait()

    def iallreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> Work:
        """Start an allreduce (``async_op=True``); ``wait()`` returns its result."""
        torch_op = _TORCH_OPS[reduce_op(op)]
        check_dtype(t)
        check_out(out, tuple(t.shape), t.dtype)
        wire = self._wire_dtype(t.dtype, reduce=True)
        if out is not None and self._usable(out, wire):
            buf = out
            buf.copy_(t)
        else:
            buf = self._staged(t, reduce=True)
        collective = self._watch.issue("allreduce")
        work = dist.all_reduce(buf, op=torch_op, group=self._group, async_op=True)
        finish = self._into(out, t)
        return _TorchWork(
            work, lambda: finish(buf), self._watch, collective, stream_ordered=not buf.is_cpu
        )

    def alltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exchange rows: ``send_splits[r]`` rows go to rank r, ``recv_splits[r]`` come back."""
        return self.ialltoallv(t, send_splits, recv_splits, out=out).wait()

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> Work:
        """Start an alltoallv (``all_to_all_single``); ``wait()`` returns the received rows."""
        check_dtype(t)
        send, recv = check_splits(t, send_splits, recv_splits, self.size)
        out_shape = (sum(recv), *t.shape[1:])
        check_out(out, out_shape, t.dtype)
        buf = self._staged(t, reduce=False)
        if out is not None and self._usable(out, buf.dtype):
            landing = out
        else:
            landing = torch.empty(out_shape, dtype=buf.dtype, device=buf.device)
        collective = self._watch.issue("alltoallv")
        work = dist.all_to_all_single(
            landing,
            buf,
            output_split_sizes=recv,
            input_split_sizes=send,
            group=self._group,
            async_op=True,
        )
        finish = self._into(out, t)
        return _TorchWork(
            work, lambda: finish(landing), self._watch, collective, stream_ordered=not buf.is_cpu
        )

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order."""
        buf = self._staged(t, reduce=False)
        if buf.dim() == 0:
            buf = buf.reshape(1)
        out = torch.empty(
            (self.size * buf.shape[0], *buf.shape[1:]), dtype=buf.dtype, device=buf.device
        )
        self._watch.enter("allgather")
        try:
            _all_gather_single(out, buf, group=self._group)
        finally:
            self._watch.done()
        return self._back(out, t)

    def reduce_scatter(self, t: torch.Tensor, op: str | ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``t`` over ranks; return this rank's block of ``t.shape[0] / size`` rows."""
        torch_op = _TORCH_OPS[reduce_op(op)]
        rows = check_reduce_rows(t, self.size)
        buf = self._staged(t, reduce=True)
        out = torch.empty((rows, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
        self._watch.enter("reduce_scatter")
        try:
            _reduce_scatter_single(out, buf, op=torch_op, group=self._group)
        finally:
            self._watch.done()
        return self._back(out, t)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's ``obj`` (pickled), in rank order."""
        out: list[Any] = [None] * self.size
        self._watch.enter("allgather_object")
        try:
            dist.all_gather_object(out, obj, group=self._group)
        finally:
            self._watch.done()
        return out

    def barrier(self) -> None:
        """Block until every rank has entered."""
        self._watch.enter("barrier")
        try:
            dist.barrier(group=self._group)
        finally:
            self._watch.done()

    def split(self, color: int, key: int = 0) -> TorchCommunicator:
        """Return the sub-group of ranks with the same ``color``, ordered by ``key``.

        torch.distributed numbers a group's members in the order of their global ranks, so
        ``key`` may only keep that order (ties and increasing keys); a split asking for
        another order raises ``ParamInvalidError`` on every rank. Built with
        ``new_group(..., use_local_synchronization=True)``: only the members of each new
        group take part in creating it.
        """
        if not isinstance(color, int) or color < 0:
            raise ParamInvalidError("color", color, "must be an int >= 0")
        global_ranks = dist.get_process_group_ranks(self._group or dist.group.WORLD)
        entries = self.allgather_object((color, key, self.rank))
        groups: dict[int, list[int]] = {}
        for c, _, r in sorted(entries, key=lambda e: (e[1], e[2])):
            groups.setdefault(c, []).append(r)
        for c, members in sorted(groups.items()):  # same verdict on every rank
            if members != sorted(members):
                raise ParamInvalidError(
                    "key",
                    [k for cc, k, _ in entries if cc == c],
                    f"for color {c} orders ranks {members}; torch.distributed sub-groups keep "
                    "the parent's rank order, so keys must not reorder ranks",
                )
        ranks = [global_ranks[r] for r in groups[color]]
        group = dist.new_group(ranks, use_local_synchronization=True)
        return TorchCommunicator(group)
