"""Run a :class:`Plan` on real ranks: compute of tile i while tile i-1 communicates.

Compute tasks run in issue order on the calling thread; comm tasks are started as
non-blocking collectives (``iallreduce`` / ``ialltoallv``) and complete in the background.
A task whose dependency is still in flight waits for it. MPI on a CPU only progresses a
non-blocking collective while some MPI call runs, so the executor polls every request in
flight between tasks (``progress="poll"``), or a helper thread polls them continuously while
compute runs (``progress="thread"``; the matmuls release the GIL). MPICH's own progress
thread (``MPIR_CVAR_ASYNC_PROGRESS=1``) is a third option, set in the environment.

Every task's start and end are recorded (``time.perf_counter_ns`` relative to an epoch
taken right after a barrier, so the ranks' clocks line up) into the active
:func:`mc2sim.timeline.record` context, if any, with a comm task's bytes split into those
sent within the rank's node and across nodes (the ranks' host names give the placement:
:mod:`mc2sim.schedule.traffic`). A comm task's end is when its completion was observed: by
the next poll, a wait, or the progress thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mc2sim._compat import StrEnum
from mc2sim.comm import Communicator, Work
from mc2sim.errors import ParamInvalidError
from mc2sim.schedule.plan import Plan, Resource, Task
from mc2sim.schedule.traffic import Placement, level_bytes
from mc2sim.timeline import RunKey, Stream, current_recorder

__all__ = ["POLL_INTERVAL_S", "Progress", "TileRunner", "execute"]


class Progress(StrEnum):
    """How non-blocking collectives progress while compute runs.

    Glossary: ``poll`` tests every request in flight between tasks; ``thread`` adds a
    helper thread that tests them continuously.
    """

    POLL = "poll"
    THREAD = "thread"


class TileRunner(Protocol):
    """What an op provides to run its plan: the math of each tile and each chunk's data."""

    def compute(self, task: Task) -> None:
        """Run a compute task (store its result for later tasks)."""
        ...

    def start(self, task: Task) -> Work:
        """Start a comm task's non-blocking collective."""
        ...

    def land(self, task: Task, result: torch.Tensor) -> None:
        """Take a finished comm task's result."""
        ...


_CALLS: dict[tuple[str, str], int] = {}
"""How many times each (op, tiling in words) has run in this process: the next repetition."""

_CALLS_LOCK = threading.Lock()


def _next_run(plan: Plan) -> RunKey:
    """The run key of a new call of ``plan``: its op, its tiling, and the next repetition."""
    key = (plan.op, plan.tiling)
    with _CALLS_LOCK:
        repetition = _CALLS.get(key, 0)
        _CALLS[key] = repetition + 1
    return RunKey(op=plan.op, tiling=plan.tiling, repetition=repetition)


POLL_INTERVAL_S = 100e-6
"""How often the progress thread tests the requests in flight."""


@dataclass
class _InFlight:
    task: Task
    work: Work
    start_ns: int
    done_ns: int | None = None


class _Recorder:
    """Turns task times into TaskRecords for the active recording, if there is one."""

    def __init__(self, plan: Plan, comm: Communicator) -> None:
        self.sink = current_recorder()
        self.plan = plan
        self.run = _next_run(plan)
        self.epoch = 0
        self.levels: dict[int, tuple[int, int]] = {}
        if self.sink is not None:
            where = Placement.of_hosts(comm.allgather_object(socket.gethostname()))
            self.levels = {
                t.id: level_bytes(t, plan.rank, where)
                for t in plan.tasks
                if t.resource is Resource.COMM
            }
            comm.barrier()
            self.epoch = time.perf_counter_ns()

    def add(self, task: Task, start_ns: int, end_ns: int) -> None:
        if self.sink is None:
            return
        intra, inter = self.levels.get(task.id, (0, 0))
        self.sink.add_raw(
            (
                self.plan.rank,
                self.run,
                task.id,
                task.name,
                Stream.COMM if task.resource is Resource.COMM else Stream.COMPUTE,
                str(task.kind),
                (start_ns - self.epoch) * 1e-9,
                (end_ns - self.epoch) * 1e-9,
                task.flops,
                task.bytes,
                intra,
                inter,
            )
        )


class _Poller:
    """Tests the requests in flight, on demand or continuously from a helper thread."""

    def __init__(self, mode: Progress) -> None:
        self.lock = threading.Lock()
        self.inflight: dict[int, _InFlight] = {}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if mode is Progress.THREAD:
            self.thread = threading.Thread(target=self._loop, name="mc2sim-progress", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        # Poll, then sleep a little: the sleep releases the GIL and the core, so the polling
        # thread does not slow the compute it overlaps (measured in scripts/bench_overlap.py).
        while not self.stop.wait(POLL_INTERVAL_S):
            self.poll()

    def poll(self) -> None:
        with self.lock:
            for item in self.inflight.values():
                if item.done_ns is None and item.work.test():
                    item.done_ns = time.perf_counter_ns()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def execute(
    plan: Plan, comm: Communicator, runner: TileRunner, *, progress: str | Progress = "poll"
) -> RunKey:
    """Run ``plan`` on this rank; every rank of ``comm`` runs its own plan of the same op.

    Args:
        plan: this rank's plan.
        comm: the group the comm tasks run on.
        runner: the op's tile math and data.
        progress: ``"poll"`` or ``"thread"`` (see the module docstring).

    Returns:
        The run's key in the timeline: the plan's op and tiling, and which call of them
        this is in this process (every rank makes the same calls, so they agree).

    Raises:
        ParamInvalidError: an unknown ``progress`` mode.
    """
    try:
        mode = Progress(progress)
    except ValueError:
        raise ParamInvalidError("progress", progress, "must be 'poll' or 'thread'") from None
    recorder = _Recorder(plan, comm)
    poller = _Poller(mode)
    now: Callable[[], int] = time.perf_counter_ns

    def complete(task_id: int) -> None:
        with poller.lock:
            item = poller.inflight.pop(task_id)
        result = item.work.wait()
        done = item.done_ns if item.done_ns is not None else now()
        runner.land(item.task, result)
        recorder.add(item.task, item.start_ns, done)

    try:
        for task in plan.tasks:
            for dep in task.deps:
                if dep in poller.inflight:
                    complete(dep)
            if task.resource is Resource.COMPUTE:
                start = now()
                runner.compute(task)
                recorder.add(task, start, now())
                poller.poll()
            else:
                start = now()
                work = runner.start(task)
                with poller.lock:
                    poller.inflight[task.id] = _InFlight(task, work, start)
        for task_id in sorted(poller.inflight):
            complete(task_id)
    finally:
        poller.close()
    return recorder.run
