"""Test double: the ranks of a group as threads of one process, with MPI's rule on sizes.

Each rank is a thread holding a :class:`ThreadRank`; their collectives meet at a barrier. As
in MPI, every rank must pass the same shape and dtype to a collective: a collective whose
ranks passed different ones raises :class:`RaggedCollective` on every rank (MPI would
truncate, hang or read garbage), and a rank that never arrives breaks the barrier after a
timeout instead of hanging the test.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class RaggedCollective(AssertionError):
    """The ranks of a collective passed different sizes: a bug in the code under test."""


class Hang(AssertionError):
    """A rank did not finish: in a real job the others would wait for ever."""


class ThreadGroup:
    """``size`` ranks on threads; :meth:`run` calls a function on every rank at once.

    Args:
        size: ranks in the group.
        timeout: seconds a collective waits for the other ranks before it counts as a hang.

    """

    def __init__(self, size: int, *, timeout: float = 10.0) -> None:
        self.size = size
        self.timeout = timeout
        self.calls = 0  # collectives run, for tests that count them
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[Any] = [None] * size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a collective of the group)."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        if rank == 0:
            self.calls += 1
        self._barrier.wait()
        return values

    def run(self, fn: Callable[[ThreadRank], T]) -> list[T | BaseException]:
        """Call ``fn`` on every rank's communicator; return each rank's result or exception.

        Raises:
            Hang: a rank had not returned ``timeout`` seconds after the others.

        """
        results: list[Any] = [None] * self.size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(ThreadRank(self, rank))
            except BaseException as exc:  # noqa: BLE001 - returned to the test
                results[rank] = exc  # a rank that failed alone leaves the others to time out

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 3)
        if any(t.is_alive() for t in threads):
            raise Hang("a rank did not finish")
        return results


def _equal_sizes(values: list[torch.Tensor], what: str) -> None:
    shapes = {(tuple(v.shape), v.dtype) for v in values}
    if len(shapes) != 1:
        raise RaggedCollective(
            f"{what} of different sizes across ranks: {sorted(map(str, shapes))}"
        )


class ThreadRank:
    """One rank's Communicator in a :class:`ThreadGroup` (the collectives agreement uses)."""

    backend = "threads"

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.size = group.size

    def allreduce(self, t: torch.Tensor, op: str = "sum", *, out: Any = None) -> torch.Tensor:
        values = self.group.exchange(self.rank, t.clone())
        _equal_sizes(values, "allreduce")
        stacked = torch.stack(values)
        result = {
            "sum": lambda: stacked.sum(0),
            "min": lambda: stacked.min(0).values,
            "max": lambda: stacked.max(0).values,
            "prod": lambda: stacked.prod(0),
        }[op]()
        return result if out is None else out.copy_(result)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        values = self.group.exchange(self.rank, t.clone())
        _equal_sizes(values, "allgather")
        return torch.cat([v.reshape(-1, *v.shape[1:]) if v.dim() else v.reshape(1) for v in values])

    def allgather_object(self, obj: Any) -> list[Any]:
        # pickled, as the real communicators do: what cannot travel fails here too
        return [pickle.loads(b) for b in self.group.exchange(self.rank, pickle.dumps(obj))]

    def barrier(self) -> None:
        self.group.exchange(self.rank, None)

    def _data(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("these tests end before any data moves")

    iallreduce = alltoallv = ialltoallv = reduce_scatter = split = _data
