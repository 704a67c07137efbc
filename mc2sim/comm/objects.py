"""The part of a communicator that moves Python objects alone: ranks, gathers, barriers.

What a job needs of its ranks when it runs no kernel (a simulated sweep under ``mpiexec``:
its ranks deal out points, agree on errors and gather table rows) is this protocol, which
every :class:`~mc2sim.comm.base.Communicator` meets too. This module imports neither torch
nor mpi4py.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ObjectCommunicator"]


@runtime_checkable
class ObjectCommunicator(Protocol):
    """A group of ranks that exchange picklable Python objects."""

    @property
    def rank(self) -> int:
        """Rank of this process in the group, 0 <= rank < size."""
        ...

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        ...

    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's picklable ``obj``, in rank order (control path, not data)."""
        ...

    def barrier(self) -> None:
        """Block until every rank of the group has entered the barrier."""
        ...
