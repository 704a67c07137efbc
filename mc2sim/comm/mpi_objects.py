"""``MpiObjectCommunicator``: ranks, gathers and barriers over mpi4py, without torch.

The object-moving half of :class:`~mc2sim.comm.mpi.MpiCommunicator`, which extends it with
the tensor collectives. A job that runs no kernel (a simulated sweep under ``mpiexec``) uses
this one and so never imports torch: 1.1 to 1.9 s of a process's start on this project's
machine. Its collectives have the same deadlines (:mod:`mc2sim.comm.watchdog`): the group's
communicator is duplicated for the watchdog's roll calls, :class:`MpiSideChannel`.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from mpi4py import MPI

from mc2sim.comm.watchdog import Answer, Watch, timeout_from_env, watch_of
from mc2sim.errors import ParamInvalidError

__all__ = ["MpiObjectCommunicator", "MpiSideChannel", "mpi_watch"]

_Comm = TypeVar("_Comm", bound="MpiObjectCommunicator")


class MpiSideChannel:
    """The watchdogs' roll calls, on a duplicate of a group's communicator.

    Small pickled point-to-point messages, sent without waiting and received by probing, so
    a peer that exited or never answers cannot block the asking rank.

    Args:
        comm: the group; duplicated here (collectively, on every rank of it).

    """

    _ASK = 0x6D32
    _ANSWER = 0x6D33

    def __init__(self, comm: MPI.Intracomm) -> None:
        self._comm: MPI.Intracomm = comm.Dup()
        self._rank, self._size = int(comm.Get_rank()), int(comm.Get_size())
        world = MPI.COMM_WORLD.Get_group()
        group = comm.Get_group()
        self._world = [int(r) for r in group.Translate_ranks(list(range(self._size)), world)]
        self._sends: list[MPI.Request] = []

    @property
    def rank(self) -> int:
        """This rank in the group."""
        return self._rank

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return self._size

    @property
    def world_ranks(self) -> list[int]:
        """The ``MPI.COMM_WORLD`` rank of each rank of the group."""
        return self._world

    def _send(self, dest: int, tag: int, obj: Any) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self._comm.isend(obj, dest=dest, tag=tag))

    def ask(self, seq: int) -> None:
        """Ask every other rank where it is, about collective ``seq``."""
        for dest in range(self._size):
            if dest != self._rank:
                self._send(dest, self._ASK, seq)

    def answer(self, dest: int, seq: int, answer: Answer) -> None:
        """Send rank ``dest`` this rank's answer to its roll call about ``seq``."""
        self._send(dest, self._ANSWER, (seq, tuple(answer)))

    def receive(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, Answer]]]:
        """Return the roll calls and answers that arrived."""
        asks: list[tuple[int, int]] = []
        answers: list[tuple[int, int, Answer]] = []
        status = MPI.Status()
        while (message := self._comm.improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)) is not None:
            source, tag = status.Get_source(), status.Get_tag()
            body = message.recv()
            if tag == self._ASK:
                asks.append((source, int(body)))
            elif tag == self._ANSWER:
                seq, fields = body
                answers.append((source, int(seq), Answer(*fields)))
        return asks, answers


def mpi_watch(comm: MPI.Intracomm) -> Watch:
    """Return the Watch of an MPI communicator (made collectively on first use).

    Args:
        comm: the group.

    Returns:
        Its Watch: deadline ``MC2SIM_TIMEOUT`` and a roll-call channel, or no deadline for a
        group of one rank.

    Raises:
        ParamInvalidError: ``MC2SIM_TIMEOUT`` is not a number of seconds > 0.

    """

    def make() -> Watch:
        if comm.Get_size() == 1:
            return Watch(timeout=float("inf"))
        timeout = timeout_from_env()
        return Watch(timeout=timeout, channel=MpiSideChannel(comm))

    return watch_of(("mpi", comm.py2f()), make)


class MpiObjectCommunicator:
    """The object collectives over an mpi4py intracommunicator (default ``MPI.COMM_WORLD``).

    Making one is collective over ``comm`` the first time (it duplicates ``comm`` for the
    watchdog's roll calls, :mod:`mc2sim.comm.watchdog`).

    Args:
        comm: the mpi4py communicator to use; ``None`` means ``MPI.COMM_WORLD``.

    Raises:
        ParamInvalidError: ``MC2SIM_TIMEOUT`` is not a number of seconds > 0.

    """

    def __init__(self, comm: MPI.Intracomm | None = None) -> None:
        self._comm: MPI.Intracomm = MPI.COMM_WORLD if comm is None else comm
        self._watch = mpi_watch(self._comm)

    @property
    def comm(self) -> MPI.Intracomm:
        """The underlying mpi4py communicator."""
        return self._comm

    @property
    def rank(self) -> int:
        """Rank of this process in the group."""
        return int(self._comm.Get_rank())

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return int(self._comm.Get_size())

    @property
    def backend(self) -> str:
        """Always ``"mpi"``."""
        return "mpi"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def _settle(self) -> None:
        """Finish what this rank queued before it enters a collective (nothing, here)."""

    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's ``obj`` (pickled), in rank order."""
        self._settle()
        self._watch.enter("allgather_object")
        try:
            return list(self._comm.allgather(obj))
        finally:
            self._watch.done()

    def barrier(self) -> None:
        """Block until every rank has entered."""
        self._settle()
        self._watch.enter("barrier")
        try:
            self._comm.Barrier()
        finally:
            self._watch.done()

    def split(self: _Comm, color: int, key: int = 0) -> _Comm:
        """Return the sub-group of ranks with the same ``color``, ordered by ``key``.

        The sub-group's communicator is of this one's class.
        """
        if not isinstance(color, int) or color < 0:
            raise ParamInvalidError("color", color, "must be an int >= 0")
        self._settle()
        self._watch.enter("split")
        try:
            sub = cast(MPI.Intracomm, self._comm.Split(color, key))
        finally:
            self._watch.done()
        return type(self)(sub)
