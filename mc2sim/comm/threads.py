"""``ThreadCommunicator``: the Communicator protocol for ranks that are threads of one process.

:func:`run_threads` starts one thread per rank and hands each a communicator over one shared
group; the collectives meet in shared memory. It runs every fused op's real data path (the
same plans, runners and executor as under ``mpiexec``) in a plain pytest process, so the
single-process test tier checks the ops against their goldens at several world sizes; the
MPI tier stays for the real libraries.

Semantics follow :class:`~mc2sim.comm.base.Communicator` and ``MpiCommunicator``:

* Collectives match by order: the k-th collective a rank calls meets every other rank's k-th
  (its kind must be the same on every rank, or the group aborts). Non-blocking ones complete
  when every rank has started them; ``test()`` says so without blocking.
* Reductions add the ranks' tensors in rank order; float16 and bfloat16 are summed in float32
  and rounded once at the end, as ``MpiCommunicator`` does. Integer sums wrap around.
* Every result is a new tensor per rank (or the caller's ``out``); ``allgather_object``
  pickles, so each rank gets its own copy.
* A rank that raises, or a collective that waits longer than the group's timeout, aborts
  the group: every rank waiting in a collective raises :class:`GroupAborted` at once, and
  :func:`run_threads` re-raises the first rank's own exception, never hangs.

Tensors must be on the CPU: this is a test and teaching backend, not a transport.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import torch

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
from mc2sim.errors import ParamInvalidError

__all__ = ["DEFAULT_TIMEOUT_S", "GroupAborted", "ThreadCommunicator", "run_threads"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
"""How long a rank waits in one collective before the group aborts."""

Combine = Callable[[list[Any]], list[Any]]
"""Turns every rank's contribution (in rank order) into every rank's result."""


class GroupAborted(RuntimeError):
    """Raised in a rank's collective because another rank failed or a collective timed out."""


@dataclass
class _Slot:
    """The k-th collective of a group: what each rank put in, and what each gets back."""

    kind: str
    parts: list[Any]
    posted: int = 0
    results: list[Any] | None = None
    taken: int = 0
    arrived: list[bool] = field(default_factory=list)


class _Group:
    """State shared by the ranks of one group: the collectives in flight, the abort flag."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.slots: dict[int, _Slot] = {}
        self.failure: str | None = None
        self.children: dict[tuple[int, int], _Group] = {}

    def abort(self, why: str) -> None:
        """Wake every waiting rank with :class:`GroupAborted` (the first reason is kept)."""
        with self.cond:
            if self.failure is None:
                self.failure = why
            self.cond.notify_all()
            children = list(self.children.values())
        for child in children:
            child.abort(why)

    def _raise_if_aborted(self) -> None:
        if self.failure is not None:
            raise GroupAborted(self.failure)

    def post(self, seq: int, rank: int, kind: str, part: Any, combine: Combine) -> _Slot:
        """Put ``rank``'s part of collective ``seq``; the last rank to arrive combines them."""
        with self.cond:
            self._raise_if_aborted()
            slot = self.slots.get(seq)
            if slot is None:
                slot = _Slot(kind=kind, parts=[None] * self.size, arrived=[False] * self.size)
                self.slots[seq] = slot
            if slot.kind != kind:
                why = (
                    f"collective mismatch: rank {rank} calls {kind} as collective {seq}, "
                    f"where another rank called {slot.kind}"
                )
                self.failure = self.failure or why
                self.cond.notify_all()
                raise GroupAborted(why)
            slot.parts[rank] = part
            slot.arrived[rank] = True
            slot.posted += 1
            if slot.posted == self.size:
                try:
                    slot.results = combine(slot.parts)
                except Exception as exc:  # a mismatch between ranks: every rank must hear it
                    why = f"{kind} (collective {seq}) failed: {exc}"
                    self.failure = self.failure or why
                    self.cond.notify_all()
                    raise GroupAborted(why) from exc
                slot.parts = []  # the inputs are no longer needed
                self.cond.notify_all()
            return slot

    def done(self, slot: _Slot) -> bool:
        """Whether every rank has joined ``slot`` (raises if the group aborted)."""
        with self.cond:
            self._raise_if_aborted()
            return slot.results is not None

    def wait(self, seq: int, slot: _Slot, rank: int) -> None:
        """Block until every rank has joined ``slot``; abort the group after the timeout."""
        with self.cond:
            finished = self.cond.wait_for(
                lambda: slot.results is not None or self.failure is not None, self.timeout_s
            )
            self._raise_if_aborted()
            if not finished:
                missing = [r for r, came in enumerate(slot.arrived) if not came]
                why = (
                    f"rank {rank} waited {self.timeout_s:g} s in {slot.kind} (collective {seq}) "
                    f"for ranks {missing}"
                )
                self.failure = why
                self.cond.notify_all()
                raise GroupAborted(why)

    def take(self, seq: int, slot: _Slot, rank: int) -> Any:
        """Return ``rank``'s result of a finished slot; forget the slot once all took theirs."""
        with self.cond:
            if slot.results is None:
                raise RuntimeError(f"collective {seq} is not complete")
            result = slot.results[rank]
            slot.results[rank] = None
            slot.taken += 1
            if slot.taken == self.size:
                del self.slots[seq]
            return result

    def child(self, key: tuple[int, int], size: int) -> _Group:
        """The sub-group ``key`` (split number, color), created by its first member."""
        with self.cond:
            self._raise_if_aborted()
            if key not in self.children:
                self.children[key] = _Group(size, self.timeout_s)
            return self.children[key]


class _ThreadWork:
    """A collective in flight on one rank; ``wait()`` returns its result (in ``out`` if given)."""

    def __init__(
        self, comm: ThreadCommunicator, seq: int, slot: _Slot, out: torch.Tensor | None
    ) -> None:
        self._comm, self._seq, self._slot, self._out = comm, seq, slot, out
        self._result: Any = None
        self._complete = False
        self._lock = threading.Lock()  # test() may be called from a progress thread

    def _finish(self) -> Any:
        result = self._comm.group.take(self._seq, self._slot, self._comm.rank)
        if self._out is not None:
            self._out.copy_(result)
            result = self._out
        self._result, self._complete = result, True
        return result

    def test(self) -> bool:
        """Whether every rank has joined the collective (its result is then ready)."""
        with self._lock:
            if not self._complete and self._comm.group.done(self._slot):
                self._finish()
            return self._complete

    def wait(self) -> Any:
        """Block until every rank has joined; return this rank's result."""
        with self._lock:
            if not self._complete:
                self._comm.group.wait(self._seq, self._slot, self._comm.rank)
                self._finish()
            return self._result


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction of ``dtype`` is computed in."""
    return torch.float32 if reduced_in_float32(dtype) else dtype


_REDUCERS: dict[ReduceOp, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ReduceOp.SUM: torch.add,
    ReduceOp.PROD: torch.mul,
    ReduceOp.MAX: torch.maximum,
    ReduceOp.MIN: torch.minimum,
}


def _reduce(parts: Sequence[torch.Tensor], op: ReduceOp) -> torch.Tensor:
    """Reduce every rank's tensor in rank order (16-bit floats in float32, rounded once)."""
    first = parts[0]
    for r, t in enumerate(parts):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ParamInvalidError(
                f"t on rank {r}",
                f"{tuple(t.shape)} {t.dtype}",
                f"must match rank 0's {tuple(first.shape)} {first.dtype}",
            )
    wide = _wide(first.dtype)
    combine = _REDUCERS[op]
    acc = first.to(wide, copy=True)
    for t in parts[1:]:
        acc = combine(acc, t.to(wide))
    return acc.to(first.dtype)


class ThreadCommunicator:
    """One rank's view of a group whose ranks are threads of this process.

    Made by :func:`run_threads` (or :meth:`split`); every rank's thread uses its own.
    """

    def __init__(self, group: _Group, rank: int) -> None:
        if not 0 <= rank < group.size:
            raise ParamInvalidError("rank", rank, f"must be in [0, {group.size})")
        self.group = group
        self._rank = rank
        self._seq = 0

    @property
    def rank(self) -> int:
        """Rank of this thread in the group."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return self.group.size

    @property
    def backend(self) -> str:
        """Always ``"threads"``."""
        return "threads"

    def __repr__(self) -> str:
        return f"ThreadCommunicator(rank={self.rank}, size={self.size})"

    def _start(
        self, kind: str, part: Any, combine: Combine, out: torch.Tensor | None = None
    ) -> _ThreadWork:
        seq = self._seq
        self._seq += 1
        slot = self.group.post(seq, self._rank, kind, part, combine)
        return _ThreadWork(self, seq, slot, out)

    # -- reductions ----------------------------------------------------------------------

    def iallreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> Work:
        """Start an allreduce; ``wait()`` returns its result (in ``out`` if given)."""
        check_dtype(t)
        chosen = reduce_op(op)
        check_out(out, tuple(t.shape), t.dtype)

        def combine(parts: list[Any]) -> list[Any]:
            total = _reduce(parts, chosen)
            return [total.clone() for _ in parts]

        return self._start(f"allreduce({chosen})", t, combine, out)

    def allreduce(
        self, t: torch.Tensor, op: str | ReduceOp = "sum", *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the element-wise reduction of ``t`` over all ranks (in ``out`` if given)."""
        result: torch.Tensor = self.iallreduce(t, op, out=out).wait()
        return result

    def reduce_scatter(self, t: torch.Tensor, op: str | ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``t`` over ranks; return this rank's block of ``t.shape[0] / size`` rows."""
        check_dtype(t)
        chosen = reduce_op(op)
        rows = check_reduce_rows(t, self.size)

        def combine(parts: list[Any]) -> list[Any]:
            total = _reduce(parts, chosen)
            return [total[r * rows : (r + 1) * rows].clone() for r in range(len(parts))]

        result: torch.Tensor = self._start(f"reduce_scatter({chosen})", t, combine).wait()
        return result

    # -- data movement -------------------------------------------------------------------

    def ialltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> Work:
        """Start an alltoallv; ``wait()`` returns the received rows, by source rank."""
        check_dtype(t)
        send, recv = check_splits(t, send_splits, recv_splits, self.size)
        check_out(out, (sum(recv), *t.shape[1:]), t.dtype)
        return self._start("alltoallv", (t, send, recv), _alltoallv, out)

    def alltoallv(
        self,
        t: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exchange rows: ``send_splits[r]`` rows go to rank r, ``recv_splits[r]`` come back."""
        result: torch.Tensor = self.ialltoallv(t, send_splits, recv_splits, out=out).wait()
        return result

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order."""
        check_dtype(t)
        src = t.reshape(1) if t.dim() == 0 else t

        def combine(parts: list[Any]) -> list[Any]:
            first = parts[0]
            for r, p in enumerate(parts):
                if p.shape != first.shape or p.dtype != first.dtype:
                    raise ParamInvalidError(
                        f"t on rank {r}",
                        f"{tuple(p.shape)} {p.dtype}",
                        f"must match rank 0's {tuple(first.shape)} {first.dtype}",
                    )
            return [torch.cat(parts) for _ in parts]

        result: torch.Tensor = self._start("allgather", src, combine).wait()
        return result

    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's picklable ``obj`` (each rank gets its own copy), in rank order."""
        data = pickle.dumps(obj)

        def combine(parts: list[Any]) -> list[Any]:
            return [[pickle.loads(p) for p in parts] for _ in parts]

        result: list[Any] = self._start("allgather_object", data, combine).wait()
        return result

    def barrier(self) -> None:
        """Block until every rank of the group has entered the barrier."""
        self._start("barrier", None, lambda parts: [None] * len(parts)).wait()

    def split(self, color: int, key: int = 0) -> ThreadCommunicator:
        """Return the sub-group of ranks with the same ``color``, ordered by ``key``."""
        if not isinstance(color, int) or isinstance(color, bool) or color < 0:
            raise ParamInvalidError("color", color, "must be an int >= 0")
        number = self._seq
        everyone = self.allgather_object((color, key))
        members = sorted(
            (k, r) for r, (c, k) in enumerate(everyone) if c == color
        )  # ties in key keep the parent's order
        position = [r for _, r in members].index(self._rank)
        return ThreadCommunicator(self.group.child((number, color), len(members)), position)


def _alltoallv(parts: list[Any]) -> list[Any]:
    """Every rank's received rows: source s's ``send_s[r]`` rows for r, in source order."""
    size = len(parts)
    first = parts[0][0]
    offsets = []
    for s, (t, send, _) in enumerate(parts):
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
            raise ParamInvalidError(
                f"t on rank {s}",
                f"{tuple(t.shape)} {t.dtype}",
                f"rows must match rank 0's {tuple(first.shape[1:])} {first.dtype}",
            )
        starts, acc = [], 0
        for n in send:
            starts.append(acc)
            acc += n
        offsets.append(starts)
    results = []
    for r in range(size):
        recv = parts[r][2]
        pieces = []
        for s in range(size):
            t, send, _ = parts[s]
            if recv[s] != send[r]:
                raise ParamInvalidError(
                    f"recv_splits[{s}] on rank {r}",
                    recv[s],
                    f"must equal send_splits[{r}] on rank {s} ({send[r]})",
                )
            pieces.append(t[offsets[s][r] : offsets[s][r] + send[r]])
        results.append(torch.cat(pieces).clone())
    return results


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    error: BaseException | None = None


def run_threads(
    size: int,
    fn: Callable[[ThreadCommunicator], T],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[T]:
    """Run ``fn(comm)`` on ``size`` threads, one per rank of a new group; return the results.

    Args:
        size: ranks, >= 1.
        fn: what every rank runs; it gets that rank's communicator.
        timeout_s: the longest a rank waits in one collective before the group aborts.

    Returns:
        Each rank's return value, in rank order.

    Raises:
        BaseException: the exception of the lowest rank that failed on its own (ranks that
            only saw the abort raise :class:`GroupAborted`, which is raised only when no rank
            failed otherwise, e.g. a collective timed out).
        ParamInvalidError: ``size`` < 1.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ParamInvalidError("size", size, "must be an int >= 1")
    group = _Group(size, timeout_s)
    outcomes: list[_Outcome[T]] = [_Outcome() for _ in range(size)]

    def body(rank: int) -> None:
        try:
            outcomes[rank].value = fn(ThreadCommunicator(group, rank))
        except BaseException as exc:  # every failure must reach the caller
            outcomes[rank].error = exc
            if not isinstance(exc, GroupAborted):
                group.abort(f"rank {rank} raised {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=body, args=(r,), name=f"mc2sim-rank-{r}", daemon=True)
        for r in range(size)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * 4)
        if thread.is_alive():  # stuck outside any collective: give up on it
            group.abort(f"{thread.name} still runs after {timeout_s * 4:g} s")
            raise GroupAborted(f"{thread.name} did not finish")
    errors = [o.error for o in outcomes if o.error is not None]
    own = [e for e in errors if not isinstance(e, GroupAborted)]
    if own or errors:
        raise (own or errors)[0]
    return [cast(T, o.value) for o in outcomes]
