"""Run a :class:`Plan` on real ranks: compute of tile i while tile i-1 communicates.

Compute tasks run in issue order on the calling thread; comm tasks are started as
non-blocking collectives (``iallreduce`` / ``ialltoallv``) and complete in the background.
A task whose dependency is still in flight waits for it. MPI on a CPU only progresses a
non-blocking collective while some MPI call runs, so the executor polls every request in
flight between tasks (``progress="poll"``), or a helper thread polls them continuously while
compute runs (``progress="thread"``; the matmuls release the GIL). MPICH's own progress
thread (``MPIR_CVAR_ASYNC_PROGRESS=1``) is a third option, set in the environment.

Every task's start and end are recorded (``time.perf_counter_ns`` relative to an epoch
taken right after a barrier; the ranks of one machine are then put on its clock, from the
first of them to leave the barrier, so a rank that waited for a shared core before it first
ran shows that wait, and machines line up by the barrier) into the active
:func:`mc2sim.timeline.record` context, if any, with a comm task's bytes split into those
sent within the rank's node and across nodes (the ranks' host names give the placement:
:mod:`mc2sim.schedule.traffic`). A comm task's end is when its completion was observed: by
the next poll, a wait, or the progress thread. A compute task on the CPU also records the
process's CPU time over it (``time.process_time_ns``: every thread of the rank, so a kernel's
intra-op threads count): its own work, where ranks sharing cores stretch its span.

On an accelerator (``device`` not the CPU: CUDA, or an Ascend ``npu`` through the same
``torch.get_device_module`` stream and event calls) the plan runs on two device streams:
compute tasks on a compute stream, each comm task's collective on a comm stream.
Dependencies are device events (a stream waits on the event recorded after the task it
depends on): the host never waits for a tile. A task's start and end are events recorded
on its stream around it, measured against an epoch event recorded right after the barrier
(``Clock.DEVICE``); the host's own interval (issuing the kernels; for a host-progressed
collective, until the host saw it complete) is recorded as ``host_start_s``/``host_end_s``.
A collective whose ``wait()`` is stream-ordered (NCCL, HCCL) completes on the comm stream at
once. One that the host progresses (MPI, staged through pinned host memory) is polled like
on the CPU; when it completes its copy back is queued on the comm stream, followed by its
end event, and such a task's clock says ``staged``. The host synchronises with the device
once, at the end of the call; every work and result is kept until then, so the caching
allocator never recycles memory another stream still reads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mc2sim._compat import StrEnum
from mc2sim.comm import Communicator, Work
from mc2sim.errors import ParamInvalidError
from mc2sim.runtime import machine_id
from mc2sim.schedule.plan import Plan, Resource, Task
from mc2sim.schedule.traffic import Placement, level_bytes
from mc2sim.timeline import Clock, RunKey, Stream, current_recorder

__all__ = [
    "POLL_INTERVAL_S",
    "SPIN_S",
    "Progress",
    "TileRunner",
    "device_streams",
    "execute",
    "progress_mode",
]


class Progress(StrEnum):
    """How non-blocking collectives progress while compute runs.

    Glossary: ``poll`` tests every request in flight between tasks; ``thread`` adds a
    helper thread that tests them continuously.
    """

    POLL = "poll"
    THREAD = "thread"


def progress_mode(progress: str | Progress) -> Progress:
    """``progress`` as a :class:`Progress`; the ops check it with their other parameters.

    Raises:
        ParamInvalidError: not ``"poll"`` or ``"thread"``.
    """
    try:
        return Progress(progress)
    except ValueError:
        raise ParamInvalidError("progress", progress, "must be 'poll' or 'thread'") from None


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

SPIN_S = 1.0
"""On a device, how long the host polls the collectives in flight while it waits for one,
before it blocks in that one's wait (where the watchdog's deadline applies)."""


@dataclass
class _InFlight:
    task: Task
    work: Work
    start_ns: int
    done_ns: int | None = None


class _Recorder:
    """Turns task times into TaskRecords for the active recording, if there is one.

    Times are kept from this rank's epoch until :meth:`close`, which moves them onto its
    machine's clock: from the first epoch among the ranks of its machine (:func:`machine_id`),
    i.e. when the barrier let the first of them go. Ranks that share cores leave the barrier
    when they first get one; their wait for it is time in the call, not before it.
    """

    def __init__(self, plan: Plan, comm: Communicator) -> None:
        self.sink = current_recorder()
        self.plan = plan
        self.comm = comm
        self.run = _next_run(plan)
        self.epoch = 0
        self.levels: dict[int, tuple[int, int]] = {}
        self.rows: list[tuple[Task, float, float, tuple[Any, ...]]] = []
        if self.sink is not None:
            where = Placement.of_hosts(comm.allgather_object(socket.gethostname()))
            self.levels = {
                t.id: level_bytes(t, plan.rank, where)
                for t in plan.tasks
                if t.resource is Resource.COMM
            }
            comm.barrier()
            self.epoch = time.perf_counter_ns()

    def add_device(
        self,
        task: Task,
        start_s: float,
        end_s: float,
        clock: Clock,
        host_ns: tuple[int, int],
    ) -> None:
        """Add a task timed by device events (seconds from the epoch already)."""
        if self.sink is None:
            return
        host = ((host_ns[0] - self.epoch) * 1e-9, (host_ns[1] - self.epoch) * 1e-9)
        self.rows.append((task, start_s, max(start_s, end_s), (clock, *host, None)))

    def add(self, task: Task, start_ns: int, end_ns: int, cpu_ns: int | None = None) -> None:
        """Add a task timed by the host's clock (nanoseconds), with its CPU time if taken."""
        if self.sink is None:
            return
        extra = () if cpu_ns is None else (Clock.HOST, None, None, cpu_ns * 1e-9)
        self.rows.append(
            (task, (start_ns - self.epoch) * 1e-9, (end_ns - self.epoch) * 1e-9, extra)
        )

    def close(self) -> None:
        """Hand the records to the recording, on the machine's clock (every rank calls it)."""
        if self.sink is None:
            return
        mine = machine_id()
        epochs = self.comm.allgather_object((mine, self.epoch))
        offset = (self.epoch - min(e for m, e in epochs if m == mine)) * 1e-9
        for task, start_s, end_s, extra in self.rows:
            if extra and extra[1] is not None:  # the host's interval of a device task
                extra = (extra[0], extra[1] + offset, extra[2] + offset, extra[3])
            self.sink.add_raw(self._fields(task, start_s + offset, end_s + offset) + extra)
        self.rows.clear()

    def _fields(self, task: Task, start_s: float, end_s: float) -> tuple[object, ...]:
        """A record's fields up to its bytes by level (``Timeline.add_raw``'s order)."""
        intra, inter = self.levels.get(task.id, (0, 0))
        stream = Stream.COMM if task.resource is Resource.COMM else Stream.COMPUTE
        return (
            self.plan.rank, self.run, task.id, task.name, stream, str(task.kind),
            start_s, end_s, task.flops, task.bytes, intra, inter,
        )  # fmt: skip


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
    plan: Plan,
    comm: Communicator,
    runner: TileRunner,
    *,
    progress: str | Progress = "poll",
    device: torch.device | str | None = None,
) -> RunKey:
    """Run ``plan`` on this rank; every rank of ``comm`` runs its own plan of the same op.

    Args:
        plan: this rank's plan.
        comm: the group the comm tasks run on.
        runner: the op's tile math and data.
        progress: ``"poll"`` or ``"thread"`` (see the module docstring).
        device: where the runner's tensors live; an accelerator runs the plan on its
            compute and comm streams (module docstring). None or the CPU: the calling
            thread.

    Returns:
        The run's key in the timeline: the plan's op and tiling, and which call of them
        this is in this process (every rank makes the same calls, so they agree).

    Raises:
        ParamInvalidError: an unknown ``progress`` mode.
    """
    mode = progress_mode(progress)
    where = torch.device("cpu") if device is None else torch.device(device)
    if where.type != "cpu":
        return _DeviceRun(plan, comm, runner, where, mode).run()
    recorder = _Recorder(plan, comm)
    poller = _Poller(mode)
    now: Callable[[], int] = time.perf_counter_ns
    # the CPU time only where it is recorded (reading it is a system call; int() is 0)
    cpu_now: Callable[[], int] = time.process_time_ns if recorder.sink is not None else int

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
                cpu = cpu_now()
                start = now()
                runner.compute(task)
                end = now()
                recorder.add(task, start, end, cpu_now() - cpu)
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
    recorder.close()
    return recorder.run


_STREAMS: dict[torch.device, tuple[Any, Any]] = {}
"""The compute and comm streams of each device, made once per process."""


def device_streams(device: torch.device) -> tuple[Any, Any]:
    """The executor's ``(compute, comm)`` streams on ``device`` (made on first use)."""
    key = _indexed(device)
    if key not in _STREAMS:
        module = torch.get_device_module(key)
        _STREAMS[key] = (module.Stream(key), module.Stream(key))
    return _STREAMS[key]


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index (the current device of its type when it has none)."""
    if device.index is not None:
        return device
    return torch.device(device.type, torch.get_device_module(device).current_device())


@dataclass
class _Staged:
    """A host-progressed collective in flight on the device path."""

    task: Task
    work: Work
    host_start_ns: int
    done_ns: int | None = None


class _DeviceRun:
    """One plan on a device's compute and comm streams (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        comm: Communicator,
        runner: TileRunner,
        device: torch.device,
        mode: Progress,
    ) -> None:
        self.plan, self.runner = plan, runner
        self.device = _indexed(device)
        self.module = torch.get_device_module(self.device)
        self.compute, self.comm_stream = device_streams(self.device)
        self.caller = self.module.current_stream(self.device)
        self.mode = mode
        self.comm = comm
        self.events: dict[int, tuple[Any, Any]] = {}
        self.host: dict[int, tuple[int, int]] = {}
        self.clock: dict[int, Clock] = {}
        self.inflight: dict[int, _Staged] = {}
        self.keep: list[object] = []  # works and results, alive until the final sync
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _event(self) -> Any:
        return self.module.Event(enable_timing=True)

    def run(self) -> RunKey:
        recording = current_recorder() is not None
        if recording:
            # the streams idle at the epoch: earlier work must not count in this run
            self.module.synchronize(self.device)
        recorder = _Recorder(self.plan, self.comm)  # a barrier when recording
        epoch = self._event()
        issued = time.perf_counter_ns()
        epoch.record(self.compute)
        # the epoch event fires when the host records it (the stream is idle): its time on
        # the host's clock, from the host epoch right after the barrier
        offset_s = (issued - recorder.epoch) * 1e-9 if recording else 0.0
        ready = self.module.Event()
        ready.record(self.caller)  # inputs made on the caller's stream
        self.compute.wait_event(ready)
        self.comm_stream.wait_event(ready)
        thread = None
        if self.mode is Progress.THREAD:
            thread = threading.Thread(target=self._loop, name="mc2sim-progress", daemon=True)
            thread.start()
        try:
            for task in self.plan.tasks:
                self._issue(task)
                self._poll()
            while self.inflight:
                self._settle(min(self.inflight))
        finally:
            self.stop.set()
            if thread is not None:
                thread.join()
        self.caller.wait_stream(self.compute)
        self.caller.wait_stream(self.comm_stream)
        self.compute.synchronize()
        self.comm_stream.synchronize()
        if recording:
            for task in self.plan.tasks:
                start, end = self.events[task.id]
                recorder.add_device(
                    task,
                    epoch.elapsed_time(start) * 1e-3 + offset_s,
                    epoch.elapsed_time(end) * 1e-3 + offset_s,
                    self.clock[task.id],
                    self.host[task.id],
                )
        self.keep.clear()
        recorder.close()
        return recorder.run

    def _stream_of(self, task: Task) -> Any:
        return self.comm_stream if task.resource is Resource.COMM else self.compute

    def _issue(self, task: Task) -> None:
        stream = self._stream_of(task)
        for dep in task.deps:
            if dep in self.inflight:
                self._settle(dep)
            if self.plan.tasks[dep].resource is not task.resource:
                stream.wait_event(self.events[dep][1])
        start, end = self._event(), self._event()
        self.events[task.id] = (start, end)
        host_start = time.perf_counter_ns()
        with self.module.stream(stream):
            start.record(stream)
            if task.resource is Resource.COMPUTE:
                self.runner.compute(task)
                end.record(stream)
                self.clock[task.id] = Clock.DEVICE
                self.host[task.id] = (host_start, time.perf_counter_ns())
                return
            work = self.runner.start(task)
            self.keep.append(work)
            if getattr(work, "stream_ordered", False):
                result = work.wait()  # the comm stream waits for the collective
                self.runner.land(task, result)
                end.record(stream)
                self.keep.append(result)
                self.clock[task.id] = Clock.DEVICE
                self.host[task.id] = (host_start, time.perf_counter_ns())
                return
        with self.lock:
            self.inflight[task.id] = _Staged(task, work, host_start)
        self.clock[task.id] = Clock.STAGED

    def _poll(self) -> None:
        with self.lock:
            for item in self.inflight.values():
                if item.done_ns is None and item.work.test():
                    item.done_ns = time.perf_counter_ns()

    def _loop(self) -> None:
        while not self.stop.wait(POLL_INTERVAL_S):
            self._poll()

    def _settle(self, task_id: int) -> None:
        """Wait for a host-progressed collective, polling every one in flight meanwhile.

        Polling lets each later collective start as soon as its input is out of the device
        (MPI progresses them together); after ``SPIN_S`` the wait blocks, under the
        collective's deadline (:mod:`mc2sim.comm.watchdog`).
        """
        item = self.inflight[task_id]
        deadline = time.perf_counter() + SPIN_S
        while item.done_ns is None and time.perf_counter() < deadline:
            self._poll()
        self._land(task_id)

    def _land(self, task_id: int) -> None:
        """Complete a host-progressed collective: its copy back and end event on the stream."""
        with self.lock:
            item = self.inflight.pop(task_id)
        result = item.work.wait()  # queues the copy back on the comm stream
        done = item.done_ns if item.done_ns is not None else time.perf_counter_ns()
        with self.module.stream(self.comm_stream):
            self.runner.land(item.task, result)
            self.events[task_id][1].record(self.comm_stream)
        self.keep.append(result)
        self.host[task_id] = (item.host_start_ns, done)
