"""Discrete-event simulation of plans on a topology: the same Plans in, the same Timeline out.

Every rank runs its plan the way the real executor does (:mod:`mc2sim.schedule.executor`):
one issuer walks the tasks in plan order, waits for a task's dependencies, runs a compute
task to its end before moving on, and hands a comm task to the rank's communication queue
without waiting. The queue runs its collectives one at a time, in order; collective k starts
when every rank has queued its k-th collective and is free, and all ranks take part until
the collective's time on the topology has passed (:mod:`mc2sim.model.cost`). Compute that
starts while the rank communicates (and communication that starts while it computes) is
slowed by the topology's fitted contention factors.

Events are ordered in exactly one place: one heap keyed by (time, sequence number). Handlers
only schedule events at or after the current time, so time never goes backwards.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mc2sim.errors import ParamInvalidError
from mc2sim.model.cost import (
    allgather_time,
    allreduce_time,
    alltoallv_time,
    compute_time,
    reduce_scatter_time,
)
from mc2sim.schedule.plan import Plan, Resource, SparseSplits, Task, TaskKind
from mc2sim.timeline import Source, Stream, TaskRecord, Timeline
from mc2sim.topology import Topology

__all__ = ["simulate"]


@dataclass
class _Rank:
    """One rank's progress through its plan."""

    plan: Plan
    pointer: int = 0  # next task the issuer looks at
    issuer_busy: bool = False  # a compute task (or a wait) holds the issuer
    done: set[int] = field(default_factory=set)
    compute_busy_until: float = 0.0
    comm_busy_until: float = 0.0
    comm_queue: list[Task] = field(default_factory=list)  # queued, not yet started
    comm_started: int = 0  # collectives started on this rank


def _splits_arrays(task: Task, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A rank's AlltoAllv traffic: peers and bytes sent and received, itself left out."""
    if isinstance(task.send_splits, SparseSplits) and isinstance(task.recv_splits, SparseSplits):
        out = []
        for splits in (task.send_splits, task.recv_splits):
            keep = splits.peers != rank
            out += [splits.peers[keep], splits.counts[keep] * task.row_bytes]
        return out[0], out[1], out[2], out[3]
    send = np.array(task.send_splits, dtype=np.int64)
    recv = np.array(task.recv_splits, dtype=np.int64)
    send[rank] = 0
    recv[rank] = 0
    sp = np.flatnonzero(send)
    rp = np.flatnonzero(recv)
    return sp, send[sp] * task.row_bytes, rp, recv[rp] * task.row_bytes


def _collective_time(tasks: list[Task], topology: Topology) -> float:
    """Seconds of collective k, from every rank's k-th comm task."""
    kind = tasks[0].kind
    for rank, task in enumerate(tasks):
        if task.kind is not kind:
            raise ParamInvalidError(
                f"plans[{rank}]",
                task.name,
                f"collective mismatch: rank 0 runs {tasks[0].name} ({kind}) at the same position",
            )
    if kind is TaskKind.ALLREDUCE:
        return allreduce_time(topology, max(t.bytes for t in tasks))
    if kind is TaskKind.ALLGATHER:
        return allgather_time(topology, sum(t.bytes for t in tasks))
    if kind is TaskKind.REDUCE_SCATTER:
        return reduce_scatter_time(topology, max(t.bytes for t in tasks))
    return alltoallv_time(topology, [_splits_arrays(t, r) for r, t in enumerate(tasks)])


class _Engine:
    def __init__(self, plans: Mapping[int, Plan], topology: Topology) -> None:
        self.topology = topology
        self.world = len(plans)
        self.ranks = [_Rank(plans[r]) for r in range(self.world)]
        self.heap: list[tuple[float, int, int, int]] = []  # (time, seq, rank, task id)
        self.seq = itertools.count()
        self.now = 0.0
        self.records: list[TaskRecord] = []
        self.starts: dict[tuple[int, int], float] = {}
        self.waiting: dict[int, list[Task | None]] = {}  # collective k -> tasks by rank
        self.waiting_count: dict[int, int] = {}
        self.compute_slow = topology.contention.compute_slowdown
        self.comm_slow = topology.contention.comm_slowdown
        self.run = {r: f"{plans[r].op}/{plans[r].tiling}#sim" for r in range(self.world)}

    def schedule(self, at: float, rank: int, task_id: int) -> None:
        if at < self.now:  # the one rule of the engine
            raise RuntimeError(f"event at {at} before now {self.now}")
        heapq.heappush(self.heap, (at, next(self.seq), rank, task_id))

    def advance(self, rank: int) -> None:
        """Let rank's issuer go as far as it can now."""
        state = self.ranks[rank]
        tasks = state.plan.tasks
        while not state.issuer_busy and state.pointer < len(tasks):
            task = tasks[state.pointer]
            if any(d not in state.done for d in task.deps):
                return  # waiting on a dependency (a comm chunk still in flight)
            state.pointer += 1
            if task.resource is Resource.COMPUTE:
                start = max(self.now, state.compute_busy_until)
                duration = compute_time(task, self.topology, state.plan.dtype)
                if state.comm_busy_until > start:
                    duration *= self.compute_slow
                state.issuer_busy = True
                state.compute_busy_until = start + duration
                self.starts[(rank, task.id)] = start
                self.schedule(start + duration, rank, task.id)
                return
            state.comm_queue.append(task)
            self.try_collective(rank)

    def try_collective(self, rank: int) -> None:
        """Queue rank's next collective; start collective k once every rank has queued it."""
        state = self.ranks[rank]
        if not state.comm_queue or state.comm_busy_until > self.now:
            return
        k = state.comm_started
        if self.waiting.get(k) is None:
            self.waiting[k] = [None] * self.world
            self.waiting_count[k] = 0
        if self.waiting[k][rank] is not None:
            return
        self.waiting[k][rank] = state.comm_queue[0]
        self.waiting_count[k] += 1
        if self.waiting_count[k] < self.world:
            return
        tasks = [t for t in self.waiting.pop(k) if t is not None]
        del self.waiting_count[k]
        duration = _collective_time(tasks, self.topology)
        if any(r.compute_busy_until > self.now for r in self.ranks):
            duration *= self.comm_slow
        end = self.now + duration
        for r, task in enumerate(tasks):
            peer = self.ranks[r]
            peer.comm_queue.pop(0)
            peer.comm_started += 1
            peer.comm_busy_until = end
            self.starts[(r, task.id)] = self.now
            self.schedule(end, r, task.id)

    def finish(self, rank: int, task_id: int) -> None:
        state = self.ranks[rank]
        task = state.plan.tasks[task_id]
        state.done.add(task_id)
        self.records.append(
            TaskRecord(
                rank=rank,
                run=self.run[rank],
                task=task_id,
                name=task.name,
                stream=Stream.COMM if task.resource is Resource.COMM else Stream.COMPUTE,
                kind=str(task.kind),
                start_s=self.starts.pop((rank, task_id)),
                end_s=self.now,
                flops=task.flops,
                bytes=task.bytes,
            )
        )
        if task.resource is Resource.COMPUTE:
            state.issuer_busy = False
        else:
            self.try_collective(rank)
        self.advance(rank)

    def run_all(self) -> None:
        for rank in range(self.world):
            self.advance(rank)
        while self.heap:
            self.now, _, rank, task_id = heapq.heappop(self.heap)
            self.finish(rank, task_id)
        stuck = [
            r for r, s in enumerate(self.ranks) if s.pointer < len(s.plan.tasks) or s.comm_queue
        ]
        if stuck:
            raise ParamInvalidError(
                "plans",
                stuck[:8],
                "these ranks never finished: their collectives do not match the other ranks'",
            )


def simulate(plans: Mapping[int, Plan], topology: Topology) -> Timeline:
    """Run every rank's plan on ``topology`` and return the simulated timeline.

    Args:
        plans: rank -> that rank's plan, for ranks 0..n-1 (MoE plans differ per rank).
        topology: the machine; if its world size differs from ``len(plans)``, its outermost
            dimension is resized to fit (``Topology.with_world``).

    Returns:
        A Timeline (source ``simulated``) with every task of every rank.

    Raises:
        ParamInvalidError: ranks missing from ``plans``, or plans whose collectives do not
            match across ranks.
    """
    world = len(plans)
    if sorted(plans) != list(range(world)) or world == 0:
        raise ParamInvalidError("plans", sorted(plans)[:8], "must map ranks 0..n-1 to plans")
    if topology.world_size != world:
        topology = topology.with_world(world)
    engine = _Engine(plans, topology)
    engine.run_all()
    first = plans[0]
    meta = {
        "op": first.op,
        "tiling": first.tiling,
        "world_size": world,
        "topology": topology.name,
    }
    return Timeline(records=tuple(engine.records), source=Source.SIMULATED, meta=meta)
