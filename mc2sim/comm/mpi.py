"""``MpiCommunicator``: the Communicator protocol over mpi4py's buffer-based collectives.

Data moves through mpi4py's upper-case (buffer) calls on NumPy views of the tensors'
memory: nothing on the data path is pickled. Numerics:

* float32, float64 and the integer dtypes are reduced by MPI in their own type (integer
  sums wrap around as the C types do).
* float16 and bfloat16 reductions are computed in float32 and cast back to the input dtype
  once at the end (round to nearest even), so the result is the correctly rounded float32
  sum rather than a chain of 16-bit roundings. MPI has no bfloat16 type; a bfloat16 tensor
  that only moves (alltoallv, allgather) travels as its 16-bit words.
* Tensors on an accelerator (CUDA, or an Ascend ``npu`` through the same torch calls) are
  staged through pinned host memory. The blocking collectives copy to the host and back on
  the caller's current stream. The non-blocking ones (``iallreduce``, ``ialltoallv``) do not
  block the host: the copy to pinned memory is queued on the caller's current stream, MPI
  starts once an event says it is done (``test()`` or ``wait()``, in issue order, so every
  rank starts the group's collectives in the same order), and when MPI completes the copy
  back is queued on that same stream: work queued on it afterwards sees the result. The
  device-side input is kept alive until its copy is done, so the caching allocator cannot
  hand its memory to another stream too early. Where the MPI library says it is CUDA-aware
  (``MPI.Query_cuda_support()``; ``MC2SIM_MPI_DEVICE_AWARE=1`` or ``0`` overrides) the
  device buffers go to MPI as they are, without host copies. Ranks sharing one GPU use this
  backend: NCCL refuses two ranks on one device.

Every collective has a deadline (:mod:`mc2sim.comm.watchdog`): the communicator records each
one it issues and each wait, and a duplicate of the group's communicator carries the roll
call that names the ranks that never arrived.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

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
from mc2sim.comm.mpi_objects import MpiObjectCommunicator
from mc2sim.comm.watchdog import Collective, Watch
from mc2sim.errors import ParamInvalidError

__all__ = ["DEVICE_AWARE_ENV", "MpiCommunicator", "device_aware"]

DEVICE_AWARE_ENV = "MC2SIM_MPI_DEVICE_AWARE"
"""``1`` passes device buffers straight to MPI, ``0`` stages them through host memory;
unset asks the MPI library (``MPI.Query_cuda_support``, CUDA only)."""

_MPI_OPS = {
    ReduceOp.SUM: MPI.SUM,
    ReduceOp.PROD: MPI.PROD,
    ReduceOp.MAX: MPI.MAX,
    ReduceOp.MIN: MPI.MIN,
}

# The MPI type in which each dtype is reduced (16-bit floats are reduced as float32).
_REDUCE_TYPES = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int8: MPI.INT8_T,
    torch.uint8: MPI.UINT8_T,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
}

# Pure data movement only needs the element size: the MPI type of each itemsize.
_MOVE_TYPES = {1: MPI.BYTE, 2: MPI.INT16_T, 4: MPI.INT32_T, 8: MPI.INT64_T}

# The host paths below run on every call: they use as few torch calls as they can, since
# right after a large transfer has flushed the caches each costs microseconds
# (scripts/bench_comm.py measured 60 us of such overhead on a 16 MB alltoallv before).


def _host(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as a contiguous CPU tensor (device tensors are staged through the host)."""
    if not t.is_cpu:
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def _buffer(t: torch.Tensor) -> Any:
    """Return an MPI buffer over a contiguous host tensor's memory (no copy, no NumPy).

    The buffer does not keep ``t`` alive: callers hold ``t`` until the collective is done.
    """
    return MPI.buffer.fromaddress(t.data_ptr(), t.numel() * t.element_size())


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Return an uninitialised host tensor whose memory NumPy allocated.

    NumPy advises transparent huge pages for large arrays, so a fresh 64 MB receive buffer
    takes far fewer page faults than one from torch's CPU allocator (measured in
    ``scripts/bench_comm.py``: the difference is most of the cost of an allocating call).
    """
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))


_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.int32: np.int32,
    torch.int64: np.int64,
}


def _displacements(counts: list[int]) -> list[int]:
    """Exclusive prefix sums of ``counts``."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def _writable_in_place(out: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether MPI can write straight into ``out`` (host memory, contiguous, wire dtype)."""
    return out is not None and out.is_cpu and out.dtype == dtype and out.is_contiguous()


class _Scratch:
    """Reusable float32 buffers for 16-bit reductions, one per reduction in flight.

    A 16-bit AllReduce sums in a float32 copy. A fresh copy of tens of MiB costs a page fault
    per 4 KiB on first touch, which on this machine took longer than the reduction itself; the
    buffers are kept for the next call instead (at most ``KEEP``, the largest, are kept).
    """

    KEEP = 4

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # a progress thread may complete requests

    def take(self, numel: int) -> torch.Tensor:
        """A flat float32 buffer of at least ``numel`` elements, reused when one fits."""
        with self._lock:
            fitting = [b for b in self._free if b.numel() >= numel]
            if fitting:
                chosen = min(fitting, key=lambda b: b.numel())
                self._free = [b for b in self._free if b is not chosen]
                return chosen
        return _empty((numel,), torch.float32)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer taken earlier."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.numel(), reverse=True)
            del self._free[self.KEEP :]


class _Reduction:
    """Buffers of one reduction: what is sent, where it lands, and how it becomes the result."""

    def __init__(
        self,
        t: torch.Tensor,
        op: str | ReduceOp,
        *,
        rows: int | None = None,
        out: torch.Tensor | None = None,
        scratch: _Scratch | None = None,
    ) -> None:
        check_dtype(t)
        self.op = _MPI_OPS[reduce_op(op)]
        self.like = t
        out_shape = tuple(t.shape) if rows is None else (rows, *t.shape[1:])
        check_out(out, out_shape, t.dtype)
        self.out = out
        src = _host(t)
        # A 16-bit float is summed in a float32 copy that this call owns: reduce that copy in
        # place (MPI_IN_PLACE) rather than into a second buffer, which saves an allocation
        # and its page faults (bfloat16 AllReduce of 8 MB: 17.6 ms before, see BENCHMARKS).
        self.in_place = reduced_in_float32(src.dtype) and rows is None
        self.scratch = scratch
        self.borrowed: torch.Tensor | None = None
        if reduced_in_float32(src.dtype):
            numel = src.numel()
            if scratch is not None:
                self.borrowed = scratch.take(numel)
                buf = self.borrowed[:numel].view(src.shape)
            else:
                buf = _empty(tuple(src.shape), torch.float32)
            src = buf.copy_(src)
        self.send = src
        if self.in_place:
            self.recv = src
        elif out is not None and _writable_in_place(out, src.dtype):
            self.recv = out
        else:
            self.recv = _empty(out_shape, src.dtype)
        self.mpi_type = _REDUCE_TYPES[src.dtype]

    def buffers(self) -> tuple[Any, list[Any]]:
        """Return the send side (a buffer spec, or ``MPI.IN_PLACE``) and the receive side."""
        recv = [_buffer(self.recv), self.mpi_type]
        return (MPI.IN_PLACE if self.in_place else [_buffer(self.send), self.mpi_type]), recv

    def result(self) -> torch.Tensor:
        """Return the received data in the input's dtype and device (in ``out`` if given)."""
        if self.out is None:
            if self.recv.dtype == self.like.dtype and self.like.is_cpu:
                return self.recv
            result = self.recv.to(dtype=self.like.dtype, device=self.like.device)
        else:
            if self.recv is not self.out:
                self.out.copy_(self.recv)
            result = self.out
        if self.borrowed is not None and self.scratch is not None:
            self.scratch.give(self.borrowed)  # the float32 copy is no longer needed
            self.borrowed = None
        return result


class _MpiWork:
    """An MPI request and what turns its received buffer into the result."""

    def __init__(
        self,
        request: MPI.Request,
        finish: Callable[[], torch.Tensor],
        keep: Any,
        watch: Watch,
        collective: Collective,
    ):
        self._request = request
        self._finish = finish
        self._keep = keep  # buffers MPI reads or writes until completion
        self._result: torch.Tensor | None = None
        self._watch, self._collective = watch, collective

    def test(self) -> bool:
        if self._result is None and self._request.Test():
            self._result = self._complete()
        return self._result is not None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._watch.wait(self._collective)
            try:
                self._request.Wait()
            finally:
                self._watch.done()
            self._result = self._complete()
        return self._result

    def _complete(self) -> torch.Tensor:
        self._keep = None
        return self._finish()


def device_aware(device: torch.device) -> bool:
    """Whether MPI takes buffers on ``device`` as they are (see :data:`DEVICE_AWARE_ENV`).

    Raises:
        ParamInvalidError: ``MC2SIM_MPI_DEVICE_AWARE`` is neither ``0`` nor ``1``.
    """
    forced = os.environ.get(DEVICE_AWARE_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ParamInvalidError(DEVICE_AWARE_ENV, forced, "must be 0 or 1")
        return forced == "1"
    query = getattr(MPI, "Query_cuda_support", None)
    if device.type != "cuda" or query is None:
        return False
    try:
        return bool(query())
    except MPI.Exception:  # the library lacks the MPIX extension
        return False


class _Staging:
    """The staged collectives of one communicator that MPI has not started yet, in issue order.

    A staged collective can start once its input is in MPI's buffer (its ``ready`` event);
    they start strictly in issue order, so the ranks' MPI calls match. Every blocking call
    of the communicator first starts all of them (:meth:`flush`).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()  # the executor's progress thread tests works too
        self.pending: deque[_StagedWork] = deque()

    def advance(self, until: _StagedWork | None = None) -> None:
        """Start, in order, every pending collective whose input is ready.

        With ``until``, wait for the inputs of every collective up to and including it
        (blocking the host on their events) and start them.
        """
        with self.lock:
            while self.pending:
                head = self.pending[0]
                if until is None and not head.ready.query():
                    return
                head.ready.synchronize()
                self.pending.popleft()
                head.launch()
                if head is until:
                    return

    def flush(self) -> None:
        """Start every pending collective (waiting for their inputs)."""
        with self.lock:
            if self.pending:
                self.advance(self.pending[-1])


class _StagedWork:
    """A non-blocking collective on device tensors: copy out, MPI on the host, copy back.

    ``launch`` starts the MPI request once the input is in its buffer; ``finish`` queues the
    copy back on ``stream`` (the caller's stream at issue) and returns the result.
    """

    def __init__(
        self,
        *,
        staging: _Staging,
        ready: Any,
        start: Callable[[], MPI.Request],
        finish: Callable[[], torch.Tensor],
        stream: Any,
        keep: Any,
        watch: Watch,
        collective: Collective,
    ) -> None:
        self._staging, self.ready, self._start, self._finish = staging, ready, start, finish
        self._stream, self._keep = stream, keep
        self._watch, self._collective = watch, collective
        self._request: MPI.Request | None = None
        self._result: torch.Tensor | None = None
        with staging.lock:
            staging.pending.append(self)

    def launch(self) -> None:
        """Start the MPI request (the staging calls it, in issue order)."""
        self._request = self._start()

    def test(self) -> bool:
        if self._result is None:
            self._staging.advance()
            if self._request is not None and self._request.Test():
                self._result = self._complete()
        return self._result is not None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._watch.wait(self._collective)
            try:
                if self._request is None:
                    self._staging.advance(self)
                if self._request is None:  # pragma: no cover - advance(self) launches it
                    raise RuntimeError("a staged collective was not started")
                self._request.Wait()
            finally:
                self._watch.done()
            self._result = self._complete()
        return self._result

    def _complete(self) -> torch.Tensor:
        module = torch.get_device_module(self._stream.device)
        with module.stream(self._stream):
            result = self._finish()
        self._keep = None  # the input was copied out before MPI started
        return result


def _stage_in(t: torch.Tensor, dtype: torch.dtype, aware: bool) -> torch.Tensor:
    """The buffer MPI works on: ``t`` as ``dtype``, pinned on the host or (aware) a device copy.

    Always a fresh buffer, never ``t`` itself: reductions run in place and inputs are never
    modified. The copy is queued on the current stream.
    """
    if aware:
        return t.to(dtype=dtype, copy=True).contiguous()
    src = t.to(dtype=dtype)
    host = torch.empty(tuple(t.shape), dtype=dtype, pin_memory=True)
    host.copy_(src, non_blocking=True)
    return host


def _stage_out(buf: torch.Tensor, like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Queue ``buf`` back onto ``like``'s device and dtype (into ``out`` when given)."""
    dev = buf.to(device=like.device, non_blocking=True).to(dtype=like.dtype)
    if out is None:
        return dev
    out.copy_(dev)
    return out


class MpiCommunicator(MpiObjectCommunicator):
    """Communicator over an mpi4py intracommunicator (default ``MPI.COMM_WORLD``).

    Making one is collective over ``comm`` the first time (it duplicates ``comm`` for the
    watchdog's roll calls, :mod:`mc2sim.comm.watchdog`). Its object collectives are
    :class:`~mc2sim.comm.mpi_objects.MpiObjectCommunicator`'s, entered once this rank's
    staged device collectives have started.

    Args:
        comm: the mpi4py communicator to use; ``None`` means ``MPI.COMM_WORLD``.

    Raises:
        ParamInvalidError: ``MC2SIM_TIMEOUT`` is not a number of seconds > 0.

    """

    def __init__(self, comm: MPI.Intracomm | None = None) -> None:
        super().__init__(comm)
        self._scratch = _Scratch()
        self._staging = _Staging()

    def _settle(self) -> None:
        self._staging.flush()

    def allreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the element-wise reduction of ``t`` over all ranks (in ``out`` if given)."""
        red = _Reduction(t, op, out=out, scratch=self._scratch)
        send, recv = red.buffers()
        self._staging.flush()
        self._watch.enter("allreduce")
        try:
            self._comm.Allreduce(send, recv, red.op)
        finally:
            self._watch.done()
        return red.result()

    def iallreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> Work:
        """Start an allreduce (``MPI_Iallreduce``); ``wait()`` returns its result."""
        if isinstance(t, torch.Tensor) and not t.is_cpu:
            return self._staged_allreduce(t, op, out)
        red = _Reduction(t, op, out=out, scratch=self._scratch)
        send, recv = red.buffers()
        collective = self._watch.issue("allreduce")
        request = self._comm.Iallreduce(send, recv, red.op)
        return _MpiWork(request, red.result, (red, send, recv), self._watch, collective)

    def _alltoallv_args(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        out: torch.Tensor | None,
    ) -> tuple[list[Any], list[Any], Callable[[], torch.Tensor], torch.Tensor]:
        """Return the send and receive specs, what makes the result, and the tensor sent.

        The specs point at raw memory: the caller keeps the sent tensor alive (and the
        result's, which ``finish`` holds) until the collective completes.
        """
        check_dtype(t)
        send, recv = check_splits(t, send_splits, recv_splits, self.size)
        out_shape = (sum(recv), *t.shape[1:])
        check_out(out, out_shape, t.dtype)
        src = _host(t)
        row = math.prod(src.shape[1:])
        if out is not None and _writable_in_place(out, t.dtype):
            landing = out
        else:
            landing = _empty(out_shape, src.dtype)
        sbuf, rbuf = _buffer(src), _buffer(landing)
        mpi_type = _MOVE_TYPES[src.element_size()]
        scounts = send if row == 1 else [s * row for s in send]
        rcounts = recv if row == 1 else [r * row for r in recv]

        def finish() -> torch.Tensor:
            if out is None:
                return landing if t.is_cpu else landing.to(t.device)
            if landing is not out:
                out.copy_(landing)
            return out

        return (
            [sbuf, (scounts, _displacements(scounts)), mpi_type],
            [rbuf, (rcounts, _displacements(rcounts)), mpi_type],
            finish,
            src,
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
        send, recv, finish, _ = self._alltoallv_args(t, send_splits, recv_splits, out)
        self._staging.flush()
        self._watch.enter("alltoallv")
        try:
            self._comm.Alltoallv(send, recv)
        finally:
            self._watch.done()
        return finish()

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> Work:
        """Start an alltoallv (``MPI_Ialltoallv``); ``wait()`` returns the received rows."""
        if isinstance(t, torch.Tensor) and not t.is_cpu:
            return self._staged_alltoallv(t, send_splits, recv_splits, out)
        send, recv, finish, src = self._alltoallv_args(t, send_splits, recv_splits, out)
        collective = self._watch.issue("alltoallv")
        request = self._comm.Ialltoallv(send, recv)
        return _MpiWork(request, finish, (send, recv, src), self._watch, collective)

    def _staged(
        self,
        t: torch.Tensor,
        buf: torch.Tensor,
        start: Callable[[], MPI.Request],
        finish: Callable[[], torch.Tensor],
        kind: str,
    ) -> Work:
        """A staged collective on ``t``'s device (module docstring): ready when ``buf`` is."""
        module = torch.get_device_module(t.device)
        stream = module.current_stream(t.device)
        ready = module.Event()
        ready.record(stream)
        collective = self._watch.issue(kind)
        return _StagedWork(
            staging=self._staging, ready=ready, start=start, finish=finish, stream=stream,
            keep=(t, buf), watch=self._watch, collective=collective,
        )  # fmt: skip

    def _staged_allreduce(
        self, t: torch.Tensor, op: str | ReduceOp, out: torch.Tensor | None
    ) -> Work:
        """``iallreduce`` of a device tensor: a float32 copy for 16-bit floats, in place."""
        mpi_op = _MPI_OPS[reduce_op(op)]
        check_dtype(t)
        check_out(out, tuple(t.shape), t.dtype)
        if out is not None and out.device != t.device:
            raise ParamInvalidError("out.device", str(out.device), f"must be t's ({t.device})")
        wire = torch.float32 if reduced_in_float32(t.dtype) else t.dtype
        buf = _stage_in(t, wire, device_aware(t.device))
        spec = [_buffer(buf), _REDUCE_TYPES[wire]]
        return self._staged(
            t, buf,
            lambda: self._comm.Iallreduce(MPI.IN_PLACE, spec, mpi_op),
            lambda: _stage_out(buf, t, out),
            "allreduce",
        )  # fmt: skip

    def _staged_alltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        out: torch.Tensor | None,
    ) -> Work:
        """``ialltoallv`` of a device tensor: rows copied out, exchanged, copied back."""
        check_dtype(t)
        send, recv = check_splits(t, send_splits, recv_splits, self.size)
        out_shape = (sum(recv), *t.shape[1:])
        check_out(out, out_shape, t.dtype)
        if out is not None and out.device != t.device:
            raise ParamInvalidError("out.device", str(out.device), f"must be t's ({t.device})")
        aware = device_aware(t.device)
        buf = _stage_in(t, t.dtype, aware)
        if aware:
            landing = torch.empty(out_shape, dtype=t.dtype, device=t.device)
        else:
            landing = torch.empty(out_shape, dtype=t.dtype, pin_memory=True)
        row = math.prod(t.shape[1:])
        scounts = [s * row for s in send]
        rcounts = [r * row for r in recv]
        mpi_type = _MOVE_TYPES[t.element_size()]
        sspec = [_buffer(buf), (scounts, _displacements(scounts)), mpi_type]
        rspec = [_buffer(landing), (rcounts, _displacements(rcounts)), mpi_type]
        return self._staged(
            t, buf,
            lambda: self._comm.Ialltoallv(sspec, rspec),
            lambda: _stage_out(landing, t, out),
            "alltoallv",
        )  # fmt: skip

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order."""
        check_dtype(t)
        src = _host(t)
        if src.dim() == 0:
            src = src.reshape(1)
        out = _empty((self.size * src.shape[0], *src.shape[1:]), src.dtype)
        sbuf, rbuf = _buffer(src), _buffer(out)
        mpi_type = _MOVE_TYPES[src.element_size()]
        self._staging.flush()
        self._watch.enter("allgather")
        try:
            self._comm.Allgather([sbuf, mpi_type], [rbuf, mpi_type])
        finally:
            self._watch.done()
        return out.to(t.device)

    def reduce_scatter(self, t: torch.Tensor, op: str | ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``t`` over ranks; return this rank's block of ``t.shape[0] / size`` rows."""
        rows = check_reduce_rows(t, self.size)
        red = _Reduction(t, op, rows=rows)
        send, recv = red.buffers()
        self._staging.flush()
        self._watch.enter("reduce_scatter")
        try:
            self._comm.Reduce_scatter_block(send, recv, red.op)
        finally:
            self._watch.done()
        return red.result()
