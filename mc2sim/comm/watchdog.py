"""Deadlines on collectives: a rank that never arrives ends the job with one line naming it.

Every collective a communicator issues is numbered on that communicator (the same number on
every rank, since every rank issues a group's collectives in the same order) and labelled
with the op that issued it and its index in that op's call: ``gmm_alltoallv: alltoallv[3]``.
While this rank's main thread is blocked waiting for a collective, the watchdog thread
(one per process) checks the wait against the deadline, ``MC2SIM_TIMEOUT`` seconds (default
300). Past it, the watchdog holds a roll call on a side channel, a duplicate of the group's
MPI communicator: every live rank's watchdog answers with the number of the last collective
its rank issued, and a rank that does not answer within a grace period (it exited, was
killed, or holds the GIL) or answers with a smaller number has not arrived. The watchdog
prints one line and ends the job with exit status 3::

    mc2sim: timeout: gmm_alltoallv: alltoallv[3] waited 5.0 s; ranks not arrived: 3 (...)

Nothing is sent while every rank keeps up: the fast path of a collective is two attribute
writes and a clock read. The watchdog thread wakes every ``POLL_S`` to answer roll calls and
check the deadline; blocking MPI calls release the GIL, so it runs while the main thread is
stuck inside MPI. Without MPI (torchrun) there is no side channel: the deadline still ends
the job, and the line says the ranks are unknown.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, ParamSpec, Protocol, TypeVar

from mc2sim.comm.job import end_job
from mc2sim.errors import ParamInvalidError

__all__ = [
    "ANSWER_GRACE_S",
    "DEFAULT_TIMEOUT_S",
    "POLL_S",
    "TIMEOUT_ENV",
    "TIMEOUT_STATUS",
    "Answer",
    "Collective",
    "SideChannel",
    "Watch",
    "Watchdog",
    "collectives_named",
    "current_op",
    "in_op",
    "not_arrived",
    "op_call",
    "timeout_from_env",
    "timeout_line",
    "watch_of",
]

TIMEOUT_ENV = "MC2SIM_TIMEOUT"
"""The environment variable holding the deadline of every collective, in seconds."""

DEFAULT_TIMEOUT_S = 300.0
"""The deadline when ``MC2SIM_TIMEOUT`` is not set."""

TIMEOUT_STATUS = 3
"""Exit status of a job ended by the watchdog."""

POLL_S = 0.05
"""How often the watchdog thread answers roll calls and checks the deadline."""

ANSWER_GRACE_S = 1.5
"""How long a roll call waits for the answers of live ranks."""

DEFER_S = 3.0
"""How long a rank leaves another rank that called the roll first to end the job."""


def timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """Return the deadline of a collective in seconds: ``MC2SIM_TIMEOUT``, or 300.

    Args:
        environ: the environment to read; ``None`` means ``os.environ``.

    Returns:
        Seconds, > 0 (``inf`` turns the deadline off).

    Raises:
        ParamInvalidError: the variable is not a number of seconds > 0.

    """
    env = os.environ if environ is None else environ
    raw = env.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also refuses nan
        raise ParamInvalidError(TIMEOUT_ENV, raw, "must be a number of seconds > 0 (or inf)")
    return seconds


# -- where the main thread is: the op being called and the collective being waited for ---


@dataclass(slots=True)
class _OpCall:
    """One call of an op: its name and how many collectives it has issued so far."""

    name: str
    issued: int = 0


_OP: ContextVar[_OpCall | None] = ContextVar("mc2sim_op", default=None)
_NAMED: ContextVar[str | None] = ContextVar("mc2sim_collective_name", default=None)

P = ParamSpec("P")
R = TypeVar("R")
V = TypeVar("V")


def current_op() -> str | None:
    """The name of the op this thread is inside (the innermost), or ``None``."""
    call = _OP.get()
    return None if call is None else call.name


class _Scoped(Generic[V]):
    """Sets a context variable for the body of a ``with`` (a class: a generator costs more)."""

    __slots__ = ("_token", "_value", "_var")

    def __init__(self, var: ContextVar[V], value: V) -> None:
        self._var, self._value = var, value

    def __enter__(self) -> None:
        self._token = self._var.set(self._value)

    def __exit__(self, *exc: object) -> None:
        self._var.reset(self._token)


def op_call(name: str) -> AbstractContextManager[None]:
    """Label the collectives issued in the body with ``name`` and their index in this call.

    Args:
        name: the op's name, as users call it (``"gmm_alltoallv"``).

    Returns:
        The context manager.

    """
    return _Scoped(_OP, _OpCall(name))


def in_op(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an op so each of its calls runs inside :func:`op_call` ``(name)``."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with op_call(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def collectives_named(kind: str) -> AbstractContextManager[None]:
    """Label the collectives issued in the body ``kind`` instead of their method's name."""
    return _Scoped(_NAMED, kind)


class Collective(NamedTuple):
    """One collective as this rank issued it."""

    seq: int
    """Its number on its communicator, from 1: the same collective has it on every rank."""
    op: str | None
    """The op that issued it, or ``None`` outside any op."""
    kind: str
    """What it is: ``allreduce``, ``alltoallv``, ``agree``, ..."""
    nth: int
    """Its index among the op call's collectives (``seq - 1`` outside any op)."""
    issued_at: float
    """``time.monotonic()`` when it was issued."""

    def label(self) -> str:
        """``op: kind[index]``, or ``kind[index]`` outside any op."""
        name = f"{self.kind}[{self.nth}]"
        return name if self.op is None else f"{self.op}: {name}"


class Answer(NamedTuple):
    """A rank's answer to a roll call: where it is."""

    issued: int
    """The number of the last collective it issued on the group (0: none yet)."""
    last: str | None
    """That collective's label."""
    age: float
    """Seconds since it issued it."""


class SideChannel(Protocol):
    """Messages between the watchdogs of one group's ranks, apart from its collectives."""

    @property
    def rank(self) -> int:
        """This rank in the group."""
        ...

    @property
    def size(self) -> int:
        """Ranks in the group."""
        ...

    @property
    def world_ranks(self) -> Sequence[int]:
        """The job's rank of each rank of the group (for the line that names them)."""
        ...

    def ask(self, seq: int) -> None:
        """Ask every other rank where it is, about collective ``seq``."""
        ...

    def answer(self, dest: int, seq: int, answer: Answer) -> None:
        """Send rank ``dest`` this rank's ``answer`` to its roll call about ``seq``."""
        ...

    def receive(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, Answer]]]:
        """Return what arrived: roll calls ``(source, seq)``, answers ``(source, seq, answer)``."""
        ...


@dataclass(eq=False)
class Watch:
    """Where this rank is in the collectives of one communicator, and their deadline.

    The communicator calls :meth:`issue` when it starts a collective and :meth:`wait` /
    :meth:`done` around the time its main thread blocks on one; the watchdog thread reads
    the rest.
    """

    timeout: float
    """Deadline of a wait, in seconds."""
    channel: SideChannel | None = None
    """The roll-call channel, or ``None`` where there is none (no MPI)."""
    issued: int = 0
    """How many collectives this rank has issued on the communicator."""
    last: Collective | None = None
    """The last of them."""
    waiting: tuple[Collective, float] | None = None
    """The collective the main thread is blocked on and since when, or ``None``."""
    asked: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Roll calls received: collective number -> (lowest asking rank, when first asked)."""
    answers: dict[int, dict[int, Answer]] = field(default_factory=dict)
    """Answers received to this rank's roll calls: collective number -> rank -> answer."""

    def issue(self, kind: str) -> Collective:
        """Record that this rank starts a collective of ``kind``; return it."""
        self.issued = seq = self.issued + 1
        call = _OP.get()
        named = _NAMED.get()
        if call is None:
            nth, op = seq - 1, None
        else:
            nth, op = call.issued, call.name
            call.issued = nth + 1
        self.last = c = Collective(seq, op, kind if named is None else named, nth, time.monotonic())
        return c

    def wait(self, collective: Collective) -> None:
        """Record that the main thread blocks until ``collective`` completes."""
        self.waiting = (collective, time.monotonic())

    def enter(self, kind: str) -> Collective:
        """Issue a blocking collective and wait for it (:meth:`issue` then :meth:`wait`)."""
        c = self.issue(kind)
        self.waiting = (c, c.issued_at)
        return c

    def done(self) -> None:
        """Record that the main thread is no longer blocked."""
        self.waiting = None

    def where(self) -> Answer:
        """This rank's answer to a roll call."""
        last = self.last
        if last is None:
            return Answer(0, None, 0.0)
        return Answer(last.seq, last.label(), time.monotonic() - last.issued_at)


# -- the roll call and its line ------------------------------------------------------------


def not_arrived(
    size: int, rank: int, seq: int, answers: Mapping[int, Answer]
) -> dict[int, Answer | None]:
    """Return the ranks that have not issued collective ``seq``, with their answers.

    Args:
        size: ranks in the group.
        rank: the asking rank (it has arrived).
        seq: the collective's number.
        answers: the answers received, by rank; a rank without one did not answer.

    Returns:
        Rank -> its answer (``None`` for no answer), for every rank whose answer is missing
        or names an earlier collective, in rank order.

    """
    missing: dict[int, Answer | None] = {}
    for r in range(size):
        if r == rank:
            continue
        answer = answers.get(r)
        if answer is None or answer.issued < seq:
            missing[r] = answer
    return missing


def timeout_line(
    collective: Collective,
    waited: float,
    missing: Mapping[int, Answer | None] | None,
    world_ranks: Sequence[int] | None = None,
) -> str:
    """The one line a timeout prints.

    Args:
        collective: the collective waited for.
        waited: seconds waited.
        missing: :func:`not_arrived`'s result, or ``None`` when no roll call was possible.
        world_ranks: the job's rank of each group rank (``None``: the same numbers).

    Returns:
        ``mc2sim: timeout: OP: KIND[I] waited S s; ranks not arrived: R, ... (details)``.

    """
    head = f"mc2sim: timeout: {collective.label()} waited {waited:.1f} s; ranks not arrived: "
    if missing is None:
        return head + "unknown (no side channel to ask the other ranks: no MPI)"
    if not missing:
        return head + "none (every rank issued it; it did not complete)"

    def job_rank(r: int) -> int:
        return r if world_ranks is None else world_ranks[r]

    ranks = ", ".join(str(job_rank(r)) for r in missing)
    details = []
    for r, answer in missing.items():
        if answer is None:
            details.append(f"rank {job_rank(r)}: no answer (exited, killed or not responding)")
        elif answer.last is None:
            details.append(f"rank {job_rank(r)}: issued no collective yet")
        else:
            details.append(f"rank {job_rank(r)}: last issued {answer.last} {answer.age:.1f} s ago")
    return f"{head}{ranks} ({'; '.join(details)})"


class Watchdog:
    """Checks every watched communicator's wait against its deadline; ends the job past it.

    One per process (:func:`watch_of` starts it); tests drive :meth:`check` by hand.

    Args:
        end: what ends the job: ``end(line, status)``.
        grace: how long a roll call waits for answers.
        defer: how long to leave a rank that called the roll first to end the job.

    """

    def __init__(
        self,
        *,
        end: Callable[[str, int], object] = end_job,
        grace: float = ANSWER_GRACE_S,
        defer: float = DEFER_S,
    ) -> None:
        self._end = end
        self._grace = grace
        self._defer = defer
        self._watches: list[Watch] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, watch: Watch) -> None:
        """Watch ``watch`` from now on."""
        with self._lock:
            self._watches.append(watch)

    def start(self) -> None:
        """Run :meth:`check` every ``POLL_S`` on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mc2sim-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # before MPI_Finalize: no MPI call from here after it

    def stop(self) -> None:
        """Stop the thread (a rank that stops answering counts as not arrived)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        reported = False
        while not self._stop.wait(POLL_S):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bug here must not end the deadlines
                if not reported:
                    traceback.print_exc()
                    reported = True

    def check(self) -> None:
        """Answer roll calls; end the job if a wait is past its deadline."""
        with self._lock:
            watches = list(self._watches)
        now = time.monotonic()
        for watch in watches:
            self._serve(watch)
            waiting = watch.waiting
            if waiting is not None and now - waiting[1] > watch.timeout:
                self._expire(watch, *waiting)

    @staticmethod
    def _serve(watch: Watch) -> None:
        channel = watch.channel
        if channel is None:
            return
        try:
            asks, answers = channel.receive()
            for source, seq in asks:
                channel.answer(source, seq, watch.where())
                first = watch.asked.get(seq)
                lowest = source if first is None else min(first[0], source)
                watch.asked[seq] = (lowest, time.monotonic() if first is None else first[1])
            for source, seq, answer in answers:
                if seq in watch.answers:
                    watch.answers[seq][source] = answer
        except Exception:  # noqa: BLE001 - a broken channel must not stop the deadline
            watch.channel = None

    def _expire(self, watch: Watch, collective: Collective, since: float) -> None:
        """Call the roll for ``collective``, print the line, end the job."""
        waited = time.monotonic() - since
        channel = watch.channel
        if channel is None:
            self._end(timeout_line(collective, waited, None), TIMEOUT_STATUS)
            return
        seq = collective.seq
        if seq in watch.asked:  # another rank called this roll first and is ending the job
            self._sleep_serving(watch, self._defer)
        watch.answers[seq] = {}
        try:
            channel.ask(seq)
        except Exception:  # noqa: BLE001 - then nobody answers, and the line says so
            pass
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline and len(watch.answers[seq]) < channel.size - 1:
            self._sleep_serving(watch, POLL_S)
        lower = watch.asked.get(seq)
        if lower is not None and lower[0] < channel.rank:  # a lower rank asked too: its line
            self._sleep_serving(watch, self._defer)
        missing = not_arrived(channel.size, channel.rank, seq, watch.answers[seq])
        self._end(timeout_line(collective, waited, missing, channel.world_ranks), TIMEOUT_STATUS)

    def _sleep_serving(self, watch: Watch, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))
            self._serve(watch)


_WATCHDOG: Watchdog | None = None
_WATCHES: dict[object, Watch] = {}
_REGISTRY_LOCK = threading.Lock()


def watch_of(key: object, make: Callable[[], Watch]) -> Watch:
    """Return the one Watch of a communicator, made by ``make`` the first time.

    The key names the underlying group (an MPI communicator's handle, a process group): two
    Communicator objects over one group share a Watch, since their collectives are numbered
    in one sequence. A Watch of a group of several ranks is watched by the process's
    watchdog, started here.

    Args:
        key: the group's identity.
        make: builds the Watch (collectively: every rank of the group calls it alike).

    Returns:
        The Watch.

    """
    global _WATCHDOG
    with _REGISTRY_LOCK:
        watch = _WATCHES.get(key)
        if watch is not None:
            return watch
        watch = _WATCHES[key] = make()
        if watch.timeout != float("inf"):
            if _WATCHDOG is None:
                _WATCHDOG = Watchdog()
                _WATCHDOG.start()
            _WATCHDOG.add(watch)
        return watch
