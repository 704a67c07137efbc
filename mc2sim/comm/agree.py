"""Agreement on parameter checks: if any rank's check fails, every rank raises the same error.

A rank that raised alone while the others entered a collective would leave them waiting
forever. Every multi-rank operator therefore checks its parameters locally, then calls
:func:`agree`, and only then moves data. The fast path (nobody failed) costs one small
allreduce; after a failure the lowest failing rank's error is sent to everyone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mc2sim.comm.base import Communicator
from mc2sim.errors import AclnnError

__all__ = ["agree", "agreed"]


def agree(comm: Communicator, error: AclnnError | None) -> None:
    """Raise, on every rank, the error of the lowest rank whose check failed.

    Every rank of ``comm`` must call this, passing the error its own checks found (or
    ``None``). The error raised everywhere has the class, code and message of the lowest
    failing rank's error, and its ``rank`` attribute names that rank.

    Args:
        comm: the group whose ranks must agree.
        error: this rank's error, or ``None`` when its checks passed.

    Raises:
        AclnnError: on every rank, when any rank passed an error.

    """
    mine = comm.size if error is None else comm.rank
    first = int(comm.allreduce(torch.tensor([mine], dtype=torch.int64), op="min").item())
    if first == comm.size:
        return
    errors = comm.allgather_object(error if comm.rank == first else None)
    chosen: AclnnError = error if (comm.rank == first and error is not None) else errors[first]
    chosen.rank = first
    raise chosen


@contextlib.contextmanager
def agreed(comm: Communicator) -> Iterator[None]:
    """Run parameter checks in the body, then :func:`agree` on their outcome.

    An ``AclnnError`` raised in the body is held back until every rank has finished its
    checks; then every rank raises the lowest failing rank's error. Other exceptions are
    bugs, not parameter errors, and propagate at once (``mc2sim.runtime`` aborts the job).

    Example::

        with agreed(comm):
            check_gmm_shapes(...)
        # every rank gets here, or every rank raised the same error
    """
    error: AclnnError | None = None
    try:
        yield
    except AclnnError as exc:
        error = exc
    agree(comm, error)
