"""The ``Communicator`` protocol every backend implements, and checks they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from mc2sim._compat import StrEnum
from mc2sim.comm.objects import ObjectCommunicator
from mc2sim.errors import ParamInvalidError

__all__ = [
    "Communicator",
    "Completed",
    "ReduceOp",
    "Work",
    "check_dtype",
    "check_out",
    "check_reduce_rows",
    "check_splits",
    "reduce_op",
    "reduced_in_float32",
]

#: 16-bit float dtypes that mc2sim's CPU collectives sum in float32 and cast back.
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: The dtypes every communicator carries.
SUPPORTED_DTYPES = frozenset(
    (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    )
)


class ReduceOp(StrEnum):
    """Reduction applied element-wise across ranks.

    Glossary: ``sum`` adds, ``prod`` multiplies, ``max`` / ``min`` keep the extreme value.
    The Ascend MC2 operators accept only ``sum``; the others serve tests and tools.
    """

    SUM = "sum"
    PROD = "prod"
    MAX = "max"
    MIN = "min"


def reduce_op(op: str | ReduceOp) -> ReduceOp:
    """Return ``op`` as a :class:`ReduceOp`, raising ``ParamInvalidError`` for unknown names.

    Args:
        op: a ReduceOp or its string value.

    Returns:
        The ReduceOp member.

    """
    try:
        return ReduceOp(op)
    except ValueError:
        allowed = ", ".join(repr(o.value) for o in ReduceOp)
        raise ParamInvalidError("op", op, f"must be one of {allowed}") from None


def reduced_in_float32(dtype: torch.dtype) -> bool:
    """Whether a reduction of ``dtype`` is computed in float32 on the CPU backends."""
    return dtype in HALF_DTYPES


@runtime_checkable
class Work(Protocol):
    """Handle of a non-blocking collective.

    ``wait()`` blocks until the collective is complete and returns its result; calling it
    again returns the same tensor. ``test()`` progresses the collective and says whether
    it is complete, without blocking.

    A work may also have a true attribute ``stream_ordered``: then the collective runs on
    the device and ``wait()`` does not block the host but orders it before the caller's
    current stream (NCCL, HCCL). Without it (MPI, gloo, staged device tensors) the host
    progresses the collective, and ``wait()`` blocks until it is done.
    """

    def wait(self) -> torch.Tensor:
        """Block until complete; return the result tensor."""
        ...

    def test(self) -> bool:
        """Progress the collective; return True once it is complete."""
        ...


class Completed:
    """A :class:`Work` whose collective is already complete: ``wait()`` returns ``result``.

    For a collective made blocking (the serial plans' calls) or skipped; ``stream_ordered``
    as :class:`Work` says, true where ``result`` is a device tensor already ordered on its
    stream.
    """

    def __init__(self, result: torch.Tensor, *, stream_ordered: bool = False) -> None:
        self.result = result
        self.stream_ordered = stream_ordered

    def wait(self) -> torch.Tensor:
        """Return the result."""
        return self.result

    def test(self) -> bool:
        """Complete already: True."""
        return True


@runtime_checkable
class Communicator(ObjectCommunicator, Protocol):
    """A group of ranks with the collectives the MC2 operators need.

    Its ``rank``, ``size``, ``allgather_object`` and ``barrier`` are
    :class:`~mc2sim.comm.objects.ObjectCommunicator`'s. Tensors are torch tensors of any
    dtype in ``SUPPORTED_DTYPES``; inputs are never modified and results are new tensors.
    Row-wise collectives act along dim 0.
    """

    @property
    def backend(self) -> str:
        """Short name of the transport: "mpi", "gloo", "nccl", "hccl", ..."""
        ...

    def allreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the element-wise reduction of ``t`` over all ranks (same shape on all).

        With ``out`` (same shape and dtype as ``t``) the result is written there and
        ``out`` is returned: no allocation per call.
        """
        ...

    def iallreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> Work:
        """Start :meth:`allreduce` without blocking; ``wait()`` returns its result."""
        ...

    def alltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exchange rows of ``t``: ``send_splits[r]`` consecutive rows go to rank r.

        Returns the ``sum(recv_splits)`` rows received, ordered by source rank, with
        ``recv_splits[r]`` rows from rank r. Splits may be zero. With ``out`` (that shape,
        ``t``'s dtype) the rows land there and ``out`` is returned.
        """
        ...

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> Work:
        """Start :meth:`alltoallv` without blocking; ``wait()`` returns its result."""
        ...

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (same shape on all) along dim 0, in rank order."""
        ...

    def reduce_scatter(self, t: torch.Tensor, op: str | ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``t`` over ranks and return this rank's block of ``t.shape[0] / size`` rows."""
        ...

    def split(self, color: int, key: int = 0) -> Communicator:
        """Return the sub-group of ranks that passed the same ``color``, ordered by ``key``.

        Ties in ``key`` keep the parent's rank order. Every rank of the group must call it.
        """
        ...


def check_splits(
    t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], size: int
) -> tuple[list[int], list[int]]:
    """Validate alltoallv splits on this rank and return them as lists of ints.

    Args:
        t: the rows to send (dim 0 are rows).
        send_splits: rows to send to each rank.
        recv_splits: rows to receive from each rank.
        size: the group's size.

    Returns:
        ``(send, recv)`` as lists of Python ints.

    Raises:
        ParamInvalidError: wrong lengths, negative counts, or sends not summing to the rows.

    """
    if t.dim() == 0:
        raise ParamInvalidError("t.shape", tuple(t.shape), "must have at least one dimension")
    send = [int(s) for s in send_splits]
    recv = [int(s) for s in recv_splits]
    if (  # one cheap test for the common case; the loop below names what is wrong
        len(send) == size
        and len(recv) == size
        and min(send) >= 0
        and min(recv) >= 0
        and sum(send) == t.shape[0]
    ):
        return send, recv
    for name, splits in (("send_splits", send), ("recv_splits", recv)):
        if len(splits) != size:
            raise ParamInvalidError(name, splits, f"must have one count per rank ({size})")
        if min(splits) < 0:
            raise ParamInvalidError(name, splits, "counts must be >= 0")
    raise ParamInvalidError(
        "send_splits", send, f"must sum to the rows of t ({t.shape[0]}), got {sum(send)}"
    )


def check_reduce_rows(t: torch.Tensor, size: int) -> int:
    """Return the rows per rank of a reduce-scatter, checking they divide evenly.

    Raises:
        ParamInvalidError: ``t`` is a scalar or its rows are not a multiple of ``size``.

    """
    if t.dim() == 0 or t.shape[0] % size != 0:
        raise ParamInvalidError(
            "t.shape", tuple(t.shape), f"dim 0 must be a multiple of the group size ({size})"
        )
    return t.shape[0] // size


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise ``ParamInvalidError`` unless ``out`` is None or a tensor of ``shape`` and ``dtype``."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ParamInvalidError("out", type(out).__name__, "must be a torch.Tensor or None")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ParamInvalidError(
            "out",
            f"{tuple(out.shape)} {out.dtype}",
            f"must be a tensor of the result's shape {tuple(shape)} and dtype {dtype}",
        )


def check_dtype(t: torch.Tensor) -> None:
    """Raise ``ParamInvalidError`` unless ``t`` is a tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise ParamInvalidError("t", type(t).__name__, "must be a torch.Tensor")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES))
        raise ParamInvalidError("t.dtype", t.dtype, f"must be one of {names}")
