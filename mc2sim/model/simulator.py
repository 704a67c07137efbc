"""Discrete-event simulation of plans on a topology: the same Plans in, the same Timeline out.

Every rank runs its plan the way the real executor does (:mod:`mc2sim.schedule.executor`):
one issuer walks the tasks in plan order, waits for a task's dependencies, runs a compute
task to its end before moving on, and hands a comm task to the rank's communication queue
without waiting. Collective k starts when every rank has queued its k-th collective, and all
ranks take part until the collective's time on the topology has passed
(:mod:`mc2sim.model.cost`). On a communication stream (HCCL, NCCL) collectives run one at a
time in order: k also waits for k - 1 to end. Where the device's ``concurrent_collectives``
is set (MPI's nonblocking collectives, advanced together by one progress engine), k starts
as soon as every rank has queued it: its latency part (its time on links of unbounded
bandwidth: the alpha terms) overlaps the collectives before it, and its transfer part (the
rest) follows once the latency is over and collective k - 1 has ended, as the links carry
one transfer at a time; a collective of a kind in ``Device.one_at_a_time`` still starts only
once every collective before it has ended. A latency part is waiting: it takes its time
whatever else runs. While a rank computes during a transfer, both progress slower by the
topology's fitted contention factors (processor sharing; a factor of 1 is full overlap, a
large one means communication barely advances while the rank computes, as with MPI progress
polled between tiles). Only the ranks' own work of a transfer is slowed: one that a capped
wire holds back (``NetworkDim.link_gbps``) to ``h`` times its uncapped time advances at
``min(1, h / comm_slowdown)`` while a rank computes, as the wire keeps its pace. Where
progress is polled (``Contention.polled``: a CPU MPI advances a nonblocking collective only
inside MPI calls, which the executor makes between tasks), the ranks' own part of a
reduction's transfer stops while a rank computes or posts a collective (a post's copy is CPU
work on the rank's core, as a task is) and only a capped wire's part goes on
(``1 - 1 / h``); an AlltoAllv's or AllGather's advances at the share of ranks not computing (a
rank waiting inside MPI copies what its peers posted), if that is more. There, where
collectives in flight progress together, the AllReduces, ReduceScatters and AllGathers of
one kind in flight at once move as one collective of their combined bytes would: each one's
transfer pays the device profile's measured over modelled ratio at the largest total of its
kind it has been in flight with (:data:`_GROUPED_KINDS`), its fixed costs shared, its cache
misses those of the combined footprint.

Where a node's ranks share fewer cores, every collective also waits ``Device.slice_us * (1 -
core_share)`` for peers off their cores, as latency (:func:`mc2sim.model.cost.schedule_wait`),
counted from when its last rank queued it: collectives queued together wait at once (a peer
back on its core progresses every collective it has posted), also on a communication stream,
where a collective that starts late has only what is left of its wait to go. A capped wire
keeps its pace while a peer is off its core, so there the wait shows only past the wire's
slack: latency + max(capped transfer, the ranks' own transfer + wait).
That is processor sharing (``CoreSharing.PROCESSOR``). Where instead the ranks take turns
on the cores (``CoreSharing.TURNS``), each node's cores go to its ranks in order: a rank
takes a free core when its issuer has CPU work (a compute task, a post) and holds it until
its issuer waits (for a collective, or at the end of its plan) or it has held it
``Device.slice_us`` while another rank of the node waits for one (a post or a task ending
then finishes first); a rank without a core waits in its node's queue and does nothing,
and its compute task in progress stops. On its core a rank runs its work at a whole core's
speed (:func:`mc2sim.model.cost.core_time`), and a collective waits for its peers' turns in
the simulation itself, not as latency.
Posting a collective holds the rank's issuer for the device's issue overhead (LogP's ``o``,
``Device.issue_us``, and a reduction's float32 copy at ``Device.issue_gbps``:
:func:`mc2sim.model.cost.issue_time`) before the collective is queued; compute, the overhead and the
reductions run at the rank's share of a core where a node's ranks share fewer cores
(``Topology.core_share``; :mod:`mc2sim.model.cost`).

Every comm task's record splits the bytes its rank sends into those within its node and
those across nodes (``Topology.node_of``; :mod:`mc2sim.schedule.traffic`).

Stragglers (:mod:`mc2sim.model.heterogeneity`) make a rank's compute slower, its links
narrower or its start later; the engine also notes when each rank queued each collective,
from which :func:`~mc2sim.model.heterogeneity.rank_waits` tells who waited for whom.

Events are ordered in exactly one place: one heap keyed by (time, sequence number). Handlers
only schedule events at or after the current time, so time never goes backwards.

Where no rate can ever change (contention factors 1, no polled progress, no wait for peers
off their cores: :func:`lockstep_applies`) and every rank's plan has the same tasks, the event
loop reduces to a max-plus recursion over the tasks, and :func:`simulate_run` advances all
ranks at once, a task at a time, in numpy (``_lockstep``): the same times, from the same
collective parts (``_Machine``), as :class:`~mc2sim.timeline.RunColumns`. Thousands of ranks'
plans may also come as one :class:`~mc2sim.schedule.plan.PlanArrays`, their AlltoAllvs as
per-rank loads (:func:`simulate_arrays`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mc2sim.errors import ParamInvalidError
from mc2sim.model.cost import (
    MEMORY_KINDS,
    allgather_time,
    allreduce_time,
    collective_ratio,
    compute_time,
    compute_times,
    core_time,
    issue_time,
    issue_times,
    loads_alltoallv_time,
    memory_rate,
    pairs_alltoallv_time,
    rank_alltoallv_time,
    reduce_scatter_time,
    schedule_wait,
    spread_factors,
)
from mc2sim.model.heterogeneity import Arrivals, Straggler
from mc2sim.schedule.plan import (
    AlltoAllvLoads,
    Plan,
    PlanArrays,
    Resource,
    SideLoads,
    Task,
    TaskKind,
)
from mc2sim.schedule.traffic import (
    AlltoAllvPairs,
    Placement,
    alltoallv_pairs,
    level_bytes,
    sent_by_level,
)
from mc2sim.timeline import RunColumns, RunKey, Source, Stream, TaskRecord, Timeline
from mc2sim.topology import CoreSharing, Topology

__all__ = [
    "lockstep_applies",
    "run_topology",
    "simulate",
    "simulate_arrays",
    "simulate_run",
    "simulate_waits",
]

_DONE_S = 1e-12
"""Work left (seconds) below which a compute task is ending now (a rounding's worth)."""

_UNBOUNDED_GBPS = 1e300
"""Link bandwidth at which a collective's time is its latency alone (finite, as topologies
require; bytes over it are below any latency)."""


@dataclass
class _Rank:
    """One rank's progress through its plan."""

    plan: Plan
    pointer: int = 0  # next task the issuer looks at
    issuer_busy: bool = False  # a compute task holds the issuer
    done: set[int] = field(default_factory=set)
    comm_queue: list[Task] = field(default_factory=list)  # queued, not yet started
    comm_started: int = 0  # collectives started on this rank
    comm_queued: int = 0  # collectives queued by this rank
    computing: _Active | None = None  # the compute task in progress
    issuing: Task | None = None  # a comm task being posted (the issue overhead o)
    issue_version: int = 0
    warm: bool = False  # it ran a compute task earlier in the call
    turn: int = 0  # where ranks take turns on cores: its turn's version while it holds one
    turn_over: bool = False  # its turn ended as it posted or finished a task: yield after


_GROUPED_KINDS = frozenset({TaskKind.ALLREDUCE, TaskKind.REDUCE_SCATTER, TaskKind.ALLGATHER})
"""Collectives that move together with the others of their kind in flight where progress is
polled: the progress engine advances every outstanding request at each call, so their
transfers pay the profile's ratio of their combined bytes (its fixed costs shared, its cache
misses those of the combined footprint). Measured: on 2 ranks here the two 64 KiB
AllReduces of a 2-tile 256 x 64 x 256 MatmulAllReduce, both in flight after its last tile,
ended 0.13 and 0.16 ms after it, where one 128 KiB AllReduce takes 0.16 to 0.17 ms and one of
64 KiB alone 0.125; the four 32 KiB of its 4-tile plan, 0.15 ms; on 8 ranks of a 16-core host,
the four 2 MiB AllReduces of a 4-tile 2048 x 64 x 2048 MatmulAllReduce ended within 4 ms of
each other, 28 to 34 ms after the last post, near one 8 MiB AllReduce (the profile's 32 ms)
and not four 2 MiB ones (26 ms). An AlltoAllv's cost depends on its pairs, not its bytes
alone: not grouped."""

_PULLED_KINDS = frozenset({TaskKind.ALLTOALLV, TaskKind.ALLGATHER})
"""Collectives that move data alone: where progress is polled, a rank inside an MPI call
advances them by itself, copying what its peers posted (a single-copy transport), while a
reduction needs every rank's own additions. Measured on 4 ranks of a 16-core host: the four
2 MiB AllReduces of a MatmulAllReduce tiled in 4 all completed after the last tile, 14.6 ms
after it, one after another; the AlltoAllv chunks of a GroupedMatMulAlltoAllv per expert
completed while a skewed rank still multiplied its experts, the other ranks waiting."""


@dataclass
class _Active:
    """A task in progress: work left (seconds at full speed) and its current rate."""

    tasks: list[tuple[int, Task]]  # (rank, task): one for compute, every rank for a collective
    work: float
    rate: float
    since: float
    version: int = 0
    transfer: float = 0.0  # a collective's transfer part, to come after its latency part
    transferring: bool = False  # a collective in its transfer part
    headroom: float = 1.0  # a transfer's time over its time without the wires' caps (>= 1)
    levels: tuple[np.ndarray, np.ndarray] | None = None  # an AlltoAllv's (intra, inter) by rank

    def left_at(self, now: float) -> float:
        return self.work - (now - self.since) * self.rate


def _narrowed(topology: Topology, factor: float) -> Topology:
    """``topology`` with every link at ``factor`` of its bandwidth (latencies unchanged)."""
    return dataclasses.replace(
        topology,
        network=tuple(
            dataclasses.replace(
                d, bandwidth_gbps=d.bandwidth_gbps * factor, link_gbps=d.link_gbps * factor
            )
            for d in topology.network
        ),
    )


def _straggling_times(
    tasks: list[Task],
    links: Mapping[int, float],
    pairs: tuple[AlltoAllvPairs, AlltoAllvPairs] | None,
    *topologies: Topology,
) -> list[float]:
    """:func:`_collective_times` with some ranks' links at a fraction of their bandwidth.

    An AlltoAllv takes its slowest rank's time, each degraded rank's own traffic costed on
    its narrowed links; any other collective runs at the narrowest rank's bandwidth.
    """
    times = _collective_times(tasks, pairs, *topologies)
    if not links:
        return times
    if tasks[0].kind is not TaskKind.ALLTOALLV:
        narrowest = min(links.values())
        return _collective_times(tasks, pairs, *(_narrowed(t, narrowest) for t in topologies))
    for rank, factor in links.items():
        task = tasks[rank]  # its own traffic, itself left out (alltoallv_pairs)
        send, recv = (alltoallv_pairs([task], [rank], side) for side in _SIDES)
        row = [task.row_bytes]
        parts = (send.peers, send.bytes(row), recv.peers, recv.bytes(row))
        times = [
            max(time, rank_alltoallv_time(_narrowed(topology, factor), rank, *parts))
            for time, topology in zip(times, topologies, strict=True)
        ]
    return times


def _check_same_kind(tasks: list[Task]) -> None:
    """Every rank's k-th comm task is the same collective."""
    kind = tasks[0].kind
    for rank, task in enumerate(tasks):
        if task.kind is not kind:
            raise ParamInvalidError(
                f"plans[{rank}]",
                task.name,
                f"collective mismatch: rank 0 runs {tasks[0].name} ({kind}) at the same position",
            )


_SIDES = ("send_splits", "recv_splits")
"""An AlltoAllv task's two sides, as :func:`~mc2sim.schedule.traffic.alltoallv_pairs` names them."""


def _gathered(tasks: list[Task]) -> tuple[AlltoAllvPairs, AlltoAllvPairs]:
    """An AlltoAllv's send and receive pairs, every rank's at once (index = rank)."""
    ranks = range(len(tasks))
    send, recv = (alltoallv_pairs(tasks, ranks, side) for side in _SIDES)
    return send, recv


def _collective_times(
    tasks: list[Task],
    pairs: tuple[AlltoAllvPairs, AlltoAllvPairs] | None,
    *topologies: Topology,
) -> list[float]:
    """Seconds of collective k on each of ``topologies``, from every rank's k-th comm task.

    The tasks are one collective (:func:`_check_same_kind`); the ranks' traffic is gathered
    once for all the topologies (``pairs``: an AlltoAllv's, from :func:`_gathered`).
    """
    kind = tasks[0].kind
    if kind is TaskKind.ALLREDUCE:
        nbytes = _sized(tasks)
        return [allreduce_time(topology, nbytes) for topology in topologies]
    if kind is TaskKind.ALLGATHER:
        nbytes = _sized(tasks)
        return [allgather_time(topology, nbytes) for topology in topologies]
    if kind is TaskKind.REDUCE_SCATTER:
        nbytes = _sized(tasks)
        return [reduce_scatter_time(topology, nbytes) for topology in topologies]
    if pairs is None:
        raise RuntimeError("an AlltoAllv's times need its pairs (_gathered)")
    send, recv = pairs
    rows = [t.row_bytes for t in tasks]
    sides = [(p.ranks, p.peers, p.bytes(rows)) for p in (send, recv)]
    return [pairs_alltoallv_time(topology, sides[0], sides[1]) for topology in topologies]


def _sized(tasks: list[Task]) -> float:
    """A phased collective's bytes as its time takes them.

    An AllGather's result (every rank's part), the others' largest buffer.
    """
    if tasks[0].kind is TaskKind.ALLGATHER:
        return float(sum(t.bytes for t in tasks))
    return float(max(t.bytes for t in tasks))


class _Parts(NamedTuple):
    """A collective's time, as both engines run it."""

    latency: float
    """Its latency part (0 on a communication stream: the whole time is its transfer)."""
    work: float
    """Its whole time, latency part included."""
    headroom: float
    """Its transfer's time over the transfer's time without the wires' caps (>= 1)."""
    pairs: tuple[AlltoAllvPairs, AlltoAllvPairs] | None
    """An AlltoAllv's send and receive pairs (:func:`_gathered`); None for the others."""


class _Machine:
    """The topology as the collectives see it: its variants for a collective's parts.

    A collective has two parts: its latency part (the alpha terms: its time on links of
    unbounded bandwidth) and its transfer part (the rest); see :class:`_Engine`.
    """

    def __init__(self, topology: Topology, links: Mapping[int, float]) -> None:
        self.topology = topology
        self.links = links
        self.concurrent = topology.device.concurrent_collectives
        self.one_at_a_time = frozenset(topology.device.one_at_a_time)
        # the same links at unbounded bandwidth, the reductions free: a collective's latency
        self.latency_only = (
            dataclasses.replace(
                topology,
                network=tuple(
                    dataclasses.replace(d, bandwidth_gbps=_UNBOUNDED_GBPS, link_gbps=0.0)
                    for d in topology.network
                ),
                # the profile's ratios are of whole collectives, not of their latency
                device=dataclasses.replace(topology.device, reduce_gbps=0.0, profile=()),
            )
            if self.concurrent
            else None
        )
        # the same links without the wires' caps: the part of a transfer the ranks' own work
        # limits, which overlapped compute slows (a capped wire keeps its pace)
        self.uncapped = (
            dataclasses.replace(
                topology,
                network=tuple(dataclasses.replace(d, link_gbps=0.0) for d in topology.network),
            )
            if any(d.link_gbps > 0 for d in topology.network)
            else None
        )
        # the same machine without its profile: a profiled collective's latency part is the
        # model's latency times the profile's ratio (its fixed costs overlap as latency does)
        self.bare = (
            dataclasses.replace(topology, device=dataclasses.replace(topology.device, profile=()))
            if self.latency_only is not None and topology.device.profile
            else None
        )
        self.wait = schedule_wait(topology)

    def overlaps(self, kind: TaskKind) -> bool:
        """Whether a collective of ``kind`` may start while others are in flight."""
        return self.concurrent and str(kind) not in self.one_at_a_time

    def parts(self, tasks: list[Task], last_queued: float, now: float) -> _Parts:
        """The parts of the collective of every rank's ``tasks``, starting at ``now``.

        ``last_queued``: when its last rank queued it (a wait for peers off their cores
        counts from then).
        """
        _check_same_kind(tasks)
        pairs = _gathered(tasks) if tasks[0].kind is TaskKind.ALLTOALLV else None
        latency, work, headroom = self.split(
            lambda *tops: _straggling_times(tasks, self.links, pairs, *tops), last_queued, now
        )
        return _Parts(latency, work, headroom, pairs)

    def split(
        self, times_on: Callable[..., list[float]], last_queued: float, now: float
    ) -> tuple[float, float, float]:
        """A collective's (latency part, whole time, headroom).

        ``times_on(*topologies)`` gives its seconds on each of the topology's variants.
        """
        latency = 0.0  # on a stream the whole time is the transfer part
        others = [t for t in (self.latency_only, self.uncapped, self.bare) if t is not None]
        work, *times = times_on(self.topology, *others)
        ratio = 1.0
        if self.bare is not None:  # the profile's ratio of this collective
            bare = times.pop()
            ratio = work / bare if bare > 0 else 1.0
        # waiting for peers off their cores, from when the last rank queued it: latency, and
        # what a collective queued with others waits overlaps theirs (a peer back on its core
        # progresses every collective it has posted)
        wait = 0.0
        if self.wait > 0.0:
            wait = max(0.0, last_queued + self.wait - now)
        alpha = min(work, times.pop(0) * ratio) if self.latency_only is not None else 0.0
        uncapped = times.pop(0) if self.uncapped is not None else 0.0
        if self.uncapped is not None:
            # a capped wire keeps its pace while a peer is off its core (what the ranks
            # handed it goes on): the wait shows only where it outlasts the wire's slack,
            # the capped time beyond the ranks' own, so the collective takes
            # alpha + max(capped transfer, own transfer + wait)
            wait = max(0.0, wait - max(0.0, work - uncapped))
        if self.latency_only is not None:
            latency = alpha + wait
        work += wait
        headroom = 1.0
        if self.uncapped is not None:
            # the transfer's own work without the wires' caps, the wait for peers included
            # (the ranks' time, not the wire's) where the transfer part holds it
            own = uncapped + wait - latency
            headroom = (work - latency) / own if own > 0 else 1.0
        return latency, work, max(headroom, 1.0)


@dataclass
class _Turns:
    """Each node's free cores and its ranks queued for one, in order.

    Only where ranks take turns on their node's cores (``CoreSharing.TURNS``).
    """

    per_node: int
    slice_s: float
    free: list[int]
    queue: list[deque[int]]

    @staticmethod
    def apply(topology: Topology) -> bool:
        """Whether ranks take turns on ``topology``: its sharing says so and they share cores."""
        return topology.device.core_sharing is CoreSharing.TURNS and topology.core_share < 1.0

    @classmethod
    def of(cls, topology: Topology, world: int) -> _Turns | None:
        """The turns of ``world`` ranks on ``topology``; None where ranks do not take turns.

        A node runs ``cores_per_node`` ranks at once, rounded (at least one).
        """
        device = topology.device
        if not cls.apply(topology):
            return None
        per_node = topology.ranks_per_node
        nodes = -(-world // per_node)
        cores = max(1, round(device.cores_per_node))
        return cls(
            per_node, device.slice_us * 1e-6, [cores] * nodes, [deque() for _ in range(nodes)]
        )


class _Engine:
    """The event loop. Events are (time, sequence, kind, rank, version) in one heap.

    A collective has two parts: its latency part (the alpha terms: its time on links of
    unbounded bandwidth) and its transfer part (the rest). Transfer parts hold the links, so
    they run one at a time in issue order: collective k transfers once its latency part is
    over and collective k - 1 has ended. On a communication stream the latency part is empty
    and k starts only once k - 1 has ended; with ``concurrent_collectives`` it starts as soon
    as every rank has queued it, so its latency overlaps the collectives before it (unless its
    kind is one of ``Device.one_at_a_time``). A latency part is waiting: it takes a fixed time
    and slows nothing.

    Contention is processor sharing: while a rank computes and a transfer is in progress, the
    rank's compute advances at ``1 / compute_slowdown`` of its speed and the transfer (held
    back by its slowest member) at ``1 / comm_slowdown``; rates change only when a task starts
    or ends, and the affected end events are moved (stale ones are skipped by version). Where
    progress is polled, a reduction's transfer stops while ranks compute, so it slows no
    compute where each rank has a core of its own (:meth:`contending`).
    """

    def __init__(
        self,
        plans: Mapping[int, Plan],
        topology: Topology,
        stragglers: Mapping[int, Straggler] | None = None,
    ) -> None:
        self.topology = topology
        stragglers = stragglers or {}
        self.slow = {r: s.compute for r, s in stragglers.items() if s.compute != 1.0}
        self.links = _links(stragglers)
        self.late = {r: s.late_us * 1e-6 for r, s in stragglers.items() if s.late_us > 0}
        self.queued: list[np.ndarray] = []  # collective k -> when each rank queued it
        self.started: list[float] = []  # collective k -> when it started
        self.machine = _Machine(topology, self.links)
        self.world = len(plans)
        self.placement = Placement.of(np.arange(self.world) // topology.ranks_per_node)
        self.ranks = [_Rank(plans[r]) for r in range(self.world)]
        # each rank's compute task at its place among the ranks' loads (Device.rank_spread)
        self.spread = _spread_of([r.plan for r in self.ranks], topology.device.rank_spread)
        self.heap: list[tuple[float, int, str, int, int]] = []
        self.seq = itertools.count()
        self.versions = itertools.count(1)
        self.now = 0.0
        self.records: list[TaskRecord] = []
        self.starts: dict[tuple[int, int], float] = {}
        self.waiting: dict[int, list[Task | None]] = {}  # collective k -> tasks by rank
        self.waiting_count: dict[int, int] = {}
        self.collectives: dict[int, _Active] = {}  # collective k -> its progress, in flight
        self.ready: set[int] = set()  # latency part over, waiting for the links
        self.next_transfer = 0  # the collective whose transfer part is next
        self.transferring = False  # a transfer part holds the links
        self.computing = 0  # ranks with a compute task in progress
        self.posting = 0  # ranks posting a collective
        self.turns = _Turns.of(topology, self.world)
        # processor sharing where waiting ranks take less than a busy one's share: a node's
        # computing ranks run faster while its other ranks wait (Device.waiting_weight)
        self.weighted = _weighted(topology)
        # memory-bound tasks faster while fewer of their node's ranks compute
        self.memory = _memory_shared(topology)
        self.busy = [0] * -(-self.world // topology.ranks_per_node)  # computing, per node
        self.compute_slow = topology.contention.compute_slowdown
        self.comm_slow = topology.contention.comm_slowdown
        self.polled = topology.contention.polled
        self.run = {r: RunKey(op=plans[r].op, tiling=plans[r].tiling) for r in range(self.world)}
        # collectives of a kind in flight together pay the ratio of their combined bytes
        # (_GROUPED_KINDS): each one's bytes, and the largest total in flight with it so far
        self.grouped = self.polled and topology.device.concurrent_collectives
        self.in_flight: dict[TaskKind, float] = {}
        self.sizes: dict[int, float] = {}
        self.company: dict[int, float] = {}

    # -- the one ordering --------------------------------------------------------------------

    def schedule(self, active: _Active, kind: str, rank: int) -> None:
        """(Re)schedule ``active``'s end from its work left and rate; older events go stale.

        Versions come from one counter for the whole run, so a stale event of an earlier task
        can never match a later task's version.
        """
        active.version = next(self.versions)
        if active.rate <= 0.0:
            return  # stalled (a polled transfer while a rank computes): re-rated later
        at = self.now + active.work / active.rate
        if at < self.now:  # time never goes backwards
            raise RuntimeError(f"event at {at} before now {self.now}")
        heapq.heappush(self.heap, (at, next(self.seq), kind, rank, active.version))

    def rerate(self, active: _Active, rate: float, kind: str, rank: int) -> None:
        if rate == active.rate:
            return
        active.work = max(active.left_at(self.now), 0.0)  # never below 0 by a rounding
        active.since = self.now
        active.rate = rate
        self.schedule(active, kind, rank)

    def compute_rate(self, rank: int, task: Task) -> float:
        """The rate of compute task ``task`` on ``rank``: slowed while a transfer is in progress.

        Where ranks take turns on the cores, 0 while ``rank`` waits for one. A memory-bound
        task (:data:`~mc2sim.model.cost.MEMORY_KINDS`) runs faster while fewer of its node's
        ranks compute (``Device.lone_memory_speedup``: :func:`~mc2sim.model.cost.memory_rate`).
        """
        if self.turns is not None and not self.ranks[rank].turn:
            return 0.0
        rate = 1.0 / self.compute_slow if self.contending() else 1.0
        if self.weighted:
            rate *= self.busy_share(rank) / self.topology.core_share
        if self.memory and task.kind in MEMORY_KINDS:
            ranks, busy = self.node_load(rank)
            rate *= memory_rate(self.topology.device.lone_memory_speedup, ranks, busy)
        return rate

    def contending(self) -> bool:
        """Whether the transfer in progress slows the ranks' compute (``compute_slowdown``).

        Any transfer where progress runs on its own or where ranks share cores; where it is
        polled (``Contention.polled``) and each rank has a core, only an AlltoAllv's or
        AllGather's (:data:`_PULLED_KINDS`), which the waiting ranks move while others
        compute. A reduction's own part stops while any rank computes (:meth:`comm_rate`),
        so nothing of it competes with their work: on 8 ranks of the 16-core host, a W8A8
        MatmulAllReduce's tiles after the first took 0.88 to 1.04 of the first's time (median
        0.95) with the AllReduces before them in flight (``val_mm_w8a8 tiles=4``), where a
        fitted slowdown of 1.1 made them 1.05. Where ranks share cores the fitted factor
        stays on every transfer (it also stands for what the ranks off their cores cost
        there): replayed on six kept 4-rank runs here, exempting the reductions made two of
        them worse (4.40 to 4.93% and 18.8 to 21.0% held out) and none better.
        """
        if not self.transferring:
            return False
        if not self.polled or self.topology.core_share < 1.0:
            return True
        return self.collectives[self.next_transfer].tasks[0][1].kind in _PULLED_KINDS

    def node_load(self, rank: int) -> tuple[int, int]:
        """``rank``'s node: how many ranks it has (the last node may have fewer), how many busy."""
        per_node = self.topology.ranks_per_node
        node = rank // per_node
        return min(per_node, self.world - node * per_node), self.busy[node]

    def busy_share(self, rank: int) -> float:
        """The share of a core a computing rank gets (``Device.waiting_weight``).

        Its node's cores over its busy ranks and the others' ``waiting_weight`` of a share.
        """
        ranks, busy = self.node_load(rank)
        device = self.topology.device
        return min(1.0, device.cores_per_node / (busy + device.waiting_weight * (ranks - busy)))

    def _rerate_compute(self, rank: int) -> bool:
        """Re-rate ``rank``'s compute task in progress, if any; whether it had one."""
        active = self.ranks[rank].computing
        if active is None:
            return False
        self.rerate(active, self.compute_rate(rank, active.tasks[0][1]), "compute", rank)
        return True

    def _rerate_node(self, rank: int) -> None:
        """Re-rate the compute tasks of ``rank``'s node: how many of its ranks are busy changed."""
        per_node = self.topology.ranks_per_node
        first = (rank // per_node) * per_node
        for r in range(first, min(first + per_node, self.world)):
            self._rerate_compute(r)

    def comm_rate(self, active: _Active) -> float:
        """A transfer's rate: slowed while a rank computes, unless a capped wire holds it back.

        A transfer whose wire takes ``headroom`` times what the ranks' own work would
        (:attr:`_Active.headroom`) advances at ``min(1, headroom / comm_slowdown)``. Where
        progress is polled (``Contention.polled``), a reduction's own part stops while a rank
        computes or posts a collective and only the wire's goes on: ``1 - 1 / headroom`` (0
        on an uncapped wire); an AlltoAllv or AllGather (:data:`_PULLED_KINDS`) advances at
        the share of ranks neither computing nor posting, if that is more.
        """
        busy = self.computing + (self.posting if self.polled else 0)
        if busy == 0:
            return 1.0
        if self.polled:
            wire = 1.0 - 1.0 / active.headroom
            if active.tasks[0][1].kind in _PULLED_KINDS:
                return max(wire, 1.0 - busy / self.world)
            return wire
        return min(1.0, active.headroom / self.comm_slow)

    def _rerate_comms(self) -> None:
        """Re-rate the transfer in progress (a latency part waits: nothing slows it)."""
        if self.transferring:
            k = self.next_transfer
            active = self.collectives[k]
            self.rerate(active, self.comm_rate(active), "comm", k)

    # -- ranks -------------------------------------------------------------------------------

    def advance(self, rank: int) -> None:
        """Let rank's issuer go as far as it can now."""
        state = self.ranks[rank]
        tasks = state.plan.tasks
        while not state.issuer_busy and state.pointer < len(tasks):
            task = tasks[state.pointer]
            if any(d not in state.done for d in task.deps):
                self.yield_core(rank)
                return  # waiting on a dependency (a comm chunk still in flight)
            if not self.take_core(rank):
                return  # waiting for a core: it gets one when a rank of its node yields
            state.pointer += 1
            if task.resource is Resource.COMPUTE:
                work = compute_time(task, self.topology, state.plan.dtype, warm=state.warm)
                state.warm = True
                work = core_time(self.topology, work * self.slow.get(rank, 1.0))
                if self.spread:
                    work *= self.spread[rank].get(task.id, 1.0)
                self.busy[rank // self.topology.ranks_per_node] += 1
                rate = self.compute_rate(rank, task)
                state.computing = _Active([(rank, task)], work, rate, self.now)
                state.issuer_busy = True
                self.starts[(rank, task.id)] = self.now
                self.computing += 1
                self.schedule(state.computing, "compute", rank)
                if self.weighted or self.memory:
                    self._rerate_node(rank)
                if self.computing == 1 or self.polled:
                    self._rerate_comms()
                return
            issue = core_time(self.topology, issue_time(self.topology, task))
            if issue > 0.0:  # posting it holds the issuer (LogP's o)
                if self.polled:
                    self.posting += 1
                    self._rerate_comms()
                state.issuer_busy = True
                state.issuing = task
                state.issue_version = next(self.versions)
                at = self.now + issue
                heapq.heappush(self.heap, (at, next(self.seq), "issue", rank, state.issue_version))
                return
            self.queue_comm(rank, task)
        if not state.issuer_busy:
            self.yield_core(rank)  # its plan is done

    # -- turns on shared cores (CoreSharing.TURNS) -----------------------------------------------

    def take_core(self, rank: int) -> bool:
        """Whether ``rank`` holds a core for its next CPU work, taking a free one if any.

        Always where ranks do not take turns; otherwise a rank with no core and none free
        joins its node's queue and runs when a rank of its node yields (:meth:`yield_core`).
        """
        turns = self.turns
        state = self.ranks[rank]
        if turns is None or state.turn:
            return True
        node = rank // turns.per_node
        if turns.free[node] > 0:
            turns.free[node] -= 1
            self.start_turn(rank)
            return True
        if rank not in turns.queue[node]:
            turns.queue[node].append(rank)
        return False

    def _turns(self) -> _Turns:
        """The node's turns, where only a topology whose ranks take turns gets here."""
        if self.turns is None:
            raise RuntimeError("a turn on a core where ranks do not take turns")
        return self.turns

    def start_turn(self, rank: int) -> None:
        """``rank`` has a core: its turn runs until it yields or ``slice_us`` ends it."""
        turns = self._turns()
        state = self.ranks[rank]
        state.turn = next(self.versions)
        heapq.heappush(
            self.heap, (self.now + turns.slice_s, next(self.seq), "turn", rank, state.turn)
        )

    def yield_core(self, rank: int) -> None:
        """``rank``'s issuer waits (or is done): its core goes to the next rank queued."""
        turns = self.turns
        state = self.ranks[rank]
        if turns is None or not state.turn:
            return
        state.turn = 0
        state.turn_over = False
        self.hand_over(rank // turns.per_node)

    def hand_over(self, node: int) -> None:
        """A core of ``node`` is free: the first rank queued for one takes it and goes on."""
        turns = self._turns()
        if not turns.queue[node]:
            turns.free[node] += 1
            return
        rank = turns.queue[node].popleft()
        self.start_turn(rank)
        # a compute task its turn's end stopped goes on; without one, its issuer goes on
        if not self._rerate_compute(rank):
            self.advance(rank)

    def requeue(self, rank: int) -> None:
        """``rank``'s turn is over: it queues behind its node's others; one of them runs."""
        turns = self._turns()
        state = self.ranks[rank]
        state.turn = 0
        if state.computing is not None:
            self.rerate(state.computing, 0.0, "compute", rank)
        node = rank // turns.per_node
        turns.queue[node].append(rank)
        self.hand_over(node)

    def go_on(self, rank: int) -> None:
        """``rank``'s issuer has finished a post or a task: on, unless its turn ended then."""
        state = self.ranks[rank]
        if state.turn_over:  # the next rank's now
            state.turn_over = False
            self.requeue(rank)
            return
        self.advance(rank)

    def turn_ends(self, rank: int) -> None:
        """``rank`` has held its core ``slice_us``: it yields it if a rank of its node waits."""
        turns = self._turns()
        state = self.ranks[rank]
        if not turns.queue[rank // turns.per_node]:
            self.start_turn(rank)  # nobody waits: a new turn
        elif state.issuing is not None or (
            state.computing is not None and state.computing.left_at(self.now) <= _DONE_S
        ):
            state.turn_over = True  # a post, or a task ending now: it yields after it
        else:
            self.requeue(rank)

    def queue_comm(self, rank: int, task: Task) -> None:
        """Queue rank's posted comm task (noting when, for who-waited-for-whom) and try it."""
        state = self.ranks[rank]
        state.comm_queue.append(task)
        if state.comm_queued == len(self.queued):
            self.queued.append(np.full(self.world, np.nan))
        self.queued[state.comm_queued][rank] = self.now
        state.comm_queued += 1
        self.try_collective(rank)

    def issued(self, rank: int) -> None:
        """Rank's issuer has posted its comm task: queue it and go on."""
        state = self.ranks[rank]
        task = state.issuing
        if task is None:
            raise RuntimeError(f"rank {rank} finished posting a collective it did not post")
        state.issuing = None
        state.issuer_busy = False
        if self.polled:
            self.posting -= 1
            self._rerate_comms()
        self.queue_comm(rank, task)
        self.go_on(rank)

    def try_collective(self, rank: int) -> None:
        """Queue rank's next collective; start collective k once every rank has queued it.

        On a communication stream, or for a kind of ``Device.one_at_a_time``, also only once
        no other collective is in flight.
        """
        state = self.ranks[rank]
        if not state.comm_queue or (
            self.collectives and not self.machine.overlaps(state.comm_queue[0].kind)
        ):
            return
        k = state.comm_started
        if k not in self.waiting:
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
        self.started.append(self.now)
        latency, work, headroom, pairs = self.machine.parts(
            tasks, float(np.max(self.queued[k])), self.now
        )
        for r, task in enumerate(tasks):
            peer = self.ranks[r]
            peer.comm_queue.pop(0)
            peer.comm_started += 1
            self.starts[(r, task.id)] = self.now
        active = _Active(
            list(enumerate(tasks)),
            latency,
            1.0,
            self.now,
            transfer=work - latency,
            headroom=headroom,
            levels=(
                sent_by_level(pairs[0], self.placement.nodes, [t.row_bytes for t in tasks])
                if pairs is not None
                else None
            ),
        )
        self.collectives[k] = active
        if self.grouped and tasks[0].kind in _GROUPED_KINDS:
            self._join(k, _sized(tasks))
        if latency > 0.0:
            self.schedule(active, "comm", k)
        else:
            self.latency_over(k)
        if self.machine.concurrent:  # every rank's next queued collective may start too
            for r in range(self.world):
                self.try_collective(r)

    def _join(self, k: int, nbytes: float) -> None:
        """Collective k joins those of its kind in flight: each pays the combined ratio.

        Its transfer, and that of every other of the kind whose largest company so far was
        smaller, is scaled by the profile's ratio at the new total over that at the old
        (:func:`~mc2sim.model.cost.collective_ratio`); a transfer in progress keeps what it
        has done and scales what is left.
        """
        if nbytes <= 0.0:
            return
        kind = self.collectives[k].tasks[0][1].kind
        total = self.in_flight[kind] = self.in_flight.get(kind, 0.0) + nbytes
        self.sizes[k] = self.company[k] = nbytes
        ratio = collective_ratio(self.topology, str(kind), total)
        for j, company in list(self.company.items()):
            other = self.collectives[j]
            if company >= total or other.tasks[0][1].kind is not kind:
                continue
            scale = ratio / collective_ratio(self.topology, str(kind), company)
            self.company[j] = total
            if scale == 1.0:  # no profile, or the same ratio: nothing to rescale
                continue
            if other.transferring:
                other.work = max(other.left_at(self.now), 0.0) * scale
                other.since = self.now
                self.schedule(other, "comm", j)
            else:
                other.transfer *= scale

    def latency_over(self, k: int) -> None:
        """Collective k's latency part has ended: it waits for the links."""
        self.ready.add(k)
        if self.try_transfer():
            self._rerate_computes()

    def try_transfer(self) -> bool:
        """Start the next collective's transfer part if the links are free and it is ready."""
        k = self.next_transfer
        if self.transferring or k not in self.ready:
            return False
        self.ready.remove(k)
        self.transferring = True
        active = self.collectives[k]
        active.work, active.transfer = active.transfer, 0.0
        active.transferring = True
        active.since = self.now
        active.rate = self.comm_rate(active)
        self.schedule(active, "comm", k)
        return True

    def _rerate_computes(self) -> None:
        if self.compute_slow == 1.0:
            return  # no contention: rates never change
        for r in range(self.world):
            self._rerate_compute(r)

    def record(self, rank: int, task: Task, levels: tuple[int, int] | None = None) -> None:
        """Note ``task`` done on ``rank``; ``levels``: its (intra, inter) bytes if known."""
        self.ranks[rank].done.add(task.id)
        intra, inter = levels if levels is not None else level_bytes(task, rank, self.placement)
        self.records.append(
            TaskRecord(
                rank=rank,
                run=self.run[rank],
                task=task.id,
                name=task.name,
                stream=Stream.COMM if task.resource is Resource.COMM else Stream.COMPUTE,
                kind=str(task.kind),
                start_s=self.starts.pop((rank, task.id)),
                end_s=self.now,
                flops=task.flops,
                bytes=task.bytes,
                intra_bytes=intra,
                inter_bytes=inter,
            )
        )

    def finish_compute(self, rank: int) -> None:
        state = self.ranks[rank]
        active = state.computing
        if active is None:
            raise RuntimeError(f"rank {rank} finished a compute task it did not run")
        state.computing = None
        state.issuer_busy = False
        self.computing -= 1
        self.busy[rank // self.topology.ranks_per_node] -= 1
        if self.weighted or self.memory:
            self._rerate_node(rank)
        self.record(rank, active.tasks[0][1])
        if self.computing == 0 or self.polled:
            self._rerate_comms()
        self.go_on(rank)

    def end_part(self, k: int) -> None:
        """Collective k's latency part, or the whole collective, has ended."""
        active = self.collectives[k]
        if not active.transferring:
            self.latency_over(k)
            return
        del self.collectives[k]
        if k in self.sizes:  # it leaves its kind's company
            self.in_flight[active.tasks[0][1].kind] -= self.sizes.pop(k)
            del self.company[k]
        self.transferring = False
        self.next_transfer += 1
        if active.levels is not None:  # an AlltoAllv's: found for every rank at once
            intra, inter = (level.tolist() for level in active.levels)
            for rank, task in active.tasks:
                self.record(rank, task, (intra[rank], inter[rank]))
        else:
            for rank, task in active.tasks:
                self.record(rank, task)
        self.try_transfer()
        self._rerate_computes()
        for rank, _ in active.tasks:
            self.try_collective(rank)
            self.advance(rank)

    def run_all(self) -> None:
        for rank in range(self.world):
            if rank in self.late:  # a late rank's issuer starts at its offset
                heapq.heappush(self.heap, (self.late[rank], next(self.seq), "start", rank, 0))
            else:
                self.advance(rank)
        while self.heap:
            at, _, kind, rank, version = heapq.heappop(self.heap)
            if kind == "start":
                self.now = at
                self.advance(rank)
                continue
            if kind == "turn":
                if self.ranks[rank].turn == version:
                    self.now = at
                    self.turn_ends(rank)
                continue
            if kind == "issue":
                if self.ranks[rank].issue_version == version:
                    self.now = at
                    self.issued(rank)
                continue
            # a comm event carries its collective's index where a compute event has its rank
            active = self.collectives.get(rank) if kind == "comm" else self.ranks[rank].computing
            if active is None or active.version != version:
                continue  # a stale end: the task's rate changed since
            self.now = at
            if kind == "comm":
                self.end_part(rank)
            else:
                self.finish_compute(rank)
        stuck = [
            r
            for r, s in enumerate(self.ranks)
            if s.pointer < len(s.plan.tasks) or s.comm_queue or s.issuing is not None
        ]
        if stuck:
            raise ParamInvalidError(
                "plans",
                stuck[:8],
                "these ranks never finished: their collectives do not match the other ranks'",
            )


def _task_loads(flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """One compute task's work on each rank: its FLOPs, else (a pack's) its bytes.

    As :func:`~mc2sim.model.cost.spread_factors` reads it, in both engines.
    """
    return flops if np.any(flops) else nbytes


def _spread_of(plans: Sequence[Plan], spread: float) -> list[dict[int, float]]:
    """Each rank's factor on each compute task (by id) for ``Device.rank_spread``; none at 1.

    A task id every rank's plan holds as a compute task of one kind is read across the
    ranks (:func:`~mc2sim.model.cost.spread_factors`); any other keeps its fitted time.
    """
    if spread == 1.0 or len(plans) < 2:
        return []
    factors: list[dict[int, float]] = [{} for _ in plans]
    for i, head in enumerate(plans[0].tasks):
        if head.resource is not Resource.COMPUTE:
            continue
        tasks = [p.tasks[i] if i < len(p.tasks) else None for p in plans]
        same = [t for t in tasks if t is not None and t.kind is head.kind and t.id == head.id]
        if len(same) < len(plans):
            continue
        loads = _task_loads(
            np.array([t.flops for t in same], dtype=np.float64),
            np.array([t.bytes for t in same], dtype=np.float64),
        )
        for rank, f in enumerate(spread_factors(spread, loads).tolist()):
            factors[rank][i] = f
    return factors


def _links(stragglers: Mapping[int, Straggler]) -> dict[int, float]:
    """The ranks whose links are narrowed, and to what fraction of their bandwidth."""
    return {r: s.link for r, s in stragglers.items() if s.link != 1.0}


def _check_stragglers(stragglers: Mapping[int, Straggler], world: int) -> None:
    """Every straggler is a rank of the world."""
    outside = [r for r in stragglers if not 0 <= r < world]
    if outside:
        raise ParamInvalidError(f"stragglers.{outside[0]}", outside[0], f"must be a rank < {world}")


def lockstep_applies(topology: Topology) -> bool:
    """Whether every rank of a run on ``topology`` can be advanced at once (:func:`_lockstep`).

    Where overlapped compute and transfers do not slow each other (contention factors 1, no
    polled progress) and ranks never wait for peers off their cores, every task takes a time
    fixed when it starts: the event engine's rates never change.
    """
    contention = topology.contention
    return (
        contention.compute_slowdown == 1.0
        and contention.comm_slowdown == 1.0
        and not contention.polled
        and schedule_wait(topology) == 0.0
        and not _Turns.apply(topology)
        and not _weighted(topology)
        and not _memory_shared(topology)
    )


def _memory_shared(topology: Topology) -> bool:
    """Whether a memory-bound task's rate depends on how many of its node's ranks compute.

    ``Device.lone_memory_speedup`` above 1 on nodes of more than one rank.
    """
    return topology.device.lone_memory_speedup != 1.0 and topology.ranks_per_node > 1


def _weighted(topology: Topology) -> bool:
    """Whether a computing rank's share of the cores depends on how many ranks are busy.

    Processor sharing of shared cores with ``waiting_weight`` below 1.
    """
    return (
        topology.device.core_sharing is CoreSharing.PROCESSOR
        and topology.core_share < 1.0
        and topology.device.waiting_weight < 1.0
    )


def _shared_structure(plans: Sequence[Plan]) -> bool:
    """Whether every plan has the same tasks in kind and dependencies, in the same order."""
    seen: dict[int, None] = {}
    first = [(t.kind, t.deps) for t in plans[0].tasks]
    for plan in plans:
        if id(plan.tasks) in seen:
            continue
        seen[id(plan.tasks)] = None
        if len(plan.tasks) != len(first) or any(
            t.kind is not kind or t.deps != deps
            for t, (kind, deps) in zip(plan.tasks, first, strict=True)
        ):
            return False
    return True


def _levels(tasks: Sequence[Task], placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (intra, inter) bytes of a collective other than an AlltoAllv.

    :func:`~mc2sim.schedule.traffic.level_bytes`, once per distinct byte count and node size.
    """
    cache: dict[tuple[int, int], tuple[int, int]] = {}
    intra, inter = np.empty(len(tasks), np.int64), np.empty(len(tasks), np.int64)
    sizes = placement.sizes[placement.nodes]
    for r, task in enumerate(tasks):
        key = (task.bytes, int(sizes[r]))
        value = cache.get(key)
        if value is None:
            value = cache[key] = level_bytes(task, r, placement)
        intra[r], inter[r] = value
    return intra, inter


class _Collective(NamedTuple):
    """One collective of every rank, as the lockstep engine runs it."""

    latency: float
    """Its latency part (see :class:`_Parts`)."""
    work: float
    """Its whole time."""
    intra: np.ndarray
    """Every rank's bytes sent within its node."""
    inter: np.ndarray
    """Every rank's bytes sent to other nodes."""


class _PlanRanks:
    """Every rank's own plan, as the lockstep engine reads a task position of all of them."""

    def __init__(self, plans: Sequence[Plan], machine: _Machine) -> None:
        self.plans, self.machine = plans, machine
        self.template = plans[0]
        self.placement = Placement.of(np.arange(len(plans)) // machine.topology.ranks_per_node)
        names_of: dict[int, tuple[str, ...]] = {}
        self.names = tuple(
            names_of.get(id(p.tasks))
            or names_of.setdefault(id(p.tasks), tuple(t.name for t in p.tasks))
            for p in plans
        )

    def figures(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's (FLOPs, bytes) of task ``i``."""
        tasks = [plan.tasks[i] for plan in self.plans]
        return (
            np.array([t.flops for t in tasks], dtype=np.int64),
            np.array([t.bytes for t in tasks], dtype=np.int64),
        )

    def collective(self, i: int, last: float, now: float) -> _Collective:
        """Collective ``i`` of every rank, queued last at ``last``, starting at ``now``."""
        tasks = [plan.tasks[i] for plan in self.plans]
        latency, work, _, pairs = self.machine.parts(tasks, last, now)
        if pairs is not None:
            rows = [t.row_bytes for t in tasks]
            intra, inter = sent_by_level(pairs[0], self.placement.nodes, rows)
        else:
            intra, inter = _levels(tasks, self.placement)
        return _Collective(latency, work, intra, inter)


class _ArrayRanks:
    """:class:`~mc2sim.schedule.plan.PlanArrays` as the lockstep engine reads them."""

    def __init__(self, arrays: PlanArrays, machine: _Machine) -> None:
        self.arrays, self.machine = arrays, machine
        self.template = arrays.template
        names = tuple(t.name for t in arrays.template.tasks)
        self.names = (names,) * arrays.world_size

    def figures(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays.flops[i], self.arrays.bytes[i]

    def collective(self, i: int, last: float, now: float) -> _Collective:
        loads = self.arrays.loads.get(i)
        if loads is None:
            raise ParamInvalidError(
                "plans",
                self.template.tasks[i].name,
                "an array plan's collectives must be AlltoAllv",
            )
        links = self.machine.links

        def times_on(*topologies: Topology) -> list[float]:
            return [_loads_time(t, loads, links) for t in topologies]

        latency, work, _ = self.machine.split(times_on, last, now)
        return _Collective(latency, work, self.arrays.intra[i], self.arrays.inter[i])


def _loads_time(topology: Topology, loads: AlltoAllvLoads, links: Mapping[int, float]) -> float:
    """An AlltoAllv's seconds from its loads, each degraded rank's own on its narrowed links."""
    time = loads_alltoallv_time(topology, loads)
    for rank, factor in links.items():
        own = AlltoAllvLoads(send=_rank_side(loads.send, rank), recv=_rank_side(loads.recv, rank))
        time = max(time, loads_alltoallv_time(_narrowed(topology, factor), own))
    return time


def _rank_side(side: SideLoads, rank: int) -> SideLoads:
    """One rank's column of a side's loads."""
    cut = slice(rank, rank + 1)
    return SideLoads(
        total=side.total[:, cut], largest=side.largest[:, cut], peers=side.peers[:, cut]
    )


def _lockstep(
    ranks: _PlanRanks | _ArrayRanks, stragglers: Mapping[int, Straggler]
) -> tuple[RunColumns, Arrivals]:
    """Every rank's plan advanced at once, task by task (numpy over ranks).

    Only where :func:`lockstep_applies` and the plans share one structure
    (:func:`_shared_structure`, or one :class:`~mc2sim.schedule.plan.PlanArrays`): then each
    rank's issuer is a max-plus recursion and the event engine's times follow in closed
    form, with the same arithmetic. A compute task starts once the issuer is free and its
    dependencies are done, and ends its time later; a comm task is queued its issue overhead
    after that; collective k starts when its last rank queued it (on a communication stream,
    also once k - 1 has ended; with concurrent collectives its transfer part waits for k -
    1's, unless its kind runs one at a time) and ends at once on every rank.
    """
    machine = ranks.machine
    topology = machine.topology
    template = ranks.template
    world = len(ranks.names)
    slow = np.ones(world)
    free = np.zeros(world)  # when each rank's issuer is next free
    for r, s in stragglers.items():
        slow[r] = s.compute
        free[r] = s.late_us * 1e-6 if s.late_us > 0 else 0.0
    first, dtype = template.tasks, template.dtype
    shape = (len(first), world)
    start, end = np.zeros(shape), np.zeros(shape)
    flops, nbytes = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    intra, inter = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    queued: list[np.ndarray] = []
    started: list[float] = []
    ended = 0.0  # when the last collective (its transfer part) ended
    warm = False  # a compute task ran earlier in the call (every rank's plan alike)
    for i, head in enumerate(first):
        task_flops, task_bytes = ranks.figures(i)
        flops[i], nbytes[i] = np.rint(task_flops), np.rint(task_bytes)
        ready = free
        for d in head.deps:
            ready = np.maximum(ready, end[d])
        if head.resource is Resource.COMPUTE:
            times = compute_times(topology, head.kind, dtype, task_flops, task_bytes, warm=warm)
            warm = True
            start[i] = ready
            spread = spread_factors(
                topology.device.rank_spread, _task_loads(task_flops, task_bytes)
            )
            end[i] = free = ready + times * slow * spread
            continue
        free = ready + issue_times(topology, head.kind, task_bytes)
        queued.append(free)
        last = float(free.max())
        now = last if machine.overlaps(head.kind) else max(last, ended)
        if started:  # collectives start in issue order (one of a kind run one at a time waits)
            now = max(now, started[-1])
        started.append(now)
        latency, work, intra[i], inter[i] = ranks.collective(i, last, now)
        # its transfer part follows its latency part and the previous collective's transfer
        ended = max(now + latency, ended) + (work - latency)
        start[i], end[i] = now, ended
    columns = RunColumns(
        run=RunKey(op=template.op, tiling=template.tiling),
        kinds=tuple(str(t.kind) for t in first),
        streams=tuple(
            Stream.COMM if t.resource is Resource.COMM else Stream.COMPUTE for t in first
        ),
        names=ranks.names,
        start_s=start,
        end_s=end,
        flops=flops,
        bytes=nbytes,
        intra_bytes=intra,
        inter_bytes=inter,
    )
    arrivals = Arrivals(
        queued_s=np.array(queued).reshape(len(queued), world), started_s=np.array(started)
    )
    return columns, arrivals


def simulate_arrays(
    arrays: PlanArrays,
    topology: Topology,
    stragglers: Mapping[int, Straggler] | None = None,
) -> tuple[RunColumns, Arrivals]:
    """:func:`simulate_run` of every rank's plan given at once as arrays (thousands of ranks).

    Raises:
        ParamInvalidError: a topology on which the ranks cannot run in lockstep
            (:func:`lockstep_applies`), or a straggler's rank outside the world.
    """
    world = arrays.world_size
    if topology.world_size != world:
        topology = topology.with_world(world)
    stragglers = stragglers or {}
    _check_stragglers(stragglers, world)
    if not lockstep_applies(topology):
        raise ParamInvalidError(
            "topology",
            topology.name,
            "must let every rank run in lockstep (contention 1, no polled progress, no core "
            "sharing) to simulate plans given as arrays",
        )
    return _lockstep(_ArrayRanks(arrays, _Machine(topology, _links(stragglers))), stragglers)


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
    return simulate_waits(plans, topology)[0]


def simulate_waits(
    plans: Mapping[int, Plan],
    topology: Topology,
    stragglers: Mapping[int, Straggler] | None = None,
) -> tuple[Timeline, Arrivals]:
    """:func:`simulate` with stragglers; also when each rank queued each collective.

    Args:
        plans: rank -> that rank's plan, for ranks 0..n-1.
        topology: the machine (resized to ``len(plans)`` ranks if needed).
        stragglers: rank -> its slowdowns (:mod:`mc2sim.model.heterogeneity`); the other
            ranks are nominal.

    Returns:
        The timeline, and the arrivals at every collective.

    Raises:
        ParamInvalidError: as :func:`simulate`; or a straggler's rank outside the plans.
    """
    run, arrivals = simulate_run(plans, topology, stragglers)
    if isinstance(run, RunColumns):
        first = plans[0]
        meta = {
            "op": first.op,
            "tiling": first.tiling,
            "world_size": len(plans),
            "topology": run_topology(plans, topology).name,
        }
        return run.timeline(meta=meta), arrivals
    return run, arrivals


def run_topology(plans: Mapping[int, Plan], topology: Topology) -> Topology:
    """``topology`` resized to the plans' ranks (``Topology.with_world``) where it differs."""
    world = len(plans)
    return topology if topology.world_size == world else topology.with_world(world)


def simulate_run(
    plans: Mapping[int, Plan],
    topology: Topology,
    stragglers: Mapping[int, Straggler] | None = None,
    *,
    lockstep: bool = True,
) -> tuple[RunColumns | Timeline, Arrivals]:
    """:func:`simulate_waits`, the run's records as columns where every rank ran in lockstep.

    Where :func:`lockstep_applies` to the topology and every rank's plan has the same tasks
    in kind and order, all ranks are advanced at once and the run comes back as
    :class:`~mc2sim.timeline.RunColumns` (no object per task: what thousands of ranks
    need); otherwise the event engine runs it and its timeline comes back. The times are
    the same either way.

    Args:
        plans: rank -> that rank's plan, for ranks 0..n-1.
        topology: the machine (resized to ``len(plans)`` ranks if needed).
        stragglers: rank -> its slowdowns; the other ranks are nominal.
        lockstep: False runs the event engine wherever (the tests' oracle).

    Returns:
        The run, and the arrivals at every collective.

    Raises:
        ParamInvalidError: as :func:`simulate_waits`.
    """
    world = len(plans)
    if sorted(plans) != list(range(world)) or world == 0:
        raise ParamInvalidError("plans", sorted(plans)[:8], "must map ranks 0..n-1 to plans")
    topology = run_topology(plans, topology)
    stragglers = stragglers or {}
    _check_stragglers(stragglers, world)
    ordered = [plans[r] for r in range(world)]
    if lockstep and lockstep_applies(topology) and _shared_structure(ordered):
        return _lockstep(_PlanRanks(ordered, _Machine(topology, _links(stragglers))), stragglers)
    engine = _Engine(plans, topology, stragglers)
    engine.run_all()
    first = plans[0]
    meta = {
        "op": first.op,
        "tiling": first.tiling,
        "world_size": world,
        "topology": topology.name,
    }
    timeline = Timeline(records=tuple(engine.records), source=Source.SIMULATED, meta=meta)
    queued = np.array(engine.queued).reshape(len(engine.queued), world)
    return timeline, Arrivals(queued_s=queued, started_s=np.array(engine.started))
